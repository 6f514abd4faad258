"""Curves, a results table and GoRL's refit and stage table from the CSVs benchmark/run.py keeps (nothing else).

    python benchmark/plot.py --study cpu3m             # into a scratch directory, which it prints
    python benchmark/plot.py --study cpu3m --update    # into benchmark/results/cpu3m/, the committed ones

Reads `benchmark/results/<study>/<task>__<script>__<seed>.csv` and writes, in a scratch directory (`--out`, or with
`--update` the study's directory, next to the CSVs, where the committed figure and tables are), `curves.png`
(deterministic evaluation return against env steps, mean and min-max over seeds, one panel per task, GoRL's refits
dotted), `results.md` (final evaluation, mean +- std over seeds, training SPS and wall clock per run, and the paper's
Table 1 for the tasks it has) and `stages.md` (per GoRL run: the evaluation at each stage's end, right after each
refit and their ratio; per task and method, the median stage ends and the refits' median and lowest ratio).

    python benchmark/plot.py --study cpu3m --ablations cpu3m_refine_latent cpu3m_no_reset cpu3m_beta0 --update

also writes `ablations.md` and `ablations.png` (the paper's Figure 4 at this budget): each ablation study (the preset's
command plus one switch, `benchmark/run.py ... -- FLAGS`) against the study's own runs of the same task and script, with
the paper's direction for that switch.
"""
import argparse
import csv
import glob
import os
import tempfile
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"ppo_gaussian": "PPO", "fpo": "FPO", "dppo": "DPPO", "gorl_ppo_diff": "GoRL-Diff", "gorl_ppo_fm": "GoRL-FM",
         "sac_gaussian": "SAC", "gorl_sac_diff": "GoRL-SAC-Diff"}
# The paper's Table 1 (final return at 180M steps, mean +- std over 5 seeds, MuJoCo Playground's JAX ports on GPUs).
PAPER_TASKS = ["CheetahRun", "FingerSpin", "FingerTurnHard", "FishSwim", "HopperStand", "WalkerWalk"]
PAPER_TABLE1 = {
    "ppo_gaussian": ["724.8 +- 155.7", "539.0 +- 146.6", "738.7 +- 114.5", "433.7 +- 73.6", "286.1 +- 273.1", "825.7 +- 79.7"],
    "fpo": ["599.2 +- 297.5", "56.1 +- 124.5", "752.1 +- 55.4", "204.7 +- 191.5", "3.9 +- 1.8", "29.0 +- 4.3"],
    "dppo": ["559.8 +- 100.0", "694.1 +- 191.6", "633.8 +- 88.2", "143.5 +- 26.3", "2.1 +- 0.8", "345.6 +- 64.5"],
    "gorl_ppo_diff": ["902.2 +- 2.2", "844.7 +- 59.4", "884.6 +- 27.0", "608.6 +- 22.1", "874.6 +- 38.8", "909.0 +- 30.5"],
    "gorl_ppo_fm": ["883.4 +- 19.9", "903.9 +- 104.1", "860.8 +- 14.9", "641.0 +- 13.1", "733.7 +- 223.8", "919.6 +- 60.9"],
}
# What the paper finds for each mechanism ablation (ICML text, Sec. 4.3, FingerSpin; the KL sweep is v1's Sec. 4.3.1).
PAPER_ABLATIONS = {
    "--refine-input latent": "lower: repeated drops after refits (Fig. 4a)",
    "--encoder-reset none": "lower: drops right after refits, most after the third (Fig. 4b)",
    "--beta 0": "lower: learning destabilizes early (v1 Fig. 5, CheetahRun)",
}


def load(directory):
    """{(task, script): {seed: {tag: [(step, value), ...]}}} from the study's CSVs."""
    runs = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(directory, "*__*__*.csv"))):
        task, script, seed = os.path.basename(path)[: -len(".csv")].split("__")
        scalars = defaultdict(list)
        with open(path) as f:
            for row in csv.DictReader(f):
                if row["tag"] != "command":
                    scalars[row["tag"]].append((int(row["step"]), float(row["value"])))
        runs[task, script][int(seed)] = dict(scalars)
    return runs


