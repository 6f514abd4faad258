"""Checkpoints and resume. A resumed run restores every network, optimizer, normalizer, replay buffer, RNG, counter and
GoRL's stage state exactly; its envs start new episodes. A run killed with SIGKILL mid-run and resumed from its last
checkpoint finishes in the same log directory, logging each step once. Checkpoints load with weights_only=True; a
truncated file, another script's or another task's checkpoint is refused with one line."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, only_run_dir, read_scalars, run_inprocess, run_main

# 4 envs on the dm_control backend, 8-step unrolls: tiny iterations, a checkpoint after every one.
TINY_PPO = ["--env-backend", "dm_control", "--num-envs", "4", "--batch-size", "4", "--num-minibatches", "2", "--unroll-length", "8",
            "--update-epochs", "2", "--num-eval-envs", "2", "--eval-every", "100000", "--checkpoint-every", "64"]
GORL = ["--stage-weights", "1", "1", "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "2",
        "--decoder-batch-size", "256"]
RUNS = {
    # 40 iterations: the kill lands right after the first checkpoint, long before the end, on any machine.
    "ppo_gaussian.py": ["--env-id", "CartpoleBalance", *TINY_PPO, "--total-timesteps", "1280"],
    # 40 iterations in stages of 20 and 20: the kill lands in stage 0, so the resumed run refits the decoder.
    "gorl_ppo_fm.py": ["--env-id", "Hopper-v5", *TINY_PPO, "--total-timesteps", "1280", *GORL],
    # Hopper-v5: episodes end within tens of steps, so the replay buffer holds terminations and env resets.
    # SAC logs, evaluates and checkpoints every 1000 env steps.
    "sac_gaussian.py": ["--env-id", "Hopper-v5", "--env-backend", "dm_control", "--num-envs", "2", "--total-timesteps", "3000",
                        "--learning-starts", "200", "--utd-ratio", "0.25", "--batch-size", "32", "--num-eval-envs", "1",
                        "--eval-every", "1000", "--checkpoint-every", "1000"],
}
RUNS["gorl_ppo_diff.py"] = RUNS["gorl_ppo_fm.py"]
RUNS["fpo.py"] = RUNS["dppo.py"] = RUNS["ppo_gaussian.py"]
RUNS["gorl_sac_diff.py"] = RUNS["sac_gaussian.py"] + GORL
SLOW = {"gorl_ppo_diff.py", "fpo.py", "dppo.py", "gorl_sac_diff.py"}  # their kill-and-resume runs; the restore test is in CI


def same(a, b, where):
    """Tensors, numbers and nested dicts/lists (state_dicts, optimizer states) equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert repr(a) == repr(b), where  # repr: nan == nan


@pytest.mark.parametrize("name", list(RUNS))
def test_resume_restores_every_module_rng_and_counter(name, tmp_path, monkeypatch):
    """Resuming a finished run's last checkpoint leaves nothing to train: main restores and returns, so its state at
    the return is what --resume restored. A restore that skipped any module, the RNG or a counter fails here."""
    run_main(name, RUNS[name], tmp_path, monkeypatch)
    path = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    saved = torch.load(path, weights_only=True)
    torch.manual_seed(12345)  # the restore must set the RNG, not find it in place
    g = run_main(name, ["--resume", path], tmp_path, monkeypatch)
    modules = g["run_modules"]() if "run_modules" in g else g["modules"]
    assert set(modules) == {k for k in saved if k not in ("script", "args", "backend", "run_name", "loop", "rng")}
    for key, module in modules.items():
        same(module.state_dict(), saved[key], key)
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    for counter in ("global_step", "iteration", "step", "updates", "stage", "stage_start", "refine_steps", "train_return"):
        if counter in saved["loop"]:
            same(g["loop"][counter], saved["loop"][counter], counter)
    if "log_alpha" in saved["loop"]:
        same(g["sac"].log_alpha.detach(), saved["loop"]["log_alpha"], "log_alpha")
    assert only_run_dir(tmp_path) == os.path.dirname(path)


def start(name, args, cwd):
    env = dict(os.environ, MUJOCO_GL="disable", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def losses(run_dir):
    return {tag: values for tag, values in read_scalars(run_dir).items() if tag.startswith(("losses/", "decoder/", "eval/", "gorl/"))}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in RUNS])
def test_a_killed_run_resumes_from_its_last_checkpoint_and_logs_each_step_once(name, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    process = start(name, RUNS[name], straight)
    assert process.wait(timeout=600) == 0, process.stdout.read()[-3000:]

    # SIGKILL as soon as the first checkpoint appears (it is renamed into place whole): the kill lands early in the run,
    # wherever the run is then (no timing: the run has most of its steps left on any machine).
    process = start(name, RUNS[name], killed)
    while not glob.glob(str(killed / "runs" / "*" / "checkpoint.pt")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before the kill"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    run_dir = only_run_dir(killed)
    path = os.path.join(run_dir, "checkpoint.pt")
    checkpoint = torch.load(path, weights_only=True)  # plain tensors and values: nothing to execute
    total = int(RUNS[name][RUNS[name].index("--total-timesteps") + 1])
    assert 0 < checkpoint["loop"]["global_step"] < total
    if name.startswith("gorl_ppo"):
        assert checkpoint["loop"]["stage"] == 0, "the resumed run must cross the stage boundary"

    process = start(name, ["--resume", path], killed)
    out = process.communicate(timeout=600)[0]
    assert process.returncode == 0, out[-3000:]
    assert only_run_dir(killed) == run_dir  # the same tensorboard run, continued
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)["loop"] for d in (only_run_dir(straight), run_dir))
    assert a["global_step"] == b["global_step"] == total and a.get("stage") == b.get("stage")
    logged_a, logged_b = losses(only_run_dir(straight)), losses(run_dir)
    assert logged_a.keys() == logged_b.keys()
    for tag in logged_a:  # the killed run's logs after its checkpoint were dropped: every step once, none missing
        steps = [step for step, _ in logged_b[tag]]
        assert steps == sorted(set(steps)) and set(steps) == {step for step, _ in logged_a[tag]}, tag


@pytest.mark.parametrize("name", ["ppo_gaussian.py"])
def test_checkpoints_from_elsewhere_are_refused_with_one_line(name, tmp_path, capsys, monkeypatch):
    args = ["--env-id", "CartpoleBalance", *TINY_PPO, "--total-timesteps", "64"]
    code, out, err = run_inprocess(name, args, tmp_path, capsys, monkeypatch)
    assert code == 0, err
    path = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")

    code, out, err = run_inprocess(name, ["--resume", path, "--env-id", "CheetahRun"], tmp_path, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "saved run's --env-id CartpoleBalance" in err, err

    code, out, err = run_inprocess("fpo.py", ["--resume", path], tmp_path, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "ppo_gaussian.py" in err, err

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:100_000])
    code, out, err = run_inprocess(name, ["--resume", str(truncated)], tmp_path, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "cannot read checkpoint" in err, err
