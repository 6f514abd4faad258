"""The results the README and docs/gorl-stages.md show are what a user gets: every run behind them is the `cpu` preset's
own command, and the committed tables are what benchmark/plot.py writes from the committed CSVs alone."""
import csv
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, load_script

PAGES = ["README.md", "docs/gorl-stages.md"]  # the results: runs of the preset's command only
EVERY_PAGE = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def studies_shown(pages=PAGES):
    """The studies whose figure or files the pages point to (`benchmark/results/<study>/`)."""
    found = set()
    for page in pages:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            found |= set(re.findall(r"benchmark/results/(\w+)/", f.read()))
    return sorted(found)


def command_of(path):
    with open(path) as f:
        return next(row["value"] for row in csv.DictReader(f) if row["tag"] == "command")


def test_the_pages_show_at_least_one_study():
    assert studies_shown(), PAGES


@pytest.mark.parametrize("study", studies_shown())
def test_every_run_the_pages_show_is_the_presets_own_command(study):
    paths = sorted(glob.glob(os.path.join(ROOT, "benchmark", "results", study, "*__*__*.csv")))
    assert paths, study
    for path in paths:
        task, script, seed = os.path.basename(path)[: -len(".csv")].split("__")
        assert command_of(path) == f"python {script}.py cpu --env-id {task} --seed {seed}", path


@pytest.mark.parametrize("study", studies_shown(EVERY_PAGE))
def test_the_committed_tables_are_what_plot_py_writes_from_the_csvs(study, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "plot.py"), "--study", study, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))
    assert r.returncode == 0, r.stderr
    for table in ["results.md", "stages.md"]:
        with open(os.path.join(ROOT, "benchmark", "results", study, table)) as f:
            committed = f.read()
        assert (tmp_path / table).read_text() == committed, (study, table)


def test_the_results_table_puts_the_papers_table1_beside_ours_with_the_budget_ratio():
    plot = load_script("benchmark/plot.py")
    run = {"eval/episodic_return": [(0, 1.0), (3_000_000, 500.0)], "charts/SPS": [(3_000_000, 2000.0)], "wall_clock_seconds": [(0, 600.0)]}
    table = plot.results_table({("HopperStand", "gorl_ppo_fm"): {1: run}, ("CartpoleBalance", "ppo_gaussian"): {1: run}})
    assert "| GoRL-FM | - | 500.0 +- 0.0 (1) | 2,000 | 10 min |" in table
    assert "180M steps, 60x the 3.0M steps of these runs" in table
    assert "| method | HopperStand at 180M steps |" in table  # only the paper's tasks
    assert "| GoRL-FM | 733.7 +- 223.8 |" in table and "| PPO | 286.1 +- 273.1 |" in table
