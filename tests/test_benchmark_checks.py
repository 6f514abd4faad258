"""benchmark/run.py refuses a bad grid before it starts (an unknown task, a budget too small for the scripts' own
checks), keeps a failed run's log next to its CSV, and benchmark/plot.py leaves the committed results alone unless
told. Fast: no training (the failed run stops at its memory check, and plot.py reads hand-made CSVs)."""
import argparse
import glob
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import run  # noqa: E402


def bench(tool, args, cwd, **env):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", tool), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, MUJOCO_GL="disable", **env))


def test_an_unknown_task_is_refused_in_one_line_with_the_closest_names(tmp_path):
    r = bench("run.py", ["--tasks", "CartpoleBalance", "CheetahRn", "--dry-run", "--results", str(tmp_path)], tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown task 'CheetahRn'; did you mean CheetahRun"), lines


def test_a_budget_too_small_is_refused_in_one_line_naming_the_smallest_that_works(tmp_path):
    grid = ["--scripts", "ppo_gaussian", "gorl_ppo_fm", "--tasks", "CartpoleBalance", "--seeds", "1",
            "--results", str(tmp_path)]
    r = bench("run.py", [*grid, "--total-timesteps", "1000", "--dry-run"], tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --total-timesteps 1000 is too small ("), lines
    smallest = int(re.fullmatch(r".*the smallest that works for every run of this grid is (\d+)", lines[0]).group(1))
    # The named budget passes every script's own checks, and one step less does not: the smallest GoRL stage (1/6 of
    # the budget) holds one iteration then.
    assert run.check_flags(run.arguments([*grid, "--total-timesteps", str(smallest)]), [("gorl_ppo_fm", "CartpoleBalance", 1),
                                                                                         ("ppo_gaussian", "CartpoleBalance", 1)]) is None
    with pytest.raises(SystemExit):
        run.check_flags(run.arguments([*grid, "--total-timesteps", str(smallest - 1)]), [("gorl_ppo_fm", "CartpoleBalance", 1)])
    # A flag that no budget fixes is named as the script says it.
    r = bench("run.py", [*grid, "--dry-run", "--", "--gamma", "2"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: ppo_gaussian refuses the grid's flags on CartpoleBalance: --gamma must be in (0, 1], got 2.0"], r.stderr


def test_a_failed_runs_log_is_kept_next_to_its_csv_and_status_names_it(tmp_path):
    """The run stops at its memory check (GORL_MEMORY_LIMIT_BYTES fakes a machine without memory), after it started."""
    grid = ["--study", "tiny", "--scripts", "ppo_gaussian", "--tasks", "CartpoleBalance", "--seeds", "1", "--total-timesteps",
            "3840", "--env-backend", "dm_control", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
            "--", "--eval-every", "100000", "--num-eval-envs", "2"]
    r = bench("run.py", grid, tmp_path, GORL_MEMORY_LIMIT_BYTES="1")
    log = tmp_path / "results" / "tiny" / "CartpoleBalance__ppo_gaussian__1.log"
    assert r.returncode == 1 and f"FAILED (exit 2), see {log}" in r.stdout, r.stdout + r.stderr
    text = log.read_text()
    assert "error: " in text and "more than the 0.0 GiB free" in text, text  # the script's own line
    assert text.splitlines()[-1].startswith("# run.py: exit 2 after "), text
    assert not glob.glob(str(tmp_path / "results" / "tiny" / "*.csv"))
    assert not glob.glob(str(tmp_path / ".benchmark_*")) and not glob.glob(os.path.join(ROOT, ".benchmark_*"))
    status = bench("run.py", ["--status", *grid], tmp_path)
    assert f"failed       CartpoleBalance ppo_gaussian seed 1  see {log}" in status.stdout, status.stdout + status.stderr


def write_study(directory):
    """Two runs' CSVs as run.py writes them: evaluations, SPS, the command and the wall clock."""
    os.makedirs(directory)
    for seed in (1, 2):
        rows = ["tag,step,value", "charts/SPS,3840,1500", f"eval/episodic_return,0,{10 * seed}",
                f"eval/episodic_return,3840,{100 * seed}", "command,0,python ppo_gaussian.py", "wall_clock_seconds,0,60"]
        with open(os.path.join(directory, f"CartpoleBalance__ppo_gaussian__{seed}.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")


def test_plot_writes_to_a_scratch_folder_unless_told_to_update_the_committed_results(tmp_path):
    results = tmp_path / "results"
    write_study(results / "tiny")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = bench("plot.py", ["--study", "tiny", "--results", str(results)], tmp_path, TMPDIR=str(scratch))
    assert r.returncode == 0, r.stderr
    out = scratch / "gorl-clean-plots" / "tiny"
    assert f"in {out} (a scratch directory: --update writes them into {results / 'tiny'})" in r.stdout, r.stdout
    assert sorted(os.listdir(out)) == ["curves.png", "results.md", "stages.md"]
    assert sorted(os.listdir(results / "tiny")) == ["CartpoleBalance__ppo_gaussian__1.csv", "CartpoleBalance__ppo_gaussian__2.csv"]
    assert "| PPO | 150.0 +- 50.0 (2) |" in (out / "results.md").read_text()
    r = bench("plot.py", ["--study", "tiny", "--results", str(results), "--out", str(tmp_path / "elsewhere")], tmp_path)
    assert r.returncode == 0 and sorted(os.listdir(tmp_path / "elsewhere")) == ["curves.png", "results.md", "stages.md"]
    r = bench("plot.py", ["--study", "tiny", "--results", str(results), "--update"], tmp_path, TMPDIR=str(scratch))
    assert r.returncode == 0, r.stderr
    assert {"curves.png", "results.md", "stages.md"} <= set(os.listdir(results / "tiny")), os.listdir(results / "tiny")
    assert os.path.getsize(results / "tiny" / "curves.png") > 10_000


def test_check_flags_asks_each_script_and_task_once(monkeypatch):
    """The seed changes none of the scripts' checks: a grid of many seeds costs one parse per script and task."""
    parsed = []
    monkeypatch.setattr(run, "parse", lambda cmd: parsed.append(cmd) or ({}, None))
    args = argparse.Namespace(**{**vars(run.arguments([])), "tasks": ["CartpoleBalance"]})
    run.check_flags(args, [("ppo_gaussian", "CartpoleBalance", seed) for seed in range(1, 11)])
    assert len(parsed) == 1



def test_a_resumed_runs_wall_clock_is_the_sum_of_its_launches_not_the_time_between_them(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # Two launches of one run, each its own events file: 100 s, then (resumed) 50 s. Their events overlap in time
    # here, so the span over both files (100) and the last launch alone (50) are both wrong answers.
    start = time.time()  # before each writer's own first event, so the spans are exactly the scalars' walltimes
    for launch, seconds in enumerate([100.0, 50.0]):
        writer = SummaryWriter(str(tmp_path), filename_suffix=f".{launch}")
        writer.add_scalar("charts/SPS", 1, 1, walltime=start)
        writer.add_scalar("charts/SPS", 1, 2, walltime=start + seconds)
        writer.close()
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2
    assert 149.9 < run.run_seconds(str(tmp_path)) < 150.1