def order(scripts):
    return sorted(scripts, key=lambda s: (list(NAMES).index(s) if s in NAMES else len(NAMES), s))


def evals(run):
    """The run's deterministic evaluations {step: return}; at a GoRL stage end, the one before the refit."""
    out = {}
    for step, value in run["eval/episodic_return"]:
        out.setdefault(step, value)
    return out


def refits(run):
    """[(step, before, after)]: the evaluation at a stage's end and the new decoder's with the restarted encoder."""
    before = evals(run)
    return [(step, before[step], after) for step, after in run.get("gorl/eval_after_refit", [])]


def curves(runs, path):
    """One panel per task, one line per script."""
    tasks = sorted({task for task, _ in runs})
    panels = {}
    for task in tasks:
        panels[task] = [(NAMES.get(script, script), runs[task, script]) for script in order({s for t, s in runs if t == task})]
    draw(panels, path)


def ablation_curves(study, runs, ablations, path):
    """One panel per task and script the ablations ran: the study's own runs beside each ablation study's (Fig. 4)."""
    panels = {}
    for task, script in sorted({key for abl_runs in ablations.values() for key in abl_runs}):
        lines = [(f"{study} (default)", runs[task, script])]
        lines += [(ablation, abl_runs[task, script]) for ablation, abl_runs in ablations.items() if (task, script) in abl_runs]
        panels[f"{task}, {NAMES.get(script, script)}"] = lines
    draw(panels, path)


def line_colors(panels):
    """{label: color}: a method keeps its color in every panel, in the order the methods first appear."""
    labels = list(dict.fromkeys(label for lines in panels.values() for label, _ in lines))
    return {label: f"C{i % 10}" for i, label in enumerate(labels)}


