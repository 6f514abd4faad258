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


def ablation_studies(study):
    """The ablation studies the study's committed ablations.md sets against its runs (its `study` column)."""
    path = os.path.join(ROOT, "benchmark", "results", study, "ablations.md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        names = [line.split(" | ")[2] for line in f if line.startswith("| ") and "(default)" not in line]
    return sorted(set(names) - {"study"}, key=names.index)


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
    tables = ["results.md", "stages.md"]
    ablations = ablation_studies(study)
    if ablations:
        tables.append("ablations.md")
    command = [sys.executable, os.path.join(ROOT, "benchmark", "plot.py"), "--study", study, "--out", str(tmp_path)]
    if ablations:
        command += ["--ablations", *ablations]
    r = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))
    assert r.returncode == 0, r.stderr
    for table in tables:
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


def write_run(directory, task, script, seed, command, finals, refit_ratio=0.5):
    """A CSV as benchmark/run.py keeps it: the command, one refit (after the second evaluation) and the evaluations."""
    directory.mkdir(exist_ok=True)
    rows = ["tag,step,value", f"command,0,{command}", "wall_clock_seconds,0,60"]
    rows += [f"eval/episodic_return,{step},{value}" for step, value in finals]
    rows += [f"gorl/eval_after_refit,{finals[1][0]},{finals[1][1] * refit_ratio}"]
    (directory / f"{task}__{script}__{seed}.csv").write_text("\n".join(rows) + "\n")


def test_the_ablation_table_sets_each_switch_against_the_default_and_counts_only_seeds_that_do_not_overlap(tmp_path):
    plot = load_script("benchmark/plot.py")
    for seed, end in [(1, 500.0), (2, 600.0)]:
        write_run(tmp_path / "base", "FingerSpin", "gorl_ppo_fm", seed, f"python gorl_ppo_fm.py cpu --env-id FingerSpin --seed {seed}",
                  [(0, 1.0), (100, 200.0), (200, end)])
    # beta 0 ends below both default seeds, with the same refits; no reset overlaps them at the end, and its refits
    # (0.1 and 0.4 of the return before, against 0.5) are below every default seed's.
    for seed, end in [(1, 100.0), (2, 550.0)]:
        write_run(tmp_path / "beta0", "FingerSpin", "gorl_ppo_fm", seed,
                  f"python gorl_ppo_fm.py cpu --env-id FingerSpin --seed {seed} --beta 0", [(0, 1.0), (100, 200.0), (200, end / 5)])
        write_run(tmp_path / "none", "FingerSpin", "gorl_ppo_fm", seed,
                  f"python gorl_ppo_fm.py cpu --env-id FingerSpin --seed {seed} --encoder-reset none", [(0, 1.0), (100, 200.0), (200, end)],
                  refit_ratio=0.1 if seed == 1 else 0.4)
    runs = plot.load(tmp_path / "base")
    ablations = {name: plot.load(tmp_path / name) for name in ["beta0", "none"]}
    table = plot.ablations_table(str(tmp_path), "base", runs, ablations)
    assert "| FingerSpin | GoRL-FM | base | (default) | 550.0 +- 50.0 (2) | 0.50 (0.50) | 200.0, 550.0 | | |" in table
    assert "| beta0 | `--beta 0` | 65.0 +- 45.0 (2) | 0.50 (0.50) | 200.0, 65.0 | lower: learning destabilizes early" in table
    assert table.endswith("| final eval lower, refits no separation |\n"
                          "| FingerSpin | GoRL-FM | none | `--encoder-reset none` | 325.0 +- 225.0 (2) | 0.25 (0.10) | 200.0, 325.0 | "
                          "lower: drops right after refits, most after the third (Fig. 4b) | final eval no separation, refits lower |\n")
    write_run(tmp_path / "other", "FingerSpin", "gorl_ppo_fm", 1, "python gorl_ppo_fm.py cpu --env-id FingerSpin --seed 1 --beta 0.1",
              [(0, 1.0), (100, 200.0), (200, 9.0)])
    with pytest.raises(SystemExit, match="not one of the paper's ablations"):  # a switch the paper did not ablate
        plot.ablations_table(str(tmp_path), "base", runs, {"other": plot.load(tmp_path / "other")})


