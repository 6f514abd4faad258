"""Runs a benchmark grid (scripts x tasks x seeds) at one shared CPU-sized budget and keeps a small CSV per run.

    python benchmark/run.py --study cheetah --tasks CheetahRun --seeds 1 2 3 --total-timesteps 3000000 --jobs 2

Every run is one of the top-level scripts with the CPU-sized flags below (the README's CPU commands), writing to
runs/. A finished run leaves `<results>/<study>/<task>__<script>__<seed>.csv`: every scalar of the run's logs that
describes its learning (evaluations over steps, GoRL's stage, refit and decoder scalars, SPS), plus its command and
wall clock, so benchmark/plot.py needs nothing else and the CSVs can be committed. A second call skips the runs whose
CSV exists with the same command: an interrupted grid (or one that spans sessions) resumes where it stopped. `--jobs
N` runs N at a time, each on cpu_count / N threads (never more threads than cores: oversubscribed runs slow down many
times over). Per-task flags (FingerSpin's gamma 0.95, the release's) are in TASK_FLAGS.
"""
import argparse
import csv
import glob
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_gaussian", "gorl_ppo_fm", "gorl_ppo_diff", "fpo", "dppo", "sac_gaussian", "gorl_sac_diff"]
# CPU-sized settings (README): 16 envs, 16 x 8 segments, 8 epochs, lr 1e-3, gamma 0.99, clip 0.2, no entropy bonus;
# GoRL with the same PPO settings and the paper's restart at the prior in every stage (docs/gorl-stages.md), 32-episode
# refits and decoder batch 1024, with the scripts' 50 decoder epochs as the study3m runs had; the README's commands
# now add `--decoder-epochs 200` (docs/gorl-stages.md: 50 undertrained a refit), which a study passes after `--`.
# FPO and DPPO keep their own clip and have no entropy term. SAC: 8 envs and a small update-to-data ratio.
PPO_CPU = ["--num-envs", "16", "--batch-size", "16", "--num-minibatches", "8", "--update-epochs", "8",
           "--learning-rate", "1e-3", "--gamma", "0.99"]
GORL_CPU = ["--clip-coef", "0.2", "--clip-coef-later", "0.2", "--max-grad-norm", "0", "--ent-coef", "0",
            "--ent-coef-later", "0", "--refine-episodes", "32", "--refine-num-envs", "16", "--decoder-batch-size", "1024"]
SAC_CPU = ["--num-envs", "8", "--learning-starts", "5000"]
FLAGS = {
    "ppo_gaussian": PPO_CPU + ["--clip-coef", "0.2", "--ent-coef", "0"],
    "gorl_ppo_fm": PPO_CPU + GORL_CPU,
    "gorl_ppo_diff": PPO_CPU + GORL_CPU,
    "fpo": PPO_CPU,
    "dppo": PPO_CPU,
    "sac_gaussian": SAC_CPU,
    "gorl_sac_diff": SAC_CPU + ["--refine-episodes", "32", "--refine-num-envs", "16"],
}
TASK_FLAGS = {"FingerSpin": ["--gamma", "0.95"]}  # the release's FingerSpin setting, for every method (later flags win)
KEEP = ("eval/", "gorl/", "decoder/", "charts/SPS", "charts/episodic_return")  # the scalars a CSV keeps


def command(script, task, seed, args):
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), "--env-id", task, "--seed", str(seed), "--total-timesteps",
           str(args.total_timesteps), "--eval-every", str(args.total_timesteps // args.evals), "--num-eval-envs",
           str(args.num_eval_envs), "--env-backend", args.env_backend, *FLAGS[script], *TASK_FLAGS.get(task, [])]
    if "sac" in script:
        cmd += ["--utd-ratio", str(args.utd_ratio)]
    if script.startswith("gorl"):
        cmd += ["--stage-weights", *args.stage_weights]
    return cmd + args.extra


def csv_path(args, script, task, seed):
    return os.path.join(args.results, args.study, f"{task}__{script}__{seed}.csv")


def finished(path, cmd):
    """The run's CSV exists and was written by the same command (any interpreter, any checkout)."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        rows = [row for row in csv.reader(f) if row and row[0] == "command"]
    return bool(rows) and rows[0][2].split(" ")[1:] == [os.path.basename(cmd[1]), *cmd[2:]]


def write_csv(path, run_dir, cmd, seconds):
    """tag,step,value rows of the run's kept scalars, then its command and wall clock."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["tag", "step", "value"])
        for tag in sorted(t for t in acc.Tags()["scalars"] if t.startswith(KEEP)):
            for event in acc.Scalars(tag):
                out.writerow([tag, event.step, f"{event.value:.6g}"])
        out.writerow(["command", 0, " ".join(["python", os.path.basename(cmd[1]), *cmd[2:]])])
        out.writerow(["wall_clock_seconds", 0, f"{seconds:.0f}"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="default", help="the results subdirectory: one study per directory")
    p.add_argument("--scripts", nargs="+", default=["ppo_gaussian", "gorl_ppo_fm", "gorl_ppo_diff"], choices=SCRIPTS)
    p.add_argument("--tasks", nargs="+", default=["CheetahRun"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--total-timesteps", type=int, default=3_000_000, help="the shared budget of env steps per run")
    p.add_argument("--stage-weights", nargs="+", default=["2", "2", "1", "1"], help="GoRL's stages (the paper's 2 2 1 1)")
    p.add_argument("--evals", type=int, default=30, help="evaluations per run besides the one at step 0")
    p.add_argument("--num-eval-envs", type=int, default=32)
    p.add_argument("--utd-ratio", type=float, default=0.1, help="SAC's updates per env step (the paper: 20, ~200x the cost)")
    p.add_argument("--env-backend", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmark", "results"), help="where the CSVs go")
    p.add_argument("--runs", default=os.path.join(os.getcwd(), "runs"), help="where the scripts write (their cwd's runs/)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every script (after the others: they win)")
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    if args.jobs < 1 or args.total_timesteps < 1 or args.evals < 1:
        p.error("--jobs, --total-timesteps and --evals must be positive")

    grid = [(s, t, seed) for t in args.tasks for s in args.scripts for seed in args.seeds]
    todo = [(s, t, seed, command(s, t, seed, args)) for s, t, seed in grid]
    todo = [job for job in todo if not finished(csv_path(args, *job[:3]), job[3])]
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
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, log, script, task, seed, cmd, time.time()))
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
            write_csv(csv_path(args, script, task, seed), run_dir, cmd, seconds)
            os.remove(log.name)
            left = len(todo) + len(running)
            print(f"[{skipped + done}/{len(grid)}] {script} {task} seed {seed}: {seconds:.0f} s; {left} left, about "
                  f"{(time.time() - start) / done * left / 60:.0f} min", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
