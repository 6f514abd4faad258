"""Runs a benchmark grid (scripts x tasks x seeds) of one preset and keeps a small CSV per run.

    python benchmark/run.py --study cheetah --tasks CheetahRun --seeds 1 2 3 --jobs 2

Every run is one of the top-level scripts with a preset (`cpu` by default: the README's commands), writing to
runs/. A finished run leaves `<results>/<study>/<task>__<script>__<seed>.csv`: every scalar of the run's logs that
describes its learning (evaluations over steps, GoRL's stage, refit and decoder scalars, SPS), plus its command and
wall clock, so benchmark/plot.py needs nothing else and the CSVs can be committed. A second call skips the runs whose
CSV exists with the same command: an interrupted grid (or one that spans sessions) resumes where it stopped. `--jobs
N` runs N at a time, each on cpu_count / N threads (never more threads than cores: oversubscribed runs slow down many
times over). Flags after `--` go to every script, after the preset (they win).

Before anything starts, the tasks and flags are checked (--dry-run too): an unknown task is refused with the closest
names, and a budget too small for the scripts' own checks with the smallest --total-timesteps that passes them. A run
that fails keeps its output in `<task>__<script>__<seed>.log` next to its CSV. A run interrupted after writing a
checkpoint (runs/<run>/checkpoint.pt, with the settings this same command gives) continues from it (`--resume`).
`--launcher slurm` submits the runs left to do as one Slurm job array instead (benchmark/slurm.py); `--status` tells
which runs of the study are done, queued or running, failed or left to run.
"""
import argparse
import contextlib
import csv
import difflib
import functools
import glob
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_gaussian", "gorl_ppo_fm", "gorl_ppo_diff", "fpo", "dppo", "sac_gaussian", "gorl_sac_diff"]
KEEP = ("eval/", "gorl/", "decoder/", "charts/SPS", "charts/episodic_return")  # the scalars a CSV keeps


def command(script, task, seed, args):
    """The run's command: the script's preset (`cpu` unless --preset says otherwise) on the task and seed, then
    --total-timesteps and --env-backend when given, then the flags after `--`. A study with none of those runs exactly
    the README's command, `python gorl_ppo_fm.py cpu --env-id CheetahRun --seed 1`."""
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), args.preset, "--env-id", task, "--seed", str(seed)]
    if args.total_timesteps is not None:
        cmd += ["--total-timesteps", str(args.total_timesteps)]
    if args.env_backend is not None:
        cmd += ["--env-backend", args.env_backend]
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


def run_seconds(run_dir):
    """The run's wall clock over all its launches, not the time between them: each launch (a resumed run's too) writes
    its own events file, from its first event (the writer's start) to its last."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seconds = 0.0
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        times = [event.wall_time for event in EventFileLoader(path).Load()]
        seconds += max(times) - min(times)
    return seconds


def write_csv(path, run_dir, cmd):
    """tag,step,value rows of the run's kept scalars, then its command and wall clock (`run_seconds`)."""
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
        out.writerow(["wall_clock_seconds", 0, f"{run_seconds(run_dir):.0f}"])


# The flags a resumed run may take anew (the scripts' `may_differ` but --total-timesteps, which a grid's run keeps).
MAY_DIFFER = {"resume", "eval_checkpoint", "checkpoint_every", "cuda", "threads", "track", "wandb_project_name",
              "wandb_entity", "capture_video"}


def refuse(message):
    """Bad input ends run.py with one line on stderr and exit code 2, as it ends the scripts."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def log_path(args, script, task, seed):
    """A run's output, next to its CSV: kept when the run fails, removed once the run has its CSV."""
    return os.path.join(args.results, args.study, f"{task}__{script}__{seed}.log")


@functools.lru_cache(maxsize=None)
def script_module(script):
    """A top-level script imported as a module: its training stays behind `if __name__ == "__main__"`. It is put in
    sys.modules because tyro reads Args' docstrings from the module when it formats an error."""
    name = f"_benchmark_{script}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse(cmd):
    """The settings `cmd` gives its script, made by the script's own parser and checks (Args.__post_init__), with
    nothing run: (vars(Args), None), or (None, the one-line error the script would exit with)."""
    import tyro

    module = script_module(os.path.basename(cmd[1])[: -len(".py")])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if hasattr(module, "parse_args"):  # a script that reads its command line itself (its presets)
                argv = sys.argv
                sys.argv = [cmd[1], *cmd[2:]]
                try:
                    return vars(module.parse_args()), None
                finally:
                    sys.argv = argv
            return vars(tyro.cli(module.Args, args=cmd[2:])), None
    except SystemExit:
        # The scripts' `error: ...` line, or the first line of tyro's boxed message (`Unrecognized options: --x`).
        lines = [line.strip(" │╭╮╰╯─") for line in err.getvalue().splitlines()]
        lines = [line for line in lines if ":" in line]
        return None, (lines[0] if lines else "refused").removeprefix("error: ")


