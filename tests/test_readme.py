"""The README's front door stays true: CI runs its test command, and its commands name real scripts and flags."""
import os
import re

from conftest import ROOT


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme_commands = re.findall(r"^python3 -m venv .*$", read("README.md"), flags=re.M)
    test_command = [c for c in readme_commands if "pytest" in c]
    assert len(test_command) == 1, readme_commands
    assert test_command[0] in read(".ci/run").splitlines()


def test_readme_commands_use_existing_scripts_and_flags():
    readme = read("README.md")
    commands = re.findall(r"python (\w+\.py)((?: --[\w-]+(?: [^\s-][^\s]*)*)*)", readme)
    assert len(commands) >= 6, commands
    for script, flags in re.findall(r"python (\w+\.py)((?: --[\w-]+(?: [^\s-][^\s]*)*)*)", readme):
        source = read(script)
        for flag in set(re.findall(r"--([\w-]+)", flags)) - {"help"}:
            assert flag.replace("-", "_") in source, (script, flag)
