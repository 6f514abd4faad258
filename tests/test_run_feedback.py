"""A run says where it is and how to go on: the refit's start before its minutes of work, the step of each shown
evaluation, an ETA that counts evaluations and refits, a warning when the run would take days, a summary at the end with
the command that evaluates the result again, the step a resumed run continues from (and a longer run from a finished
one), the `--resume` command on Ctrl-C, one line (no PyTorch advice) for a file that is not a checkpoint or a checkpoint
that cannot be written, size errors that name the smallest value that works, and --checkpoint-every 0."""
import contextlib
import glob
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, load_script, only_run_dir, run_inprocess, run_script

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
    assert lines[-2].startswith("done in ") and "eval/episodic_return=" in lines[-2] and "at step 256" in lines[-2], lines
    # Each iteration line says at which step its evaluation ran; before the refit, the ETA counts its estimate.
    assert "(at step 128) " in lines[first_iteration] and lines[first_iteration].endswith("min"), lines
    assert "(at step 256) " in lines[-3] and lines[-3].endswith("min"), lines
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


def test_eta_counts_evaluations_and_the_refits_left():
    script = load_script("gorl_ppo_fm.py")
    loop = {"train_time": 60.0, "eval_time": 60.0, "refit_time": 0.0, "stage": 0}
    assert script.eta(loop, 2, 4) == "ETA=2.0min"  # 2 iterations left at (60 + 60) s / 2 each
    assert script.eta(loop, 2, 4, refits_left=2) == "ETA=2.0min+2x refit"  # no refit timed or estimated: named
    loop.update(refit_estimate=60.0)
    assert script.eta(loop, 2, 4, refits_left=2) == "ETA=4.0min"  # before the first refit: its estimate
    loop.update(refit_time=120.0, stage=1)
    assert script.eta(loop, 2, 4, refits_left=2) == "ETA=6.0min"  # and 2 more of the 120 s one


def test_a_run_of_days_warns_after_its_first_steps(tmp_path):
    script = load_script("ppo_gaussian.py")
    args = script.Args(env_id="CheetahRun", total_timesteps=8_640_000)  # at 0.01 s a step: one day
    for seconds_per_step, warned in [(0.015, True), (0.005, False)]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            script.warn_if_long(args, seconds_per_step)
        assert ("about 1.5 days" in out.getvalue() and "python ppo_gaussian.py cpu --env-id CheetahRun" in out.getvalue()) == warned
    # With an optimizer (PPO): nothing until its first update step, then once, with that step's time added.
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        script.warn_if_long(args, 0.01, optimizer, steps_per_update=1e9)
        assert out.getvalue() == ""
        for _ in range(2):
            weight.sum().backward()
            optimizer.step()
    assert out.getvalue().count("warning: ") == 1 and "about 1.0 days" in out.getvalue(), out.getvalue()
    # In the loops: a budget no machine runs in a day warns at the first update step (SAC: after 1000 steps of updates);
    # the tiny runs above and below never do.
    sac = ["--env-id", "CartpoleBalance", "--env-backend", "dm_control", "--num-envs", "2", "--batch-size", "32",
           "--learning-starts", "100", "--utd-ratio", "1", "--num-eval-envs", "2", "--eval-every", "1000"]
    for name, args in [("ppo_gaussian.py", TINY), ("sac_gaussian.py", sac)]:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, name), *args, "--total-timesteps", str(10**12)],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=dict(os.environ, MUJOCO_GL="disable", PYTHONUNBUFFERED="1"))
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith(("warning:", "iter 2/", "global_step=3000 ")):
                break
        process.kill()
        process.communicate()
        assert lines[-1].startswith("warning: at its first steps' pace this run takes about "), lines


