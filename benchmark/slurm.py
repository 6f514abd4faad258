"""`benchmark/run.py --launcher slurm`: the grid's runs left to do as one Slurm job array, through submitit.

    pip install -r benchmark/requirements.txt
    python benchmark/run.py --study s --tasks CheetahRun --seeds 1 2 3 --launcher slurm --partition cpu --time 600
    python benchmark/run.py --study s --tasks CheetahRun --seeds 1 2 3 --launcher slurm --status

One array task per (script, task, seed) that has no CSV and is not queued or running already. A task runs its run as
the local launcher does (run.launch, run.conclude): its log next to its CSV, its CSV at the end, and a checkpoint of
the same command continued instead of started over. When Slurm signals the time limit (or a preemption), the script
dies with the signal and submitit requeues the task (it is Checkpointable), which continues from the run's last
checkpoint; a task that ran out of requeues or was cancelled is submitted again, the same way, by the next call with
the same flags. The results, runs/ and this Python must be on a file system that the nodes share.

submitit keeps its files in <runs>/slurm/<study>/, and one <array job id>.json per submission there names the run of
each array task, which `queue` matches with squeue's list (so --status and a new submission know what is queued).
"""
import glob
import json
import os
import shlex
import subprocess
import time

import submitit

import run

BENCHMARK = os.path.dirname(os.path.abspath(__file__))


def folder(args):
    return os.path.join(args.runs, "slurm", args.study)


def job_name(args):
    return f"benchmark_{args.study}"


class ArrayTask(submitit.helpers.Checkpointable):
    """One run on a node, with the task's CPUs as its threads. Raises when the run fails, so Slurm marks the task
    failed. Checkpointable: submitit requeues it on a time limit or preemption (up to 3 times) instead of ending it."""

    def __call__(self, args, script, task, seed, cmd):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("SLURM_CPUS_PER_TASK", "1"), MUJOCO_GL="disable")
        start = time.time()
        proc, log = run.launch(args, script, task, seed, cmd, env, f"slurm job {submitit.JobEnvironment().job_id}")
        proc.wait()
        if not run.conclude(args, script, task, seed, cmd, proc, log, time.time() - start):
            raise RuntimeError(f"{script} {task} seed {seed} failed (exit {proc.returncode}), see {log.name}")


def sbatch_options(pairs):
    """`--sbatch qos=high exclusive` -> {"qos": "high", "exclusive": True} (a key alone is a flag without a value)."""
    options = {}
    for pair in pairs:
        key, has_value, value = pair.partition("=")
        options[key] = value if has_value else True
    return options


def submit(args, todo):
    """Submits `todo`, [(script, task, seed, command)], as one job array and records which run each array task is."""
    if not todo:
        print("nothing to submit")
        return
    executor = submitit.AutoExecutor(folder=os.path.join(folder(args), "%j"), cluster="slurm")
    parameters = {
        "name": job_name(args),
        "timeout_min": args.time,
        "cpus_per_task": args.cpus_per_run,
        "slurm_additional_parameters": sbatch_options(args.sbatch),
        # The array task unpickles ArrayTask, so the node imports this module and run.py from here.
        "slurm_setup": [f"export PYTHONPATH={shlex.quote(BENCHMARK)}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    if args.partition:
        parameters["slurm_partition"] = args.partition
    if args.gpus_per_run:
        parameters["gpus_per_node"] = args.gpus_per_run
    executor.update_parameters(**parameters)
    scripts, tasks, seeds, commands = zip(*todo)
    jobs = executor.map_array(ArrayTask(), [args] * len(todo), scripts, tasks, seeds, commands)
    array_id = jobs[0].job_id.split("_")[0]
    with open(os.path.join(folder(args), f"{array_id}.json"), "w") as f:
        json.dump({job.job_id: [script, task, seed] for job, (script, task, seed, _) in zip(jobs, todo)}, f)
    print(f"submitted job array {array_id} of {len(jobs)} runs (submitit's files: {folder(args)}); the same command "
          "with --status tells how they are doing, and submits what is missing when run again")


def queue(args):
    """{(script, task, seed): (state, job id)} of the study's submitted runs that Slurm still lists: 'queued'
    (pending, or requeued after a time limit) or 'running'. Empty before the study's first submission."""
    runs = {}
    for path in glob.glob(os.path.join(folder(args), "*.json")):
        with open(path) as f:
            runs.update(json.load(f))
    if not runs:
        return {}
    try:  # --array: one line per array task, `12_3`, pending ones too
        listed = subprocess.run(["squeue", "--noheader", "--array", "--name", job_name(args), "--format", "%i %T"],
                                capture_output=True, text=True)
    except FileNotFoundError:
        run.refuse("squeue not found: --launcher slurm needs Slurm's commands (a login node)")
    if listed.returncode != 0:
        run.refuse(f"squeue failed: {listed.stderr.strip()}")
    states = {}
    for line in listed.stdout.splitlines():
        job_id, state = line.split()
        if job_id in runs:
            script, task, seed = runs[job_id]
            states[script, task, seed] = ("queued" if state in ("PENDING", "REQUEUED") else "running", job_id)
    return states
