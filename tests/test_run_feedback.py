"""A run says where it is and how to go on: the refit's start before its minutes of work, a summary at the end with the
command that evaluates the result again, the step a resumed run continues from, the `--resume` command on Ctrl-C, and
one line (no PyTorch advice) for a file that is not a checkpoint or a checkpoint that cannot be written."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, only_run_dir, run_inprocess, run_script

TINY = ["--env-id", "CartpoleBalance", "--env-backend", "dm_control", "--num-envs", "2", "--unroll-length", "8", "--batch-size", "2",
        "--num-minibatches", "8", "--update-epochs", "1", "--num-eval-envs", "2", "--eval-every", "100000"]
REFIT = ["--stage-weights", "1", "1", "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "1",
         "--decoder-batch-size", "256"]


def test_a_run_ends_with_its_summary_and_a_refit_is_announced_after_its_iteration(tmp_path):
    r = run_script("gorl_ppo_fm.py", [*TINY, *REFIT, "--total-timesteps", "256", "--save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    first_iteration = next(i for i, line in enumerate(lines) if line.startswith("iter 1/2"))
    announced = next(i for i, line in enumerate(lines) if line.startswith("stage 0 refit: 2 episodes on 2 envs"))
    fitted = next(i for i, line in enumerate(lines) if line.startswith("stage 0 refit: ") and "decoder loss" in line)
    assert first_iteration < announced < fitted, lines  # the stage's last iteration, then the refit, start to end
    run_dir = os.path.relpath(only_run_dir(tmp_path), tmp_path)
    assert lines[-2].startswith("done in ") and "eval/episodic_return=" in lines[-2] and "global_step=256" in lines[-2], lines
    model = f"{run_dir}/gorl_ppo_fm.cleanrl_model"
    assert lines[-1] == f"logs: {run_dir}; evaluate again: python gorl_ppo_fm.py --eval-checkpoint {model}", lines
    # The printed command works, on another number of episodes too, and says where the video would go.
    r = run_script("gorl_ppo_fm.py", ["--eval-checkpoint", model, "--num-eval-envs", "3"], tmp_path)
    assert r.returncode == 0 and "(3 episodes)" in r.stdout, r.stdout + r.stderr
    r = run_script("gorl_ppo_fm.py", ["--resume", f"{run_dir}/checkpoint.pt"], tmp_path)
    assert r.returncode == 0 and "at global_step=256" in r.stdout, r.stdout + r.stderr


def test_ctrl_c_ends_with_the_resume_command(tmp_path):
    env = dict(os.environ, MUJOCO_GL="disable", PYTHONUNBUFFERED="1")
    args = [*TINY, "--total-timesteps", "1000000", "--checkpoint-every", "128"]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo_gaussian.py"), *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    run_dir = os.path.relpath(only_run_dir(tmp_path), tmp_path)
    assert process.returncode == 2, err
    assert err.strip().splitlines() == [f"error: interrupted; to continue from the last checkpoint: python ppo_gaussian.py "
                                        f"--resume {run_dir}/checkpoint.pt"], err


@pytest.mark.parametrize("content", [os.urandom(100_000), b"not a zip file"])
def test_a_file_that_is_no_checkpoint_gets_one_line_without_pytorch_advice(tmp_path, capsys, monkeypatch, content):
    (tmp_path / "c.pt").write_bytes(content)
    for flag in ["--resume", "--eval-checkpoint"]:
        code, _, err = run_inprocess("gorl_ppo_fm.py", [flag, "c.pt"], tmp_path, capsys, monkeypatch)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "not a whole checkpoint" in lines[0] and "weights_only" not in err, err


def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    saved = []
    original = torch.save

    def full_disk(obj, path, *a, **k):  # the first checkpoint is written, the second finds the disk full
        if saved:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2948544 vs 2948432")
        saved.append(path)
        return original(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_inprocess("ppo_gaussian.py", [*TINY, "--total-timesteps", "512", "--checkpoint-every", "128"], tmp_path,
                                 capsys, monkeypatch)
    lines = err.strip().splitlines()
    path = os.path.join("runs", os.path.basename(only_run_dir(tmp_path)), "checkpoint.pt")
    assert code == 2 and len(lines) == 1 and "cannot write the checkpoint" in lines[0], err
    assert f"the last complete one is {path}" in lines[0] and "unexpected pos" in lines[0], err
    assert torch.load(tmp_path / path, weights_only=True)["loop"]["global_step"] == 128  # still whole, resumable


def test_the_readmes_snippet_loads_a_saved_policy_and_acts(tmp_path):
    import re

    r = run_script("gorl_ppo_fm.py", [*TINY, "--total-timesteps", "128", "--stage-weights", "1", "--save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = os.path.basename(only_run_dir(tmp_path))
    snippet = re.search(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S).group(1)
    snippet = snippet.replace('"gorl_ppo_fm.py"', repr(os.path.join(ROOT, "gorl_ppo_fm.py"))).replace("runs/RUN/", f"runs/{run}/")
    check = "\nassert action.shape == (1, 1) and abs(action).max() <= 1 and valid.all(), action\nprint('acted')\n"
    out = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, MUJOCO_GL="disable"))
    assert out.returncode == 0 and out.stdout.strip().endswith("acted"), out.stdout + out.stderr