def draw(panels, path):
    """{title: [(label, {seed: run})]}: one panel per title, each line the mean and min-max over seeds, refits dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(panels), 3)  # rows of at most 3 panels stay readable at the README's width
    rows = int(np.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:  # the last row's empty places
        ax.set_axis_off()
    colors = line_colors(panels)
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        for label, seeds in lines:
            color = colors[label]
            steps = sorted(set.intersection(*(set(evals(r)) for r in seeds.values())))  # evaluated by every seed
            ys = np.array([[evals(r)[s] for s in steps] for r in seeds.values()])
            seed_word = "seed" if len(seeds) == 1 else "seeds"
            ax.plot(steps, ys.mean(0), color=color, label=f"{label} ({len(seeds)} {seed_word})")
            ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.15)
            for step, _, _ in refits(next(iter(seeds.values()))):
                ax.axvline(step, color=color, linestyle=":", linewidth=1, alpha=0.7)
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("deterministic evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(runs):
    tasks = sorted({task for task, _ in runs})
    lines = ["| method | " + " | ".join(f"{t} final eval" for t in tasks) + " | training SPS | wall clock per run |",
             "|---" * (len(tasks) + 3) + "|"]
    for script in order({s for _, s in runs}):
        cells, sps, seconds = [], [], []
        for task in tasks:
            seeds = runs.get((task, script), {})
            finals = np.array([r["eval/episodic_return"][-1][1] for r in seeds.values()])
            sps += [r["charts/SPS"][-1][1] for r in seeds.values() if "charts/SPS" in r]
            seconds += [r["wall_clock_seconds"][0][1] for r in seeds.values()]
            cells.append(f"{finals.mean():.1f} +- {finals.std():.1f} ({len(finals)})" if len(finals) else "-")
        lines.append(f"| {NAMES.get(script, script)} | " + " | ".join(cells) + f" | {np.mean(sps):,.0f} | "
                     f"{np.mean(seconds) / 60:.0f} min |")
    paper_tasks = [t for t in tasks if t in PAPER_TASKS]
    if paper_tasks:  # the paper's numbers beside ours, labelled with how much larger its budget is
        budget = max(run["eval/episodic_return"][-1][0] for (task, _), seeds in runs.items() if task in paper_tasks
                     for run in seeds.values())
        caption = (f"The paper's Table 1 for these tasks: 180M steps, {180e6 / budget:.0f}x the {budget / 1e6:.1f}M steps of "
                   "these runs (5 seeds; MuJoCo Playground's JAX ports on GPUs, not dm_control):")
        header = "| method | " + " | ".join(f"{t} at 180M steps" for t in paper_tasks) + " |"
        lines += ["", caption, "", header, "|---" * (len(paper_tasks) + 1) + "|"]
        for script, row in PAPER_TABLE1.items():
            cells = [row[PAPER_TASKS.index(t)] for t in paper_tasks]
            lines.append(f"| {NAMES[script]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stages_table(runs):
    lines = ["| task | method | seed | stage ends | right after each refit (after / before) |", "|---|---|---|---|---|"]
    ratios, medians = [], []
    for (task, script), seeds in sorted(runs.items()):
        all_ends, group = [], []
        for seed, run in sorted(seeds.items()):
            if "gorl/eval_after_refit" not in run:
                continue
            points = refits(run)
            ends = [before for _, before, _ in points] + [run["eval/episodic_return"][-1][1]]
            group += [after / before for _, before, after in points if before > 0]
            after, all_ends = ", ".join(f"{a:.1f} ({a / b:.2f})" for _, b, a in points), all_ends + [ends]
            cells = [task, NAMES.get(script, script), seed, ", ".join(f"{e:.1f}" for e in ends), after]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        if all_ends and len({len(e) for e in all_ends}) == 1:  # the median over seeds of each stage's end
            m = np.median(all_ends, 0)
            medians.append(f"- {task}, {NAMES.get(script, script)} ({len(all_ends)} seeds): median stage ends "
                           f"{', '.join(f'{e:.1f}' for e in m)}; each above the one before: {bool(np.all(np.diff(m) > 0))}; "
                           f"refits after / before median {np.median(group):.2f}, min {min(group):.2f}")
        ratios += group
    if ratios:
        lines.append(f"\nafter / before over {len(ratios)} refits: median {np.median(ratios):.2f}, min {min(ratios):.2f}\n")
    lines += medians
    return "\n".join(lines) + "\n"


def flags(directory, task, script, seed):
    """What the run's command adds to the preset's own (`python SCRIPT.py cpu --env-id TASK --seed N`)."""
    with open(os.path.join(directory, f"{task}__{script}__{seed}.csv")) as f:
        command = next(row["value"] for row in csv.DictReader(f) if row["tag"] == "command")
    preset = f"python {script}.py cpu --env-id {task} --seed {seed}"
    if not command.startswith(preset):
        raise SystemExit(f"error: {directory} {task} {script} seed {seed} is not a run of the cpu preset: {command!r}")
    return command[len(preset):].strip()


def summary(seeds):
    """Per seed, the final evaluation and the refits' median after / before; the table's cells: final evaluation mean +-
    std (seeds), the refits' after / before median (min) and the median stage ends."""
    finals = np.array([run["eval/episodic_return"][-1][1] for run in seeds.values()])
    per_seed = [[after / before for _, before, after in refits(run) if before > 0] for run in seeds.values()]
    ratios = [ratio for seed_ratios in per_seed for ratio in seed_ratios]
    seed_ratios = np.array([np.median(r) for r in per_seed if r])
    ends = [[before for _, before, _ in refits(run)] + [run["eval/episodic_return"][-1][1]] for run in seeds.values()]
    cells = [f"{finals.mean():.1f} +- {finals.std():.1f} ({len(finals)})"]
    cells.append(f"{np.median(ratios):.2f} ({min(ratios):.2f})" if ratios else "-")
    cells.append(", ".join(f"{e:.1f}" for e in np.median(ends, 0)) if len({len(e) for e in ends}) == 1 else "-")
    return finals, seed_ratios, cells