def test_resume_runs_a_finished_run_on_to_a_larger_budget(tmp_path):
    r = run_script("ppo_gaussian.py", [*TINY, "--total-timesteps", "300"], tmp_path)
    assert r.returncode == 0 and "(256 of --total-timesteps 300: whole iterations)" in r.stdout, r.stdout + r.stderr
    assert "eval_return=" in r.stdout and " (at step 0) ETA=" in r.stdout.splitlines()[1], r.stdout  # the last evaluation's step
    checkpoint = os.path.join(os.path.relpath(only_run_dir(tmp_path), tmp_path), "checkpoint.pt")
    r = run_script("ppo_gaussian.py", ["--resume", checkpoint, "--total-timesteps", "512"], tmp_path)
    assert r.returncode == 0 and "at global_step=256" in r.stdout and "iter 4/4 global_step=512" in r.stdout, r.stdout + r.stderr
    assert torch.load(tmp_path / checkpoint, weights_only=True)["loop"]["global_step"] == 512
    r = run_script("ppo_gaussian.py", ["--resume", checkpoint, "--total-timesteps", "384"], tmp_path)
    assert r.returncode == 2 and "--total-timesteps 384 is below the 512 steps run" in r.stderr, r.stderr


def test_a_longer_resumed_sac_run_keeps_its_replay_buffer(tmp_path):
    sac = ["--env-id", "CartpoleBalance", "--env-backend", "dm_control", "--num-envs", "2", "--batch-size", "32",
           "--learning-starts", "100", "--utd-ratio", "0.5", "--num-eval-envs", "2", "--eval-every", "100000"]
    r = run_script("sac_gaussian.py", [*sac, "--total-timesteps", "400"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = os.path.join(os.path.relpath(only_run_dir(tmp_path), tmp_path), "checkpoint.pt")
    r = run_script("sac_gaussian.py", ["--resume", checkpoint, "--total-timesteps", "600"], tmp_path)
    assert r.returncode == 0 and "done in" in r.stdout, r.stdout + r.stderr
    rb = torch.load(tmp_path / checkpoint, weights_only=True)["rb"]
    # The 400-row buffer was full; the 600-row one went on after its rows (not over the oldest, leaving 200 empty ones).
    assert rb["size"] == 600 and rb["pos"] == 0 and (rb["data"].abs().sum(1) > 0).all(), (rb["size"], rb["pos"])


def test_checkpoint_every_0_writes_none(tmp_path, capsys, monkeypatch):
    code, out, _ = run_inprocess("ppo_gaussian.py", [*TINY, "--total-timesteps", "256", "--checkpoint-every", "0"], tmp_path,
                                 capsys, monkeypatch)
    assert code == 0 and out.strip().splitlines()[-1].endswith("; no checkpoint (--checkpoint-every 0)"), out
    assert not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt*")), os.listdir(only_run_dir(tmp_path))
    code, _, err = run_inprocess("ppo_gaussian.py", [*TINY, "--checkpoint-every", "0", "--save-model"], tmp_path, capsys,
                                 monkeypatch)
    assert code == 2 and "--checkpoint-every 0 turns off" in err, err


@pytest.mark.parametrize("name, flags, smallest", [
    ("gorl_ppo_fm.py", dict(stage_weights=(26, 2), num_envs=16, batch_size=16, num_minibatches=15, unroll_length=16), 53_760),
    ("gorl_ppo_diff.py", dict(stage_weights=(2, 2, 1, 1), num_envs=16, batch_size=16, num_minibatches=8, unroll_length=30),
     23_040),
    ("gorl_ppo_fm.py", dict(stage_weights=(0.3, 0.7), num_envs=2, batch_size=2, num_minibatches=8, unroll_length=8), 427),
    ("gorl_sac_diff.py", dict(stage_weights=(2, 1, 1), learning_starts=5000), 20_004),
    ("sac_gaussian.py", dict(learning_starts=5000, num_envs=1), 5001),
    ("ppo_gaussian.py", dict(num_envs=16, batch_size=16, num_minibatches=8, unroll_length=30), 3840),
])
def test_a_budget_error_names_the_smallest_budget_that_works(name, flags, smallest, capsys):
    script = load_script(name)
    script.Args(total_timesteps=smallest, **flags)  # it works
    with pytest.raises(SystemExit):
        script.Args(total_timesteps=smallest - 1, **flags)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(smallest) in err, err


@pytest.mark.parametrize("name", ["ppo_gaussian.py", "fpo.py", "dppo.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py"])
def test_a_batch_that_does_not_divide_among_the_envs_names_one_that_does(name, capsys):
    script = load_script(name)
    with pytest.raises(SystemExit):
        script.Args(num_envs=16, batch_size=10, num_minibatches=3, total_timesteps=10**6)
    err = capsys.readouterr().err
    assert "--batch-size 16 works" in err, err
    script.Args(num_envs=16, batch_size=16, num_minibatches=3, total_timesteps=10**6)
    with pytest.raises(SystemExit):
        script.Args(num_envs=16, batch_size=5, num_minibatches=4, total_timesteps=10**6)
    assert "--batch-size 8 works" in capsys.readouterr().err
    script.Args(num_envs=16, batch_size=8, num_minibatches=4, total_timesteps=10**6)


def test_a_refit_collects_exactly_the_episodes_asked_for():
    script = load_script("gorl_ppo_fm.py")
    decoder = script.Decoder(5, 1, 8)
    # Cartpole's episodes all end at step 1000: 2 envs reach 4 episodes when 3 are asked for; the refit keeps 3.
    data, returns, steps = script.collect_refinement_data(lambda x: torch.zeros(len(x), 1), decoder, "CartpoleBalance",
                                                          "dm_control", 2, 3, 0, torch.device("cpu"))
    assert len(returns) == 3 and len(data[3].unique()) == 3 and len(data[0]) == 3000 and steps == 4000, (len(returns), steps)


def test_a_longer_resumed_gorl_run_goes_on_in_its_stage(tmp_path):
    r = run_script("gorl_ppo_fm.py", [*TINY, *REFIT, "--total-timesteps", "256"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = os.path.join(os.path.relpath(only_run_dir(tmp_path), tmp_path), "checkpoint.pt")
    # Three times the steps: the stage ends move to iterations 3 and 6; the run, in its last stage, goes on to the end
    # without another refit (a stage end it has passed is not one to make again).
    r = run_script("gorl_ppo_fm.py", ["--resume", checkpoint, "--total-timesteps", "768"], tmp_path)
    assert r.returncode == 0 and "iter 6/6 global_step=768" in r.stdout and "refit" not in r.stdout, r.stdout + r.stderr
    loop = torch.load(tmp_path / checkpoint, weights_only=True)["loop"]
    assert loop["stage"] == 1 and loop["global_step"] == 768, loop


def test_a_refit_is_estimated_before_it_runs_without_changing_the_run():
    script = load_script("gorl_ppo_fm.py")
    args = script.Args(refine_episodes=32, refine_num_envs=16, decoder_epochs=200, decoder_batch_size=1024)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    seconds = script.refit_seconds(args, 24, 6, 1e-3, 1000)
    assert torch.equal(torch.get_rng_state(), state)  # the run's random draws are untouched
    # 32,000 env steps at 1 ms, then 200 epochs of 29 Adam steps (28,800 training actions in batches of 1,024)
    assert seconds > 32.0 and seconds < 32.0 + 200 * 29 * 1.0, seconds


def test_the_pace_is_taken_once_a_run(tmp_path, capsys, monkeypatch):
    calls = []
    script = load_script("gorl_ppo_fm.py")
    monkeypatch.setattr(script.torch.optim.Adam, "register_step_post_hook", lambda self, hook: calls.append(hook) or
                        type("Handle", (), {"remove": lambda self: None})())
    code, out, _ = run_inprocess("gorl_ppo_fm.py", [*TINY, *REFIT, "--total-timesteps", "512"], tmp_path, capsys, monkeypatch)
    assert code == 0 and len(calls) == 1, (len(calls), out)  # 4 iterations, one warning check
