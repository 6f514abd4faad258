"""Rollout speed of every PPO-family script against the bare vector env, side by side in one run.

    python benchmark/sps.py --env-id CheetahRun --num-envs 16 --iterations 4

For each script: a short CPU-sized training run (its own process, a temporary directory) whose logged
`perf/rollout_SPS` (env steps per second of the rollout: policy inference, copies and env stepping) and `charts/SPS`
are averaged over the iterations after the first. The bare env is the scripts' own `VecEnv` (the same
backend and env count) stepped with uniformly random actions. The ratio says how close a rollout gets to the
environment's own speed; 1.0 would be a free policy.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_gaussian", "gorl_ppo_fm", "gorl_ppo_diff", "fpo", "dppo"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bare_sps(env_id, backend, num_envs, steps, seed=0):
    m = load_script("ppo_gaussian")
    envs = m.VecEnv(env_id, backend, num_envs, seed)
    envs.reset()
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (64, num_envs, envs.action_dim)).astype(np.float32)
    for i in range(20):  # warm-up
        envs.step(actions[i % 64])
    start = time.perf_counter()
    for i in range(steps):
        envs.step(actions[i % 64])
    seconds = time.perf_counter() - start
    envs.close()
    return steps * num_envs / seconds


def script_sps(script, args):
    """Returns {tag: mean over iterations 2..} of the run's perf/rollout_SPS and charts/SPS."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps_per_iteration = args.batch_size * args.num_minibatches * args.unroll_length
    cmd = [
        sys.executable,
        os.path.join(ROOT, f"{script}.py"),
        "--env-id",
        args.env_id,
        "--env-backend",
        args.backend,
        "--num-envs",
        str(args.num_envs),
        "--unroll-length",
        str(args.unroll_length),
        "--batch-size",
        str(args.batch_size),
        "--num-minibatches",
        str(args.num_minibatches),
        "--update-epochs",
        str(args.update_epochs),
        "--total-timesteps",
        str(args.iterations * steps_per_iteration),
        "--eval-every",
        str(10**12),
        "--num-eval-envs",
        "1",
    ]
    if script.startswith("gorl"):
        cmd += ["--stage-weights", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=dict(os.environ, MUJOCO_GL="disable"))
        if r.returncode != 0:
            sys.exit(f"error: {script} failed: {r.stderr.strip().splitlines()[-1:]}")
        run_dir = os.path.join(tmp, "runs", os.listdir(os.path.join(tmp, "runs"))[0])
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        tags = ["perf/rollout_SPS", "charts/SPS"]
        return {
            tag: float(np.mean([e.value for e in acc.Scalars(tag)][1:] or [e.value for e in acc.Scalars(tag)])) for tag in tags
        }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="CheetahRun")
    p.add_argument("--backend", default="envpool", choices=["envpool", "dm_control"])
    p.add_argument("--num-envs", type=int, default=16)
    p.add_argument("--unroll-length", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-minibatches", type=int, default=8)
    p.add_argument("--update-epochs", type=int, default=8)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "disable")
    steps = args.batch_size * args.num_minibatches * args.unroll_length // args.num_envs
    bare = bare_sps(args.env_id, args.backend, args.num_envs, max(steps, 200))
    print(f"{args.env_id}, {args.backend}, {args.num_envs} envs; bare vector env with random actions: {bare:,.0f} SPS")
    print("| script | rollout SPS | rollout / bare env | training SPS |")
    print("|---|---|---|---|")
    for script in args.scripts:
        r = script_sps(script, args)
        print(
            f"| `{script}.py` | {r['perf/rollout_SPS']:,.0f} | {r['perf/rollout_SPS'] / bare:.2f} | {r['charts/SPS']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
