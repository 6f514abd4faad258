"""Readability rules that hold for every script: CleanRL's 127-character lines (ruff, pinned in requirements.txt, with
this repository's ruff.toml), no undefined or unused names, the skeleton/algorithm banners, the paper's vocabulary in
the GoRL scripts, no references to files outside the repository, and `diff` sizes between a script and its baseline."""
import difflib
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"]
GORL = ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"]
SKELETON_BANNER = "# ---- shared skeleton: identical in every script; skip on a first read ----"
ALGORITHM_BANNER = {"ppo_gaussian.py": "PPO", "fpo.py": "FPO", "dppo.py": "DPPO", "sac_gaussian.py": "SAC"}

# Changed lines (`diff` + and - lines) of each variant against its baseline. The targets of issue 14 are met for the
# generative baselines and the decoder swap. The two GoRL diffs hold the whole of GoRL (decoder, refit, stage loop and
# the released runs' per-stage switches) and stay above the issue's 200: these ceilings stop them from growing.
DIFF_BUDGETS = {
    ("ppo_gaussian.py", "gorl_ppo_fm.py"): 368,
    ("gorl_ppo_fm.py", "gorl_ppo_diff.py"): 80,
    ("ppo_gaussian.py", "fpo.py"): 150,
    ("ppo_gaussian.py", "dppo.py"): 150,
    ("sac_gaussian.py", "gorl_sac_diff.py"): 287,
}


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def changed_lines(a, b):
    diff = difflib.unified_diff(read(a).splitlines(), read(b).splitlines(), lineterm="", n=0)
    return sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


def test_ruff_finds_no_long_lines_and_no_undefined_or_unused_names():
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is missing: pip install -r requirements.txt")
    r = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    with open(os.path.join(ROOT, "ruff.toml")) as f:
        assert re.search(r"^line-length = 127$", f.read(), re.M), "ruff.toml must keep CleanRL's 127"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_line_within_127_characters(name):
    long = [i + 1 for i, line in enumerate(read(name).splitlines()) if len(line) > 127]
    assert not long, f"{name}: lines over 127 characters: {long}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_banners_mark_the_skeleton_and_the_algorithm(name):
    source = read(name)
    algorithm = "GoRL" if name in GORL else ALGORITHM_BANNER[name]
    assert source.count(SKELETON_BANNER) == 1
    assert source.index(SKELETON_BANNER) < source.index(f"\n# ---- {algorithm} ----\n") < source.index('if __name__ == "__main__":')


@pytest.mark.parametrize("name", GORL)
def test_gorl_scripts_name_algorithm_1s_parts(name):
    source = read(name)
    for words in ["Phase 1", "Phase 2", "re-initialization", "kl_to_prior", "collect_refinement_data", "fit_decoder"]:
        assert words in source, f"{name} never says {words!r}"
    main = source[source.index('if __name__ == "__main__":') :]
    assert "# Phase 2" in main and "re-initialization" in main, "the stage loop must say where Phase 2 and the restart happen"
    assert not re.search(r"^\s*global ", source, re.M), "no globals: the loop's state lives in the loop"


def test_no_references_outside_the_repository():
    for name in SCRIPTS + ["README.md"]:
        assert "SPEC.md" not in read(name) and "../shared" not in read(name), name


@pytest.mark.parametrize("pair", list(DIFF_BUDGETS))
def test_diff_against_the_baseline_stays_within_budget(pair):
    n = changed_lines(*pair)
    assert n <= DIFF_BUDGETS[pair], f"diff {pair[0]} {pair[1]}: {n} changed lines, budget {DIFF_BUDGETS[pair]}"


def test_readme_shows_the_current_diff_sizes_and_budgets():
    rows = dict(((a, b), (int(n), int(budget))) for a, b, n, budget in
                re.findall(r"^\| `(\S+) (\S+)` \| (\d+) \| (\d+) \|$", read("README.md"), re.M))
    assert set(rows) == set(DIFF_BUDGETS), rows
    for pair, (n, budget) in rows.items():
        assert (n, budget) == (changed_lines(*pair), DIFF_BUDGETS[pair]), f"README's diff table is stale for {pair}"
