"""The README and docs/ stay true: CI runs the README's test command, the front page stays short, and every command in
README.md and docs/*.md names a real script whose own parser and checks accept its flags."""
import glob
import os
import re
import sys

import pytest

from conftest import ROOT, load_script

SCRIPTS = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"]
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
MODULES = {}


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def commands(page):
    """[(script, [flags])] of every command in the page's ```bash blocks that runs a script or a benchmark tool (line
    continuations joined, the block's shell variables expanded, a venv's python too)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)\n```", read(page), flags=re.S):
        variables = dict(re.findall(r'^(\w+)="([^"]*)"', block, flags=re.M))
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = part.split("#")[0].split()
                if len(words) > 1 and words[0].endswith("python") and words[1].endswith(".py"):
                    flags = [w for word in words[2:] for w in (variables[word[1:]].split() if word.startswith("$") else [word])]
                    out.append((words[1], flags))
    return out


def test_ci_runs_the_readme_test_command():
    readme_commands = re.findall(r"^python3 -m venv .*$", read("README.md"), flags=re.M)
    test_command = [c for c in readme_commands if "pytest" in c]
    assert len(readme_commands) == 2 and len(test_command) == 1, readme_commands
    assert test_command[0] in read(".ci/run").splitlines()


def test_the_front_page_fits_in_a_few_screens_and_links_every_docs_page():
    readme = read("README.md")
    assert len(readme) < 20_000, len(readme)
    for page in PAGES[1:]:  # every docs page
        assert f"({page})" in readme and os.path.exists(os.path.join(ROOT, page)), page


# Words that tell how the pages came to be rather than what is true: who ran what, when, in which sitting or ticket.
HISTORY = r"(?i)\b(sessions?|issues? #?\d+|the issue|tickets?|earlier runs?|previously|used to|no longer|I (did|found|ran|tried))\b"


def test_every_readme_command_fits_on_a_short_line_after_the_install_prefix():
    for block in re.findall(r"```bash\n(.*?)\n```", read("README.md"), flags=re.S):
        for line in block.splitlines():
            command = line.split("&&")[-1].split("  #")[0].strip()
            assert len(command) <= 120, command


@pytest.mark.parametrize("page", PAGES)
def test_pages_say_what_is_true_now_not_how_it_came_to_be(page):
    found = sorted({match.group(0) for match in re.finditer(HISTORY, read(page))})
    assert not found, f"{page}: {found}"


@pytest.mark.parametrize("page", PAGES)
def test_every_command_parses_with_its_scripts_own_parser_and_checks(page):
    found = commands(page)
    for script, flags in found:
        if script.startswith("benchmark/"):  # the tools: the file exists and knows each flag
            source = read(script)
            own = flags[: flags.index("--")] if "--" in flags else flags  # after `--`: the scripts' flags
            for flag in {f for f in own if f.startswith("--")} - {"--help"}:
                assert flag[2:].replace("-", "_") in source.replace("-", "_"), (page, script, flag)
            continue
        assert script in SCRIPTS, (page, script)
        m = MODULES.setdefault(script, load_script(script))
        names = [f for f in flags if f.startswith("--")]
        assert len(names) == len(set(names)), (page, script, flags)  # no flag given twice (the last would silently win)
        if any(f in names for f in ("--resume", "--eval-checkpoint", "--help")):  # these read a file or print help
            continue
        try:
            with pytest.MonkeyPatch.context() as patch:  # the script's own command line: preset, flags, checks
                patch.setattr(sys, "argv", [script, *flags])
                m.parse_args()
        except SystemExit as e:
            raise AssertionError(f"{page}: {script} {' '.join(flags)}: exit {e.code}") from None
    if page == "README.md":
        assert {script for script, _ in found} >= set(SCRIPTS), "one command per script on the front page"


TABLE1_SCRIPTS = ["ppo_gaussian.py", "fpo.py", "dppo.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py"]
TABLE1_TASKS = ["CheetahRun", "FingerSpin", "FingerTurnHard", "FishSwim", "HopperStand", "WalkerWalk"]


def test_table1_commands_cover_every_method_and_task_once_at_180m_steps():
    table1 = [(s, f) for s, f in commands("docs/reproducing.md") if f[:1] == ["release"]]
    pairs = [(script, flags[flags.index("--env-id") + 1]) for script, flags in table1]
    assert sorted(pairs) == sorted((s, t) for s in TABLE1_SCRIPTS for t in TABLE1_TASKS), pairs
