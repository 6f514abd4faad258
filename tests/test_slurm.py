"""benchmark/run.py's choice of what to (re)start and benchmark/slurm.py's job array: fast checks of the runs a rerun
starts and continues (`--resume`), of what --status tells, and of the sbatch file submitit writes (through a fake
sbatch); a slow one submits a tiny grid to a real single-node Slurm (benchmark/slurm_local.sh)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import run  # noqa: E402

TINY = ["--study", "tiny", "--scripts", "ppo_gaussian", "gorl_ppo_fm", "--tasks", "CartpoleBalance", "--seeds", "1", "2",
        "--total-timesteps", "7680", "--env-backend", "dm_control"]
EXTRA = ["--", "--stage-weights", "1", "1", "--eval-every", "100000", "--num-eval-envs", "2"]  # after the grid's other flags


def tiny_args(tmp_path, *more):
    return run.arguments([*TINY, "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), *more, *EXTRA])


def grid(args):
    return [(s, t, seed) for t in args.tasks for s in args.scripts for seed in args.seeds]


def fake_csv(args, script, task, seed):
    """The CSV of a finished run, as far as the skip rule reads it: its command row."""
    cmd = run.command(script, task, seed, args)
    path = run.csv_path(args, script, task, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("tag,step,value\ncommand,0," + " ".join(["python", os.path.basename(cmd[1]), *cmd[2:]]) + "\n")


def fake_checkpoint(args, script, task, seed, unix_time, cmd):
    """runs/<run_name>/checkpoint.pt holding the settings the script makes of `cmd` (all a resume decision reads)."""
    import torch

    path = os.path.join(args.runs, f"{task}__{script}__{seed}__{unix_time}", "checkpoint.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"args": run.parse(cmd)[0]}, path)
    return path


class FakePopen:
    """Records the command a launcher starts instead of starting it."""
    started = []

    def __init__(self, cmd, **kwargs):
        FakePopen.started.append(cmd)
        self.pid = 999_999_999


def test_a_rerun_starts_only_unfinished_runs_and_continues_their_own_checkpoints(tmp_path, monkeypatch):
    args = tiny_args(tmp_path)
    fake_csv(args, "ppo_gaussian", "CartpoleBalance", 1)  # done
    queue = {("ppo_gaussian", "CartpoleBalance", 2): ("running", "5_1")}  # Slurm runs it: not submitted twice
    gorl_2 = run.command("gorl_ppo_fm", "CartpoleBalance", 2, args)
    ours = fake_checkpoint(args, "gorl_ppo_fm", "CartpoleBalance", 2, 100, gorl_2)
    # A newer checkpoint of the same task, script and seed at another budget (another study's run) is not continued.
    other = tiny_args(tmp_path, "--total-timesteps", "15360")
    time.sleep(0.05)
    fake_checkpoint(args, "gorl_ppo_fm", "CartpoleBalance", 2, 200, run.command("gorl_ppo_fm", "CartpoleBalance", 2, other))

    todo, busy = run.todo_list(args, grid(args), queue)
    assert [(s, seed) for s, _, seed, _ in todo] == [("gorl_ppo_fm", 1), ("gorl_ppo_fm", 2)] and busy == 1
    assert run.resumable(args, "gorl_ppo_fm", "CartpoleBalance", 2, gorl_2) == ours
    assert run.resumable(args, "gorl_ppo_fm", "CartpoleBalance", 1, todo[0][3]) is None
    assert run.resumable(other, "gorl_ppo_fm", "CartpoleBalance", 2, gorl_2) == ours  # the budget is in the command

    monkeypatch.setattr(run.subprocess, "Popen", FakePopen)
    FakePopen.started = []
    for script, task, seed, cmd in todo:
        proc, log = run.launch(args, script, task, seed, cmd, {}, "local")
        log.close()
    # The script takes every setting from the checkpoint, which holds the grid's: --resume alone, or it would refuse.
    assert FakePopen.started == [todo[0][3], [*gorl_2[:2], "--resume", ours]]
    with open(run.log_path(args, "gorl_ppo_fm", "CartpoleBalance", 2)) as f:
        assert f.readline().startswith(f"# run.py: pid 999999999 on {socket.gethostname()} (local): ")


def test_status_tells_done_queued_running_failed_interrupted_and_to_run(tmp_path, capsys):
    args = tiny_args(tmp_path, "--seeds", "1", "2", "3")
    fake_csv(args, "ppo_gaussian", "CartpoleBalance", 1)
    queue = {("ppo_gaussian", "CartpoleBalance", 2): ("queued", "5_1")}
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    logs = {("ppo_gaussian", 3): "# run.py: pid 1 on host (local): x\nerror: bad\n# run.py: exit 2 after 3 s\n",
            ("gorl_ppo_fm", 1): f"# run.py: pid {os.getpid()} on {host} (local): x\n",
            ("gorl_ppo_fm", 2): f"# run.py: pid {dead.pid} on {host} (local): x\n",
            ("gorl_ppo_fm", 3): f"# run.py: pid 1 on {host} (slurm job 5_0): x\n# run.py: exit -15 after 9 s\n"}
    for (script, seed), text in logs.items():
        with open(run.log_path(args, script, "CartpoleBalance", seed), "w") as f:
            f.write(text)
    run.status(args, grid(args), queue)
    lines = capsys.readouterr().out.splitlines()
    states = [line.split()[0] for line in lines[:-1]]
    assert states == ["done", "queued", "failed", "running", "interrupted", "interrupted"], lines
    assert f"see {run.log_path(args, 'ppo_gaussian', 'CartpoleBalance', 3)}" in lines[2] and "slurm job 5_1" in lines[1]
    assert lines[-1] == "tiny: 6 runs, 1 done, 1 queued, 1 failed, 1 running, 2 interrupted"


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$(dirname "$0")/submitted.sh"
echo "Submitted batch job 42"
"""
FAKE_SQUEUE = """#!/bin/sh
echo "$@" > "$(dirname "$0")/squeue_args"
printf '42_0 RUNNING\\n42_2 PENDING\\n41_0 RUNNING\\n'
"""


