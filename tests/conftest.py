"""Shared test helpers. The scripts are single files by design; tests load them by path."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")  # headless: no GLFW window system warnings

# The in-process tests run tiny networks on a few envs, where one thread is faster than a pool that spins on both
# cores (and never oversubscribes the machine while a subprocess runs). Subprocesses keep the scripts' own setting.
# With two test workers (pytest.ini) each worker and each script it starts uses one thread: two runs share the two
# cores instead of four thread pools spinning on them.
os.environ["OMP_NUM_THREADS"] = "1"
# The suite runs on the CPU, on a GPU box too (the scripts it starts inherit this): test_devices.py fakes the device.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    """Imports a top-level script as a module (its main loop sits behind `if __name__ == "__main__"`)."""
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, args, cwd, timeout=600):
    """Runs a script in a subprocess from `cwd` (so its runs/ lands there) and returns the CompletedProcess."""
    env = dict(os.environ, MUJOCO_GL="disable")
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def read_scalars(run_dir):
    """All scalars of a run's tensorboard events: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run_dir(cwd):
    dirs = glob.glob(os.path.join(cwd, "runs", "*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def has_envpool():
    try:
        import envpool  # noqa: F401

        return True
    except ImportError:
        return False


BACKENDS = ["dm_control", pytest.param("envpool", marks=pytest.mark.skipif(not has_envpool(), reason="envpool not installed"))]
# End-to-end runs: CI runs them on the backend `auto` picks (EnvPool where installed); the other one is `slow`.
E2E_BACKENDS = ([pytest.param("dm_control", marks=pytest.mark.slow), "envpool"] if has_envpool() else
                ["dm_control", pytest.param("envpool", marks=pytest.mark.skip(reason="envpool not installed"))])


def run_main(name, args, cwd, monkeypatch, function="main"):
    """Runs a script's `main` in this process, as its command line would, and returns the local variables of its
    `function` at its last return (main's `loop`, `obs_rms`, `agent`, ...; `ppo_update`'s last minibatch): a profile hook
    copies them from the function's frame."""
    import runpy

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [name, *args])
    captured, path = {}, os.path.join(ROOT, name)

    def hook(frame, event, arg):
        if event == "return" and frame.f_code.co_filename == path and frame.f_code.co_name == function:
            captured.update(frame.f_locals)
        if event == "return" and frame.f_code.co_filename == path and frame.f_code.co_name == "ppo_update":
            captured["update"] = dict(frame.f_locals)  # the last update's minibatch, beside main's locals

    sys.setprofile(hook)
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.setprofile(None)
    return captured


def run_inprocess(name, args, cwd, capsys, monkeypatch):
    """Runs a script's main in this process (no new interpreter, so no repeated imports: a fraction of a second for
    the bad-input checks). Returns (exit code, stdout, stderr); an uncaught exception propagates and fails the test."""
    import runpy

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [name, *args])
    capsys.readouterr()
    try:
        runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err