def check_tasks(tasks):
    """Refuses a task that no script runs, naming the closest ones: the scripts take dm_control's tasks in CamelCase
    (('ball_in_cup', 'catch') -> BallInCupCatch) and Gymnasium's ids, and would each fail on it one after another."""
    os.environ.setdefault("MUJOCO_GL", "disable")  # dm_control's import looks for a display otherwise
    import gymnasium
    from dm_control import suite

    known = ["".join(w.capitalize() for w in f"{d}_{t}".split("_")) for d, t in suite.ALL_TASKS] + list(gymnasium.registry)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "use a DMC task (CheetahRun) or a Gymnasium id"
            refuse(f"unknown task {task!r}; {hint}")


def smallest_budget(args, script, task, seed):
    """The smallest --total-timesteps above args' that the script accepts with the grid's other flags, or None when
    none does (another flag is wrong). A bigger budget only passes more of the scripts' checks, so doubling and then
    halving the interval finds it, in a few dozen parses of a few milliseconds."""
    def passes(budget):
        trial = argparse.Namespace(**{**vars(args), "total_timesteps": budget})
        return parse(command(script, task, seed, trial))[1] is None

    if args.total_timesteps is None:  # the preset's own budget: nothing to search
        return None
    low = args.total_timesteps  # refused
    high = 2 * low
    while not passes(high):
        if high > 2**50:
            return None
        low = high
        high = 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def check_flags(args, grid):
    """Refuses a grid that its scripts would refuse, before anything starts: each (script, task)'s command goes through
    the script's own parser and checks (`parse`; the seed changes none of them). When a bigger budget passes, the line
    names the smallest --total-timesteps that passes for every run. The scripts' rules (one iteration, one per GoRL
    stage, more steps than SAC's --learning-starts, an evaluation interval of a step or more) stay theirs alone."""
    first_seed = {}
    for script, task, seed in grid:
        first_seed.setdefault((script, task), seed)
    smallest = args.total_timesteps
    too_small = None
    for (script, task), seed in first_seed.items():
        error = parse(command(script, task, seed, args))[1]
        if error is None:
            continue
        needed = smallest_budget(args, script, task, seed)
        if needed is None:
            refuse(f"{script} refuses the grid's flags on {task}: {error}")
        smallest = max(smallest, needed)
        too_small = too_small or f"{script} on {task}: {error}"
    if too_small:
        refuse(f"--total-timesteps {args.total_timesteps} is too small ({too_small}); the smallest that works for every "
               f"run of this grid is {smallest}")


def resumable(args, script, task, seed, cmd):
    """The newest checkpoint under --runs of this task, script and seed whose saved settings are the ones `cmd` gives
    now (all but MAY_DIFFER), or None. A checkpoint of other flags (another study's budget, say) is never continued."""
    pattern = os.path.join(args.runs, f"{task}__{script}__{seed}__*", "checkpoint.pt")
    paths = sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True)
    if not paths:
        return None
    import torch

    wanted = parse(cmd)[0] or {}
    for path in paths:
        try:  # mmap: only the settings are read, not the networks (or a replay buffer)
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["args"]
        except Exception:  # not a checkpoint the scripts would load either
            continue
        if wanted and all(saved.get(name) == value for name, value in wanted.items() if name not in MAY_DIFFER):
            return path
    return None


def log_state(path):
    """What a run's log tells: 'failed' (its last run.py line is the exit line: a run that succeeds loses its log),
    'running' (the process it names is alive on this machine), 'interrupted' (killed by a signal, e.g. scancel's, or no
    exit line at all: run.py itself was killed, or Slurm's time limit), or None (no log: never started)."""
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        marks = [line.split() for line in f if line.startswith("# run.py: ")]
    if marks and marks[-1][2] == "exit":  # "# run.py: exit CODE after S s"; a negative code is the killing signal
        return "failed" if int(marks[-1][3]) > 0 else "interrupted"
    if marks and marks[0][2] == "pid" and marks[0][5] == socket.gethostname():  # "# run.py: pid N on HOST (...): ..."
        try:
            os.kill(int(marks[0][3]), 0)  # signal 0: only whether the process exists
            return "running"
        except PermissionError:  # it exists, as another user's
            return "running"
        except ProcessLookupError:
            pass
    return "interrupted"


