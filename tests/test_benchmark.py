"""benchmark/: the grid runner resumes, plots and the table come out of tiny runs made here, density and SPS run."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # tools, not algorithms: `pytest -m slow` runs them (about two minutes)


def bench(tool, args, cwd, timeout=600):
    env = dict(os.environ, MUJOCO_GL="disable")
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", tool), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """PPO and GoRL-Diff, one CPU-sized iteration per stage (3840 steps), on CartpoleBalance, seeds 1 and 2 for PPO; tiny refits."""
    cwd = tmp_path_factory.mktemp("bench")
    common = ["--tasks", "CartpoleBalance", "--evals", "1", "--num-eval-envs", "2", "--env-backend", "dm_control", "--runs", str(cwd / "runs")]
    r1 = bench("run.py", ["--scripts", "ppo_gaussian", "--seeds", "1", "2", "--total-timesteps", "3840", *common, "--", "--save-model"], cwd)
    r2 = bench("run.py", ["--scripts", "gorl_ppo_diff", "--seeds", "1", "--total-timesteps", "15360", *common, "--", "--save-model", "--refine-episodes", "2",
                                "--refine-num-envs", "2", "--decoder-epochs", "2"], cwd)
    return cwd, common, r1, r2


def test_run_completes_a_grid_and_skips_finished_runs(grid):
    cwd, common, r1, r2 = grid
    assert r1.returncode == 0 and r2.returncode == 0, r1.stdout + r1.stderr + r2.stdout + r2.stderr
    assert "2 runs in the grid, 0 finished before, 2 to run" in r1.stdout
    markers = glob.glob(str(cwd / "runs" / "*" / "benchmark.json"))
    assert len(markers) == 3
    assert all(json.load(open(m))["seconds"] > 0 for m in markers)
    again = bench("run.py", ["--scripts", "ppo_gaussian", "--seeds", "1", "2", "3", "--total-timesteps", "3840", *common, "--dry-run", "--", "--save-model"], cwd)
    assert again.returncode == 0, again.stderr
    assert "3 runs in the grid, 2 finished before, 1 to run" in again.stdout
    assert "--seed 3" in again.stdout and "--seed 1 " not in again.stdout
    # Other flags are another run: nothing is skipped.
    other = bench("run.py", ["--scripts", "ppo_gaussian", "--seeds", "1", "--total-timesteps", "7680", *common, "--dry-run"], cwd)
    assert "1 runs in the grid, 0 finished before, 1 to run" in other.stdout


def test_plot_writes_curves_and_a_table_with_the_right_rows(grid, tmp_path):
    cwd, *_ = grid
    r = bench("plot.py", ["--runs", str(cwd / "runs"), "--out", str(tmp_path), "--benchmark-only"], cwd)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(tmp_path / "curves.png") > 10_000
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert [row.split("|")[1].strip() for row in rows] == ["PPO", "GoRL-Diff"]
    assert "| Method | CartpoleBalance | wall clock per run |" in table
    assert "(2) |" in rows[0] and "(1) |" in rows[1]  # seeds per cell


def test_action_density_from_saved_checkpoints(grid, tmp_path):
    cwd, *_ = grid
    checkpoints = sorted(glob.glob(str(cwd / "runs" / "*" / "*.cleanrl_model")))
    assert len(checkpoints) == 3
    out = tmp_path / "density.png"
    r = bench("action_density.py", [*checkpoints, "--out", str(out), "--samples", "2000", "--state-step", "50"], cwd)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(out) > 10_000 and "3 policies" in r.stdout


def test_sps_runs_on_a_tiny_config(tmp_path):
    r = bench("sps.py", ["--env-id", "CartpoleBalance", "--backend", "dm_control", "--num-envs", "2", "--unroll-length", "8", "--batch-size", "2",
                         "--num-minibatches", "4", "--update-epochs", "1", "--iterations", "3", "--scripts", "ppo_gaussian", "gorl_ppo_fm"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 2
    for row in rows:
        rollout_sps, ratio = float(row.split("|")[2].replace(",", "")), float(row.split("|")[3])
        assert rollout_sps > 0 and 0 <= ratio < 1.5  # (a loaded machine can round the ratio down to 0.00)