def compare(values, default):
    """`lower` (`higher`) where every seed's value is below (above) every default seed's, else `no separation`."""
    if len(values) == 0 or len(default) == 0:
        return "-"
    if values.max() < default.min():
        return "lower"
    if values.min() > default.max():
        return "higher"
    return "no separation"


def ablations_table(results, study, runs, ablations):
    """Per task and script, the study's own runs (the default), then each ablation study's: a difference counts where
    the seeds' final evaluations do not overlap."""
    lines = ["| task | method | study | flags | final eval | refits after / before median (min) | median stage ends "
             "| the paper | at this budget: final eval, refits (seeds do not overlap) |", "|---" * 9 + "|"]
    for task, script in sorted({key for abl_runs in ablations.values() for key in abl_runs}):
        if (task, script) not in runs:
            raise SystemExit(f"error: {study} has no {script} runs on {task} to set the ablations against")
        name = NAMES.get(script, script)
        default, default_ratios, cells = summary(runs[task, script])
        lines.append(f"| {task} | {name} | {study} | (default) | " + " | ".join(cells) + " | | |")
        for ablation, abl_runs in ablations.items():
            seeds = abl_runs.get((task, script))
            if not seeds:
                continue
            switches = {flags(os.path.join(results, ablation), task, script, seed) for seed in seeds}
            if len(switches) != 1 or not switches <= set(PAPER_ABLATIONS):
                raise SystemExit(f"error: {ablation} is not one of the paper's ablations {list(PAPER_ABLATIONS)}: "
                                 f"its runs add {sorted(switches)}")
            switch = switches.pop()
            finals, seed_ratios, cells = summary(seeds)
            verdict = f"final eval {compare(finals, default)}, refits {compare(seed_ratios, default_ratios)}"
            lines.append(f"| {task} | {name} | {ablation} | `{switch}` | " + " | ".join(cells) +
                         f" | {PAPER_ABLATIONS[switch]} | {verdict} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="default")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmark", "results"))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--update", action="store_true", help="write next to the CSVs: the study's committed figure "
                       "and tables")
    p.add_argument("--ablations", nargs="+", default=[], help="studies of the paper's ablations to set against this "
                   "one's runs of the same task and script (writes ablations.md)")
    where.add_argument("--out", help="the directory to write to (default: <tmp>/gorl-clean-plots/<study>)")
    args = p.parse_args()
    directory = os.path.join(args.results, args.study)
    runs = load(directory)
    if not runs:
        raise SystemExit(f"error: no run CSVs in {directory!r}")
    ablations = {}
    for ablation in args.ablations:
        ablations[ablation] = load(os.path.join(args.results, ablation))
        if not ablations[ablation]:
            raise SystemExit(f"error: no run CSVs in {os.path.join(args.results, ablation)!r}")
    # A look at a study in progress must not change its committed figure and tables: only --update writes there.
    out = args.out or os.path.join(tempfile.gettempdir(), "gorl-clean-plots", args.study)
    if args.update:
        out = directory
    os.makedirs(out, exist_ok=True)
    curves(runs, os.path.join(out, "curves.png"))
    tables = [("results.md", results_table(runs)), ("stages.md", stages_table(runs))]
    if ablations:
        tables.append(("ablations.md", ablations_table(args.results, args.study, runs, ablations)))
        ablation_curves(args.study, runs, ablations, os.path.join(out, "ablations.png"))
    for name, text in tables:
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
        print(text)
    figures = "curves.png and ablations.png" if ablations else "curves.png"
    print(f"wrote {figures} and {', '.join(name for name, _ in tables)} in {out}" + ("" if args.update else
          f" (a scratch directory: --update writes them into {directory})"))


if __name__ == "__main__":
    main()
