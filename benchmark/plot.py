"""Learning curves and a results table from the tensorboard files under runs/ (no network, no W&B).

    python benchmark/plot.py --runs runs --out benchmark/results

Writes `curves.png` (deterministic evaluation return against env steps, mean and std over seeds, one panel per
task, GoRL's stage boundaries dashed) and `results.md` (final evaluation return, mean +- std over seeds, in the
layout of the paper's Table 1, plus wall clock per run). A run directory is `<task>__<script>__<seed>__<time>`;
with several runs of one (task, script, seed) the newest counts. `--benchmark-only` keeps the runs that
benchmark/run.py completed.
"""
import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np

NAMES = {"ppo_gaussian": "PPO", "fpo": "FPO", "dppo": "DPPO", "gorl_ppo_diff": "GoRL-Diff", "gorl_ppo_fm": "GoRL-FM",
         "sac_gaussian": "SAC", "gorl_sac_diff": "GoRL-SAC-Diff"}


def load_runs(runs, benchmark_only=False):
    """{(task, script): {seed: run}}, run = {"steps", "returns", "stage_ends", "seconds"}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = {}
    for run_dir in glob.glob(os.path.join(runs, "*__*__*__*")):
        parts = os.path.basename(run_dir).split("__")
        if (
            len(parts) != 4
            or not parts[2].lstrip("-").isdigit()
            or (benchmark_only and not os.path.exists(os.path.join(run_dir, "benchmark.json")))
        ):
            continue
        key = (parts[0], parts[1], int(parts[2]))
        if key not in newest or os.path.getmtime(run_dir) > os.path.getmtime(newest[key]):
            newest[key] = run_dir
    out = defaultdict(dict)
    for (task, script, seed), run_dir in sorted(newest.items()):
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        if "eval/episodic_return" not in tags:
            continue
        evals = acc.Scalars("eval/episodic_return")
        marker = os.path.join(run_dir, "benchmark.json")
        seconds = json.load(open(marker))["seconds"] if os.path.exists(marker) else float("nan")
        out[(task, script)][seed] = {
            "steps": np.array([e.step for e in evals]), "returns": np.array([e.value for e in evals]), "seconds": seconds,
            "stage_ends": [e.step for e in acc.Scalars("gorl/eval_after_refit")] if "gorl/eval_after_refit" in tags else []}
    return out


def order(scripts):
    return sorted(scripts, key=lambda s: (list(NAMES).index(s) if s in NAMES else len(NAMES), s))


def curves(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _ in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, script in enumerate(order({s for t, s in runs if t == task})):
            seeds = runs[(task, script)]
            steps = sorted(set.intersection(*(set(r["steps"].tolist()) for r in seeds.values())))  # evaluated by every seed
            ys = np.array([[r["returns"][r["steps"].tolist().index(s)] for s in steps] for r in seeds.values()])
            color = f"C{i}"
            ax.plot(steps, ys.mean(0), color=color, label=f"{NAMES.get(script, script)} ({len(seeds)})")
            ax.fill_between(steps, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.15)
            for end in next(iter(seeds.values()))["stage_ends"]:
                ax.axvline(end, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_title(task)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs):
    tasks = sorted({task for task, _ in runs})
    lines = ["| Method | " + " | ".join(tasks) + " | wall clock per run |", "|---" * (len(tasks) + 2) + "|"]
    for script in order({s for _, s in runs}):
        cells, seconds = [], []
        for task in tasks:
            seeds = runs.get((task, script), {})
            finals = np.array([r["returns"][-1] for r in seeds.values()])
            seconds += [r["seconds"] for r in seeds.values()]
            cells.append(f"{finals.mean():.1f} +- {finals.std():.1f} ({len(finals)})" if len(finals) else "-")
        known = [x for x in seconds if np.isfinite(x)]
        wall = f"{np.mean(known) / 60:.1f} min" if known else "-"
        lines.append(f"| {NAMES.get(script, script)} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default=os.path.join("benchmark", "results"))
    p.add_argument("--benchmark-only", action="store_true", help="only runs that benchmark/run.py completed")
    args = p.parse_args()
    runs = load_runs(args.runs, args.benchmark_only)
    if not runs:
        raise SystemExit(f"error: no runs with eval/episodic_return under {args.runs!r}")
    os.makedirs(args.out, exist_ok=True)
    curves(runs, os.path.join(args.out, "curves.png"))
    md = ("Final deterministic evaluation return, mean +- std over seeds (number of seeds); the layout of the paper's "
          "Table 1. Wall clock is the mean over a method's runs.\n\n" + table(runs))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {os.path.join(args.out, 'curves.png')} and {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    main()