def test_the_ablation_figure_draws_each_ablation_beside_the_default_in_one_panel_per_task_and_script(tmp_path, monkeypatch):
    plot = load_script("benchmark/plot.py")
    for name, flag in [("base", ""), ("beta0", " --beta 0"), ("latent", " --refine-input latent")]:
        for seed in [1, 2]:
            write_run(tmp_path / name, "FingerSpin", "gorl_ppo_fm", seed,
                      f"python gorl_ppo_fm.py cpu --env-id FingerSpin --seed {seed}{flag}", [(0, 1.0), (100, 200.0), (200, 300.0)])
    runs = plot.load(tmp_path / "base")
    ablations = {name: plot.load(tmp_path / name) for name in ["beta0", "latent"]}
    plot.ablation_curves("base", runs, ablations, str(tmp_path / "ablations.png"))
    assert (tmp_path / "ablations.png").read_bytes().startswith(b"\x89PNG")
    drawn = {}
    monkeypatch.setattr(plot, "draw", lambda panels, path: drawn.update(panels))
    plot.ablation_curves("base", runs, ablations, str(tmp_path / "ablations.png"))
    assert [(label, sorted(seeds)) for label, seeds in drawn["FingerSpin, GoRL-FM"]] == [
        ("base (default)", [1, 2]), ("beta0", [1, 2]), ("latent", [1, 2])]
    assert list(drawn) == ["FingerSpin, GoRL-FM"]


def test_a_method_keeps_its_color_in_every_panel_and_its_legend_counts_its_seeds(tmp_path, monkeypatch):
    import matplotlib.axes

    plot = load_script("benchmark/plot.py")
    for seed in (1, 2):
        write_run(tmp_path, "CheetahRun", "ppo_gaussian", seed, f"python ppo_gaussian.py cpu --env-id CheetahRun --seed {seed}", [(0, 1.0), (100, 2.0)])
    runs = plot.load(tmp_path)
    seeds = runs["CheetahRun", "ppo_gaussian"]
    one_seed = {1: seeds[1]}
    panels = {"CheetahRun": [("PPO", seeds), ("FPO", one_seed), ("GoRL-FM", seeds)], "HopperStand": [("PPO", seeds), ("GoRL-FM", seeds)]}
    drawn = []
    plot_line = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **kw: drawn.append((kw["label"], kw["color"])) or plot_line(ax, *a, **kw))
    plot.draw(panels, str(tmp_path / "curves.png"))
    assert drawn == [("PPO (2 seeds)", "C0"), ("FPO (1 seed)", "C1"), ("GoRL-FM (2 seeds)", "C2"),
                     ("PPO (2 seeds)", "C0"), ("GoRL-FM (2 seeds)", "C2")]


def test_the_curve_figure_wraps_its_panels_in_rows_of_three(tmp_path):
    plot = load_script("benchmark/plot.py")
    write_run(tmp_path, "CheetahRun", "ppo_gaussian", 1, "python ppo_gaussian.py cpu --env-id CheetahRun --seed 1", [(0, 1.0), (100, 2.0)])
    seeds = plot.load(tmp_path)["CheetahRun", "ppo_gaussian"]
    sizes = []
    for count in (2, 4):
        plot.draw({f"task {i}": [("PPO", seeds)] for i in range(count)}, str(tmp_path / "curves.png"))
        png = (tmp_path / "curves.png").read_bytes()
        sizes.append((int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")))  # the IHDR chunk's width, height
    assert sizes == [(1320, 462), (1980, 924)]  # 6 x 4.2 inches a panel at 110 dpi: one row of 2; 2 rows of 3 for 4


def test_the_readme_embeds_the_results_table_of_every_figure_it_shows():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    figures = re.findall(r"benchmark/results/(\w+)/(curves|ablations)\.png", readme)
    assert "curves" in [figure for _, figure in figures]
    for study, figure in figures:
        name = "results.md" if figure == "curves" else "ablations.md"
        with open(os.path.join(ROOT, "benchmark", "results", study, name)) as f:
            table = f.read().strip()
        assert table in readme, f"README.md's table beside {study}/{figure}.png is not benchmark/results/{study}/{name}"
