"""Form rules that hold for every script: the reading order (docstring, imports, Args, the algorithm, `def main`, one
plumbing banner, the plumbing, the `__main__` line), the plumbing block byte-identical in all seven scripts and under
its ceiling, the line and function ceilings, CleanRL's 127-character lines (ruff, pinned in
requirements.txt, with this repository's ruff.toml), the paper's vocabulary in the GoRL scripts, no references to files
outside the repository."""
import ast
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
PLUMBING_BANNER = ("# ---- plumbing: the same in every script, and not the algorithm (environments, evaluation, checkpoints, "
                   "logging) ----")
MAIN_LINE = 'if __name__ == "__main__":\n    main(parse_args())\n'
# Ceilings, not targets (line and diff sizes are reported by docs/implementation.md, not asserted): readable code first.
MAX_PLUMBING = 370
MAX_LINES = 1310
MAX_TUPLE_PACKING = 5  # `a, b = x, y` assignments per script; unpacking what a call returns is fine
MAX_FUNCTION = 130  # lines of the longest function or class method
DIFF_PAIRS = [("ppo_gaussian.py", "gorl_ppo_fm.py"), ("gorl_ppo_fm.py", "gorl_ppo_diff.py"), ("ppo_gaussian.py", "fpo.py"),
              ("ppo_gaussian.py", "dppo.py"), ("sac_gaussian.py", "gorl_sac_diff.py")]


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def plumbing(name):
    """The plumbing block: from its banner to the line before `if __name__`, as the before-stop report counts it."""
    source = read(name)
    return source[source.index(PLUMBING_BANNER) : source.index('if __name__ == "__main__":')]


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
def test_every_line_within_127_characters_and_the_file_within_its_budget(name):
    lines = read(name).splitlines()
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 127]
    assert not long, f"{name}: lines over 127 characters: {long}"
    assert len(lines) <= MAX_LINES, f"{name}: {len(lines)} lines, ceiling {MAX_LINES}"


def tuple_packing(source):
    """Line numbers of `a, b = x, y` assignments: a tuple target and a literal tuple value (not a call's returns)."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Tuple) and any(isinstance(target, ast.Tuple) for target in node.targets)]


def test_tuple_packing_counter_sees_packing_and_not_unpacking():
    assert tuple_packing("a, b = 1, 2\nc = 3\nd, e = f()\n(g, h) = (i, j)\n") == [1, 4]


@pytest.mark.parametrize("name", SCRIPTS)
def test_one_assignment_per_line_and_no_overlong_function(name):
    source = read(name)
    packed = tuple_packing(source)
    assert len(packed) <= MAX_TUPLE_PACKING, f"{name}: tuple-packing assignments at lines {packed}"
    functions = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)]
    longest = max(functions, key=lambda node: node.end_lineno - node.lineno)
    assert longest.end_lineno - longest.lineno + 1 <= MAX_FUNCTION, f"{name}: {longest.name} is too long"


@pytest.mark.parametrize("name", SCRIPTS)
def test_reading_order_algorithm_first_then_main_then_the_plumbing(name):
    """Docstring, imports, Args, the algorithm, `def main`, the banner, the plumbing, the `__main__` line (the last)."""
    source = read(name)
    body = ast.parse(source).body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), f"{name} opens with its docstring"
    names = [node.name for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert names[0] == "Args" and "main" in names, names
    banner_line = source[: source.index(PLUMBING_BANNER)].count("\n") + 1
    main = next(node for node in body if isinstance(node, ast.FunctionDef) and node.name == "main")
    algorithm = [node for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno < main.lineno]
    assert len(algorithm) > 3 and main.end_lineno < banner_line, "the algorithm and main come before the plumbing banner"
    assert source.count(PLUMBING_BANNER) == 1 and source.endswith("\n\n\n" + MAIN_LINE), "one banner; the __main__ line last"
    assert all(not (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == "main") for node in body[body.index(main) + 1:])


def test_the_plumbing_is_byte_identical_in_every_script_and_within_its_ceiling():
    blocks = {name: plumbing(name) for name in SCRIPTS}
    reference = blocks["ppo_gaussian.py"]
    for name, block in blocks.items():
        diff = "\n".join(list(difflib.unified_diff(reference.splitlines(), block.splitlines(), "ppo_gaussian.py", name, lineterm="", n=0))[:20])
        assert block == reference, f"{name}'s plumbing differs from ppo_gaussian.py's:\n{diff}"
    assert reference.count("\n") <= MAX_PLUMBING, f"the plumbing is {reference.count(chr(10))} lines, budget {MAX_PLUMBING}"


@pytest.mark.parametrize("name", GORL)
def test_gorl_scripts_name_algorithm_1s_parts(name):
    source = read(name)
    for words in ["Phase 1", "Phase 2", "re-initialization", "kl_to_prior", "collect_refinement_data", "fit_decoder"]:
        assert words in source, f"{name} never says {words!r}"
    main = source[source.index("\ndef main(args):") : source.index(PLUMBING_BANNER)]
    assert "# Phase 2" in main and "re-initialization" in main, "the stage loop must say where Phase 2 and the restart happen"
    assert not re.search(r"^\s*global ", source, re.M), "no globals: the loop's state lives in the loop"


def test_no_references_outside_the_repository():
    docs = [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]
    for name in SCRIPTS + ["README.md"] + docs:
        assert "SPEC.md" not in read(name) and "../shared" not in read(name), name


def test_docs_show_the_current_sizes():
    """docs/implementation.md's table of line counts and diff sizes is the measured one."""
    text = read("docs/implementation.md")
    rows = dict(((a, b), int(n)) for a, b, n in re.findall(r"^\| `(\S+) (\S+)` \| (\d+) \|$", text, re.M))
    assert set(rows) == set(DIFF_PAIRS), rows
    for pair, n in rows.items():
        assert n == changed_lines(*pair), f"docs/implementation.md's diff table is stale for {pair}"
    lines = dict((name, int(n)) for name, n in re.findall(r"^\| `(\S+\.py)` \| (\d+) \|", text, re.M))
    assert lines == {name: len(read(name).splitlines()) for name in SCRIPTS}, "docs/implementation.md's line counts are stale"
