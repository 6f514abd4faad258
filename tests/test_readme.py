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


TABLE1_SCRIPTS = ["ppo_gaussian.py", "fpo.py", "dppo.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py"]
TABLE1_TASKS = ["CheetahRun", "FingerSpin", "FingerTurnHard", "FishSwim", "HopperStand", "WalkerWalk"]


def table1_commands():
    """[(script, [flags])] of the README's "Reproducing Table 1" block, line continuations joined and the shell
    variables it defines expanded."""
    readme = read("README.md")
    section = readme[readme.index("## Reproducing Table 1"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("\n```", start)]
    variables = dict(re.findall(r'^(\w+)="([^"]*)"', block, flags=re.M))
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("python "):
            words = line.split()[1:]
            flags = [w for word in words[1:] for w in (variables[word[1:]].split() if word.startswith("$") else [word])]
            commands.append((words[0], flags))
    return commands


def test_table1_commands_cover_every_method_and_task_once():
    commands = table1_commands()
    pairs = [(script, flags[flags.index("--env-id") + 1]) for script, flags in commands]
    assert sorted(pairs) == sorted((s, t) for s in TABLE1_SCRIPTS for t in TABLE1_TASKS), pairs
    for script, flags in commands:
        names = [f for f in flags if f.startswith("--")]
        assert len(names) == len(set(names)), (script, flags)  # no flag given twice (the last would silently win)


def test_table1_commands_parse_and_pass_the_scripts_checks():
    # Each script's own parser (tyro) and its argument checks, without running main: a typo, a stale flag or a
    # per-stage list of the wrong length fails here.
    import tyro

    from conftest import load_script

    modules = {name: load_script(name) for name in TABLE1_SCRIPTS}
    for script, flags in table1_commands():
        m = modules[script]
        try:
            args = tyro.cli(m.Args, args=flags)
            m.check_args(args)
        except SystemExit as e:
            raise AssertionError(f"{script} {' '.join(flags)}: exit {e.code}") from None
        assert args.total_timesteps == 180_000_000, (script, flags)
