"""Runs a benchmark grid (scripts x tasks x seeds) at one shared CPU-sized budget, writing to runs/.

    python benchmark/run.py --tasks CartpoleSwingup CheetahRun --seeds 1 2 3 --total-timesteps 300000

Every run is one of the top-level scripts with the CPU-sized flags below. A finished run leaves
`runs/<run>/benchmark.json` (its command, wall clock and final evaluation); a second call skips runs whose command
finished before, so an interrupted grid resumes where it stopped. `--jobs N` runs N at a time, each with
cpu_count / N threads (never more threads than cores: oversubscribed runs slow down many times over).
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_gaussian", "gorl_ppo_fm", "gorl_ppo_diff", "fpo", "dppo", "sac_gaussian", "gorl_sac_diff"]
# CPU-sized settings (README "Running"): 16 envs, 16 x 8 segments, 8 epochs, lr 1e-3, gamma 0.99, each algorithm's own
# clip; GoRL with 32-episode refits and decoder batch 1024. SAC: 8 envs and a small update-to-data ratio.
PPO_CPU = [
    "--num-envs",
    "16",
    "--batch-size",
    "16",
    "--num-minibatches",
    "8",
    "--update-epochs",
    "8",
    "--learning-rate",
    "1e-3",
    "--gamma",
    "0.99",
]
GORL_CPU = ["--clip-coef", "0.2", "--clip-coef-later", "0.2", "--max-grad-norm", "0", "--stage-weights", "2", "1", "1",
            "--refine-episodes", "32", "--refine-num-envs", "16", "--decoder-batch-size", "1024"]
SAC_CPU = ["--num-envs", "8", "--learning-starts", "5000"]
FLAGS = {
    "ppo_gaussian": PPO_CPU + ["--clip-coef", "0.2"],
    "gorl_ppo_fm": PPO_CPU + GORL_CPU,
    "gorl_ppo_diff": PPO_CPU + GORL_CPU,
    "fpo": PPO_CPU,
    "dppo": PPO_CPU,
    "sac_gaussian": SAC_CPU,
    "gorl_sac_diff": SAC_CPU + ["--refine-episodes", "32", "--refine-num-envs", "16"],
}


def command(script, task, seed, args):
    cmd = [
        sys.executable,
        os.path.join(ROOT, f"{script}.py"),
        "--env-id",
        task,
        "--seed",
        str(seed),
        "--total-timesteps",
        str(args.total_timesteps),
        "--eval-every",
        str(args.total_timesteps // args.evals),
        "--num-eval-envs",
        str(args.num_eval_envs),
        "--env-backend",
        args.env_backend,
        *FLAGS[script],
    ]
    if "sac" in script:
        cmd += ["--utd-ratio", str(args.utd_ratio)]
    return cmd + args.extra


def finished(script, task, seed, cmd, runs):
    for marker in glob.glob(os.path.join(runs, f"{task}__{script}__{seed}__*", "benchmark.json")):
        with open(marker) as f:
            if json.load(f)["command"][1:] == cmd[1:]:  # the same flags (any interpreter)
                return True
    return False


def final_eval(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars("eval/episodic_return")[-1].value if "eval/episodic_return" in acc.Tags()["scalars"] else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    p.add_argument("--tasks", nargs="+", default=["CartpoleSwingup", "CheetahRun"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--total-timesteps", type=int, default=300_000, help="the shared budget of env steps per run")
    p.add_argument("--evals", type=int, default=6, help="evaluations per run besides the one at step 0")
    p.add_argument("--num-eval-envs", type=int, default=16)
    p.add_argument(
        "--utd-ratio", type=float, default=0.1, help="SAC's gradient steps per env step (the paper's 20 is ~200x the CPU cost)"
    )
    p.add_argument("--env-backend", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--runs", default=os.path.join(os.getcwd(), "runs"), help="where the scripts write (their cwd's runs/)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to every script")
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    if args.jobs < 1 or args.total_timesteps < 1 or args.evals < 1:
        p.error("--jobs, --total-timesteps and --evals must be positive")

    grid = [(s, t, seed) for t in args.tasks for s in args.scripts for seed in args.seeds]
    todo = [(s, t, seed, command(s, t, seed, args)) for s, t, seed in grid]
    todo = [job for job in todo if not finished(*job[:3], job[3], args.runs)]
    skipped = len(grid) - len(todo)
    print(f"{len(grid)} runs in the grid, {skipped} finished before, {len(todo)} to run, {args.jobs} at a time")
    if args.dry_run:
        for *_, cmd in todo:
            print(" ".join(cmd[1:]))
        return
    cwd = os.path.dirname(os.path.abspath(args.runs))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)), MUJOCO_GL="disable")
    start, running, done, failed = time.time(), [], 0, 0
    while todo or running:
        while todo and len(running) < args.jobs:
            script, task, seed, cmd = todo.pop(0)
            log = open(os.path.join(cwd, f".benchmark_{task}__{script}__{seed}.log"), "w")
            running.append(
                (
                    subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT),
                    log,
                    script,
                    task,
                    seed,
                    cmd,
                    time.time(),
                )
            )
        time.sleep(1)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, log, script, task, seed, cmd, job_start = job
            running.remove(job)
            log.close()
            done += 1
            seconds = time.time() - job_start
            if proc.returncode != 0:
                failed += 1
                print(f"[{skipped + done}/{len(grid)}] {script} {task} seed {seed}: FAILED (exit {proc.returncode}), "
                      f"see {log.name}", flush=True)
                continue
            run_dir = max(glob.glob(os.path.join(args.runs, f"{task}__{script}__{seed}__*")), key=os.path.getmtime)
            result = final_eval(run_dir)
            with open(os.path.join(run_dir, "benchmark.json"), "w") as f:
                json.dump({"command": cmd, "seconds": seconds, "final_eval": result}, f)
            os.remove(log.name)
            left = len(todo) + len(running)
            eta = (time.time() - start) / done * left
            print(f"[{skipped + done}/{len(grid)}] {script} {task} seed {seed}: eval {result:.1f} in {seconds:.0f} s; "
                  f"{left} left, about {eta / 60:.0f} min", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