def run_state(args, script, task, seed, cmd, queue):
    """done (its CSV, of this command), queued or running (Slurm's queue, or a live process here), failed,
    interrupted, or to run."""
    if finished(csv_path(args, script, task, seed), cmd):
        return "done"
    if (script, task, seed) in queue:
        return queue[script, task, seed][0]
    return log_state(log_path(args, script, task, seed)) or "to run"


def todo_list(args, grid, queue):
    """The runs to start, [(script, task, seed, command)], and how many of the grid are queued or running already:
    a run that has its CSV, or that Slurm lists or a live process here runs, is not started again."""
    todo = []
    busy = 0
    for script, task, seed in grid:
        cmd = command(script, task, seed, args)
        state = run_state(args, script, task, seed, cmd, queue)
        if state in ("queued", "running"):
            busy += 1
        elif state != "done":
            todo.append((script, task, seed, cmd))
    return todo, busy


def status(args, grid, queue):
    """One line per run of the grid: its state, its log when it failed, the checkpoint it would continue from."""
    counts = {}
    for script, task, seed in grid:
        cmd = command(script, task, seed, args)
        state = run_state(args, script, task, seed, cmd, queue)
        counts[state] = counts.get(state, 0) + 1
        detail = ""
        if (script, task, seed) in queue:
            detail = f"  slurm job {queue[script, task, seed][1]}"
        if state == "failed":
            detail = f"  see {log_path(args, script, task, seed)}"
        if state in ("failed", "interrupted", "to run"):
            checkpoint = resumable(args, script, task, seed, cmd)
            detail += f"  resumes {checkpoint}" if checkpoint else ""
        print(f"{state:<12} {task} {script} seed {seed}{detail}")
    print(f"{args.study}: {len(grid)} runs, " + ", ".join(f"{n} {state}" for state, n in counts.items()))


