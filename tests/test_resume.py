"""Checkpoints and exact resume: a run killed with SIGKILL mid-run and resumed from its last checkpoint ends with the
same weights and logs the same losses as the same run left alone (dm_control backend: its envs' state is saved too).
Checkpoints load with weights_only=True; a truncated file, another script's or another task's checkpoint is refused."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, only_run_dir, read_scalars, run_inprocess

# 4 envs on the dm_control backend, 8-step unrolls: tiny iterations, a checkpoint after every one.
TINY_PPO = ["--env-backend", "dm_control", "--num-envs", "4", "--batch-size", "4", "--num-minibatches", "2", "--unroll-length", "8",
            "--update-epochs", "2", "--num-eval-envs", "2", "--eval-every", "100000", "--checkpoint-every", "64"]
RUNS = {
    "ppo_gaussian.py": ["--env-id", "CartpoleBalance", *TINY_PPO, "--total-timesteps", "384"],
    # 10 iterations in stages of 5 and 5: the kill lands in stage 0, so the resumed run refits the decoder.
    "gorl_ppo_fm.py": ["--env-id", "Hopper-v5", *TINY_PPO, "--total-timesteps", "640", "--stage-weights", "1", "1",
                       "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "2", "--decoder-batch-size", "256"],
    # Hopper-v5: episodes end within tens of steps, so the replay buffer holds terminations and env resets.
    # SAC logs, evaluates and checkpoints every 1000 env steps.
    "sac_gaussian.py": ["--env-id", "Hopper-v5", "--env-backend", "dm_control", "--num-envs", "2", "--total-timesteps", "2000",
                        "--learning-starts", "200", "--utd-ratio", "0.25", "--batch-size", "32", "--num-eval-envs", "1",
                        "--eval-every", "1000", "--checkpoint-every", "1000"],
}
# The other scripts share the checkpoint code; their exact-resume runs are `slow`.
RUNS["gorl_ppo_diff.py"] = RUNS["gorl_ppo_fm.py"]
RUNS["fpo.py"] = RUNS["dppo.py"] = RUNS["ppo_gaussian.py"]
RUNS["gorl_sac_diff.py"] = RUNS["sac_gaussian.py"] + ["--stage-weights", "1", "1", "--refine-episodes", "2", "--refine-num-envs", "2",
                                                      "--decoder-epochs", "2", "--decoder-batch-size", "256"]
SLOW = {"gorl_ppo_diff.py", "fpo.py", "dppo.py", "gorl_sac_diff.py"}


def start(name, args, cwd):
    env = dict(os.environ, MUJOCO_GL="disable", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def losses(run_dir):
    return {tag: values for tag, values in read_scalars(run_dir).items() if tag.startswith(("losses/", "decoder/", "eval/", "gorl/", "charts/episodic"))}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in RUNS])
def test_a_killed_and_resumed_run_ends_exactly_as_an_uninterrupted_one(name, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    process = start(name, RUNS[name], straight)
    assert process.wait(timeout=600) == 0, process.stdout.read()[-3000:]

    # SIGKILL soon after the first checkpoint appears (it is renamed into place whole): the kill lands mid-run, anywhere.
    process = start(name, RUNS[name], killed)
    while not glob.glob(str(killed / "runs" / "*" / "checkpoint.pt")):
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.01)
    time.sleep(0.3)
    assert process.poll() is None, "the run ended before the kill"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    run_dir = only_run_dir(killed)
    path = os.path.join(run_dir, "checkpoint.pt")
    checkpoint = torch.load(path, weights_only=True)  # plain tensors and values: nothing to execute
    assert 0 < checkpoint["loop"]["global_step"] < int(RUNS[name][RUNS[name].index("--total-timesteps") + 1])
    if name == "gorl_ppo_fm.py":
        assert checkpoint["loop"]["stage"] == 0, "the resumed run must cross the stage boundary"

    process = start(name, ["--resume", path], killed)
    out = process.communicate(timeout=600)[0]
    assert process.returncode == 0, out[-3000:]
    assert only_run_dir(killed) == run_dir  # the same tensorboard run, continued

    a = torch.load(os.path.join(only_run_dir(straight), "checkpoint.pt"), weights_only=True)
    b = torch.load(path, weights_only=True)
    assert repr(a["loop"] | {"train_time": 0}) == repr(b["loop"] | {"train_time": 0})  # repr: nan == nan
    for key in [k for k in a if isinstance(a[k], dict) and k not in ("args", "loop", "rng", "envs")]:
        for param, value in a[key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key][param]), (key, param)
    logged_a, logged_b = losses(only_run_dir(straight)), losses(run_dir)
    assert logged_a.keys() == logged_b.keys()
    for tag in logged_a:
        assert logged_a[tag] == logged_b[tag], tag


@pytest.mark.parametrize("name", ["ppo_gaussian.py"])
def test_checkpoints_from_elsewhere_are_refused_with_one_line(name, tmp_path, capsys, monkeypatch):
    args = ["--env-id", "CartpoleBalance", *TINY_PPO, "--total-timesteps", "64"]
    code, out, err = run_inprocess(name, args, tmp_path, capsys, monkeypatch)
    assert code == 0, err
    path = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")

    code, out, err = run_inprocess(name, ["--resume", path, "--env-id", "CheetahRun"], tmp_path, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "--env-id CartpoleBalance" in err, err

    code, out, err = run_inprocess("fpo.py", ["--resume", path], tmp_path, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "ppo_gaussian.py" in err, err

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:100_000])
    code, out, err = run_inprocess(name, ["--resume", str(truncated)], tmp_path, capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "cannot read checkpoint" in err, err
