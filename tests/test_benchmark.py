"""benchmark/: the grid runner resumes, plots and the table come out of tiny runs made here, density and SPS run."""
import csv
import glob
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
    common = ["--study", "tiny", "--tasks", "CartpoleBalance", "--env-backend", "dm_control",
              "--runs", str(cwd / "runs"), "--results", str(cwd / "results")]
    evals = ["--eval-every", "100000", "--num-eval-envs", "2"]  # at the start and the end
    r1 = bench("run.py", ["--scripts", "ppo_gaussian", "--seeds", "1", "2", "--total-timesteps", "3840", *common, "--", *evals,
                          "--save-model"], cwd)
    r2 = bench("run.py", ["--scripts", "gorl_ppo_diff", "--seeds", "1", "--total-timesteps", "15360", *common, "--", *evals,
                          "--stage-weights", "1", "1", "--save-model", "--refine-episodes", "2", "--refine-num-envs", "2",
                          "--decoder-epochs", "2"], cwd)
    return cwd, common, r1, r2


def test_run_completes_a_grid_keeps_a_csv_per_run_and_skips_finished_runs(grid):
    cwd, common, r1, r2 = grid
    assert r1.returncode == 0 and r2.returncode == 0, r1.stdout + r1.stderr + r2.stdout + r2.stderr
    assert "2 runs in the grid, 0 finished before, 2 to run" in r1.stdout
    csvs = sorted(glob.glob(str(cwd / "results" / "tiny" / "*.csv")))
    assert [os.path.basename(c) for c in csvs] == ["CartpoleBalance__gorl_ppo_diff__1.csv", "CartpoleBalance__ppo_gaussian__1.csv",
                                                   "CartpoleBalance__ppo_gaussian__2.csv"]
    rows = list(csv.DictReader(open(csvs[0])))
    tags = {row["tag"] for row in rows}
    assert {"eval/episodic_return", "gorl/eval_after_refit", "charts/SPS", "command", "wall_clock_seconds"} <= tags, tags
    assert float(next(row["value"] for row in rows if row["tag"] == "wall_clock_seconds")) > 0
    evals = ["--eval-every", "100000", "--num-eval-envs", "2"]
    again = bench("run.py", ["--scripts", "ppo_gaussian", "--seeds", "1", "2", "3", "--total-timesteps", "3840", *common, "--dry-run", "--",
                             *evals, "--save-model"], cwd)
    assert again.returncode == 0, again.stderr
    assert "3 runs in the grid, 2 finished before, 1 to run" in again.stdout
    assert "--seed 3" in again.stdout and "--seed 1 " not in again.stdout
    # Other flags are another run: nothing is skipped.
    other = bench("run.py", ["--scripts", "ppo_gaussian", "--seeds", "1", "--total-timesteps", "7680", *common, "--dry-run"], cwd)
    assert "1 runs in the grid, 0 finished before, 1 to run" in other.stdout


def test_plot_writes_curves_and_tables_from_the_csvs_alone(grid):
    cwd, *_ = grid
    elsewhere = cwd / "elsewhere"  # no runs/ there: plot.py reads the CSVs only
    elsewhere.mkdir()
    r = bench("plot.py", ["--study", "tiny", "--results", str(cwd / "results"), "--update"], elsewhere)
    assert r.returncode == 0, r.stderr
    out = cwd / "results" / "tiny"
    assert os.path.getsize(out / "curves.png") > 10_000
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == ["PPO", "GoRL-Diff"]
    assert "(2) |" in rows[0] and "(1) |" in rows[1]  # seeds per cell
    stages = (out / "stages.md").read_text()
    assert "| CartpoleBalance | GoRL-Diff | 1 |" in stages and "after / before over 1 refits" in stages


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