def test_slurm_submits_one_array_task_per_run_with_the_resources_asked(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit", reason="pip install -r benchmark/requirements.txt")
    import slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("srun", "#!/bin/sh\n")]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = tiny_args(tmp_path, "--launcher", "slurm", "--partition", "debug", "--gpus-per-run", "1", "--cpus-per-run", "2",
                     "--time", "30", "--sbatch", "qos=high", "exclusive")
    assert slurm.queue(args) == {}  # nothing submitted yet: squeue is not asked
    todo, _ = run.todo_list(args, grid(args), {})
    slurm.submit(args, todo)

    script = (bin_dir / "submitted.sh").read_text()
    for line in ["#SBATCH --array=0-3%4", "#SBATCH --partition=debug", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --time=30", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "#SBATCH --job-name=benchmark_tiny", f"export PYTHONPATH={os.path.join(ROOT, 'benchmark')}"]:
        assert line in script, (line, script)
    with open(os.path.join(slurm.folder(args), "42.json")) as f:
        manifest = json.load(f)
    assert manifest == {f"42_{i}": [s, t, seed] for i, (s, t, seed, _) in enumerate(todo)}
    # Each array task's pickled call is the run's: ArrayTask()(args, script, task, seed, command).
    for job_id, (s, t, seed, cmd) in zip(manifest, todo):
        pickled = os.path.join(slurm.folder(args), job_id, f"{job_id}_submitted.pkl")
        call = submitit.core.utils.DelayedSubmission.load(pickled)
        assert isinstance(call.function, slurm.ArrayTask) and call.args[1:] == (s, t, seed, cmd)

    # squeue's lines of this study's array (41_0 is another job): 42_1 and 42_3 finished or died, and are left to run.
    queue = slurm.queue(args)
    assert queue == {tuple(manifest["42_0"]): ("running", "42_0"), tuple(manifest["42_2"]): ("queued", "42_2")}
    assert "--name benchmark_tiny" in (bin_dir / "squeue_args").read_text()
    todo, busy = run.todo_list(args, grid(args), queue)
    assert [job[:3] for job in todo] == [tuple(manifest["42_1"]), tuple(manifest["42_3"])] and busy == 2


def slurm_up():
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_tiny_grid_runs_on_slurm_and_a_second_submission_submits_nothing(tmp_path):
    """2 scripts x 1 task x 2 seeds, one iteration each, as one array on a single-node Slurm (started if needed:
    benchmark/slurm_local.sh installs it where apt-get works). `exclusive`: one run at a time on the machine."""
    pytest.importorskip("submitit", reason="pip install -r benchmark/requirements.txt")
    was_up = slurm_up()
    if not was_up:
        if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
            pytest.skip("no Slurm here, and no apt-get to install it (benchmark/slurm_local.sh)")
        started = subprocess.run(["bash", os.path.join(ROOT, "benchmark", "slurm_local.sh"), "start"], capture_output=True,
                                 text=True, timeout=900)
        if started.returncode != 0:
            pytest.skip(f"benchmark/slurm_local.sh could not start Slurm: {(started.stderr or started.stdout).strip()[-300:]}")
    study = f"slurmtest{os.getpid()}"  # the array's job name: this test cancels its own jobs only
    try:
        flags = ["--study", study, "--scripts", "ppo_gaussian", "fpo", "--tasks", "CartpoleBalance", "--seeds", "1", "2",
                 "--total-timesteps", "3840", "--env-backend", "dm_control",
                 "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--launcher", "slurm",
                 "--time", "10", "--sbatch", "exclusive", "--", "--eval-every", "100000", "--num-eval-envs", "2"]
        bench = [sys.executable, os.path.join(ROOT, "benchmark", "run.py"), *flags]
        first = subprocess.run(bench, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert first.returncode == 0 and "4 to run, as one Slurm job array" in first.stdout, first.stdout + first.stderr
        assert "submitted job array" in first.stdout
        deadline = time.time() + 900
        while subprocess.run(["squeue", "-h", "-n", f"benchmark_{study}"], capture_output=True, text=True).stdout.strip():
            assert time.time() < deadline, "the array did not finish in 15 minutes"
            time.sleep(3)
        status = subprocess.run([*bench[:2], "--status", *bench[2:]], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert f"{study}: 4 runs, 4 done" in status.stdout, status.stdout + status.stderr
        csvs = sorted(os.listdir(tmp_path / "results" / study))
        assert csvs == [f"CartpoleBalance__{s}__{seed}.csv" for s in ["fpo", "ppo_gaussian"] for seed in [1, 2]], csvs
        second = subprocess.run(bench, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert "4 finished before, 0 to run" in second.stdout and "nothing to submit" in second.stdout, second.stdout
        assert not subprocess.run(["squeue", "-h", "-n", f"benchmark_{study}"], capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run(["scancel", "--name", f"benchmark_{study}"], capture_output=True)
        if not was_up:
            subprocess.run(["bash", os.path.join(ROOT, "benchmark", "slurm_local.sh"), "stop"], capture_output=True)