def launch(args, script, task, seed, cmd, env, where):
    """Starts one run in the scripts' cwd (the parent of --runs), its output in its log next to its CSV. A run that left
    a checkpoint of this same command continues it: the script gets `--resume PATH` alone, so it takes every setting
    from the checkpoint, which `resumable` found to be the ones `cmd` gives. Returns (process, open log)."""
    checkpoint = resumable(args, script, task, seed, cmd)
    started = [*cmd[:2], "--resume", checkpoint] if checkpoint else cmd
    path = log_path(args, script, task, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    log = open(path, "w")
    proc = subprocess.Popen(started, cwd=os.path.dirname(args.runs), env=env, stdout=log, stderr=subprocess.STDOUT)
    # The child shares this file offset, so the line is not overwritten; it prints nothing before its imports are done.
    log.write(f"# run.py: pid {proc.pid} on {socket.gethostname()} ({where}): {' '.join(started)}\n")
    log.flush()
    return proc, log


def conclude(args, script, task, seed, cmd, proc, log, seconds):
    """After a run's process ended: the exit line in its log and, when it succeeded, its CSV (with `cmd`, the grid's
    command, also for a resumed run) in place of the log. Returns whether it succeeded."""
    log.write(f"# run.py: exit {proc.returncode} after {seconds:.0f} s\n")
    log.close()
    if proc.returncode != 0:
        return False
    run_dir = max(glob.glob(os.path.join(args.runs, f"{task}__{script}__{seed}__*")), key=os.path.getmtime)
    write_csv(csv_path(args, script, task, seed), run_dir, cmd)
    os.remove(log.name)
    return True


def run_local(args, todo, done_before, total):
    """Runs `todo` on this machine, --jobs at a time, each on cpu_count / jobs threads. Returns how many failed."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:  # the caller's (the test suite's one per worker) is a ceiling, never raised
        threads = min(threads, int(given))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MUJOCO_GL="disable")
    todo = list(todo)
    start = time.time()
    running = []
    done = 0
    failed = 0
    while todo or running:
        while todo and len(running) < args.jobs:
            script, task, seed, cmd = todo.pop(0)
            if run_state(args, script, task, seed, cmd, {}) in ("done", "running"):  # another run.py took it meanwhile
                continue
            proc, log = launch(args, script, task, seed, cmd, env, "local")
            running.append((proc, log, script, task, seed, cmd, time.time()))
        time.sleep(1)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, log, script, task, seed, cmd, job_start = job
            running.remove(job)
            done += 1
            seconds = time.time() - job_start
            if not conclude(args, script, task, seed, cmd, proc, log, seconds):
                failed += 1
                print(f"[{done_before + done}/{total}] {script} {task} seed {seed}: FAILED (exit {proc.returncode}), "
                      f"see {log.name}", flush=True)
                continue
            left = len(todo) + len(running)
            print(f"[{done_before + done}/{total}] {script} {task} seed {seed}: {seconds:.0f} s; {left} left, about "
                  f"{(time.time() - start) / done * left / 60:.0f} min", flush=True)
    return failed


def arguments(argv=None):
    """run.py's flags (sys.argv's by default), with the paths made absolute."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="default", help="the results subdirectory: one study per directory")
    p.add_argument("--scripts", nargs="+", default=["ppo_gaussian", "gorl_ppo_fm", "gorl_ppo_diff"], choices=SCRIPTS)
    p.add_argument("--tasks", nargs="+", default=["CheetahRun"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--preset", default="cpu", choices=["paper", "cpu", "release"], help="the scripts' preset")
    p.add_argument("--total-timesteps", type=int, help="the budget of env steps per run (default: the preset's)")
    p.add_argument("--env-backend", choices=["auto", "envpool", "dm_control"], help="default: the preset's (auto)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmark", "results"), help="where the CSVs go")
    p.add_argument("--runs", default=os.path.join(os.getcwd(), "runs"), help="where the scripts write (their cwd's runs/)")
    p.add_argument("--dry-run", action="store_true", help="check the grid, print the commands and exit")
    p.add_argument("--status", action="store_true", help="print which runs are done, queued or running, failed (and "
                   "their log) or left to run, and exit; with --launcher slurm, Slurm's queue says what is queued")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: run here, --jobs at a time; slurm: submit one job array (benchmark/slurm.py)")
    cluster = p.add_argument_group("--launcher slurm (needs `pip install -r benchmark/requirements.txt`)")
    cluster.add_argument("--partition", help="the partition (default: the cluster's default one)")
    cluster.add_argument("--gpus-per-run", type=int, default=0)
    cluster.add_argument("--cpus-per-run", type=int, default=1, help="CPUs, and so threads, of each run")
    cluster.add_argument("--time", type=int, default=24 * 60, help="the time limit of each run in minutes; a run that "
                         "reaches it continues from its last checkpoint when requeued or submitted again")
    cluster.add_argument("--sbatch", nargs="+", default=[], metavar="KEY=VALUE",
                         help="more sbatch options, e.g. `--sbatch qos=high mem=8G exclusive`")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every script (after the others: they win)")
    args = p.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    args.results = os.path.abspath(args.results)  # a Slurm node finds the same directories from whatever cwd
    args.runs = os.path.abspath(args.runs)
    if args.jobs < 1 or (args.total_timesteps is not None and args.total_timesteps < 1):
        p.error("--jobs and --total-timesteps must be positive")
    return args


def main():
    args = arguments()
    grid = [(s, t, seed) for t in args.tasks for s in args.scripts for seed in args.seeds]
    queue = {}
    if args.launcher == "slurm":
        try:  # submitit is needed for Slurm only
            import slurm
        except ImportError as e:
            refuse(f"--launcher slurm needs submitit: pip install -r benchmark/requirements.txt ({e})")
        queue = slurm.queue(args)
    if args.status:
        status(args, grid, queue)
        return
    check_tasks(args.tasks)
    check_flags(args, grid)
    todo, busy = todo_list(args, grid, queue)
    skipped = len(grid) - len(todo) - busy
    where = f"{args.jobs} at a time" if args.launcher == "local" else "as one Slurm job array"
    print(f"{len(grid)} runs in the grid, {skipped} finished before, " +
          (f"{busy} queued or running already, " if busy else "") + f"{len(todo)} to run, {where}")
    if args.dry_run:
        for script, task, seed, cmd in todo:
            checkpoint = resumable(args, script, task, seed, cmd)
            print(" ".join(cmd[1:]) + (f"  (resumes {checkpoint})" if checkpoint else ""))
        return
    if args.launcher == "slurm":
        slurm.submit(args, todo)
        return
    sys.exit(1 if run_local(args, todo, skipped + busy, len(grid)) else 0)


if __name__ == "__main__":
    main()
