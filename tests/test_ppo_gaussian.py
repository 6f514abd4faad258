"""ppo_gaussian.py and the shared skeleton: math, environments, bad input, end to end."""
import os
import re

import numpy as np
import pytest
import torch

from conftest import BACKENDS, E2E_BACKENDS, has_envpool, load_script, only_run_dir, read_scalars, run_inprocess, run_script

pg = load_script("ppo_gaussian.py")
TINY = ["--num-envs", "2", "--unroll-length", "8", "--batch-size", "2", "--num-minibatches", "8", "--update-epochs", "1",
        "--num-eval-envs", "2", "--eval-every", "1024"]


# ---------------------------------------------------------------- math
def test_brax_advantage_hand_computed_without_masks():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 2.0]])
    zeros, ones = torch.zeros(1, 3), torch.ones(1, 3)
    adv, target = pg.compute_gae(rewards, values, zeros, ones, gamma=0.5, gae_lambda=0.5)
    # deltas: 1 + .5*1 - .5 = 1; 2 + .5*1.5 - 1 = 1.75; 3 + .5*2 - 1.5 = 2.5
    # GAE: A2 = 2.5; A1 = 1.75 + .25*2.5 = 2.375; A0 = 1 + .25*2.375 = 1.59375 -> targets vs = V + A
    torch.testing.assert_close(target, torch.tensor([[2.09375, 3.375, 4.0]]))
    # Brax's policy advantage r_t + gamma * vs_{t+1} - V_t (vs_3 = bootstrap V = 2):
    # 1 + .5*3.375 - .5 = 2.1875; 2 + .5*4 - 1 = 3; 3 + .5*2 - 1.5 = 2.5 (plain GAE would give 1.59375, 2.375, 2.5)
    torch.testing.assert_close(adv, torch.tensor([[2.1875, 3.0, 2.5]]))


def test_brax_advantage_with_truncation_reset_step_and_termination():
    # Step 1 ends an episode by truncation, step 2 is EnvPool's reset step (reward 0), step 4 terminates.
    rewards = torch.tensor([[1.0, 5.0, 0.0, 2.0, 3.0]])
    values = torch.tensor([[1.0, 2.0, 1.0, 3.0, 2.0, 4.0]])
    terminated = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    adv, target = pg.compute_gae(rewards, values, terminated, mask, gamma=0.5, gae_lambda=0.5)
    # deltas: 1 + .5*2 - 1 = 1; 0 (masked); 0 (masked); 2 + .5*2 - 3 = 0; 3 - 2 = 1 (terminated: V = 4 is not used)
    # GAE: A4 = 1; A3 = 0 + .25*1 = .25; A2 = A1 = 0 (masked: the recursion stops); A0 = 1 + .25*A1 = 1
    # targets vs = V + A = 2, 2, 1, 3.25, 3 (zero value error at the masked steps)
    torch.testing.assert_close(target, torch.tensor([[2.0, 2.0, 1.0, 3.25, 3.0]]))
    # Brax: t0: 1 + .5*vs1 - 1 = 1 (vs1 = V1: nothing crosses the truncation); t1, t2: 0 (masked);
    # t3: 2 + .5*vs4 - 3 = .5; t4: 3 + .5*0*4 - 2 = 1 (no bootstrap after a termination)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 0.0, 0.0, 0.5, 1.0]]))


def test_brax_advantage_matches_an_independent_loop_on_random_segments():
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 6, 9, 0.9, 0.8
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T + 1, generator=g)
    terminated = (torch.rand(B, T, generator=g) < 0.15).float()
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    adv, target = pg.compute_gae(rewards, values, terminated, mask, gamma, lam)
    for b in range(B):
        gae, vs = [0.0] * T, [0.0] * (T + 1)
        vs[T], acc = values[b, T].item(), 0.0
        for t in reversed(range(T)):
            nt, m = 1 - terminated[b, t].item(), mask[b, t].item()
            delta = (rewards[b, t].item() + gamma * nt * values[b, t + 1].item() - values[b, t].item()) * m
            acc = delta + gamma * lam * nt * m * acc
            gae[t], vs[t] = acc, acc + values[b, t].item()
        for t in range(T):
            nt, m = 1 - terminated[b, t].item(), mask[b, t].item()
            expected = (rewards[b, t].item() + gamma * nt * vs[t + 1] - values[b, t].item()) * m
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert target[b, t].item() == pytest.approx(vs[t], abs=1e-5)


def test_normalizer_merging_equals_one_pass():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(1000, 5)) * np.array([1, 10, 0.1, 1, 100])
    rms = pg.RunningMeanStd(5)
    for chunk in np.split(data, [1, 7, 300, 301, 650]):
        rms.update(torch.as_tensor(chunk))
    np.testing.assert_allclose(rms.mean.numpy(), data.mean(0), rtol=1e-10)
    np.testing.assert_allclose(rms.var.numpy(), data.var(0), rtol=1e-10)
    assert rms.count.item() == 1000
    normalized = rms(torch.as_tensor(data)).numpy()
    np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(0), 1, atol=1e-5)


def test_normalizer_is_identity_before_any_data_and_saved_with_model():
    rms = pg.RunningMeanStd(3)
    x = torch.randn(4, 3)
    torch.testing.assert_close(rms(x), x)
    assert set(rms.state_dict()) == {"mean", "var", "count"}


def test_normalizer_affine_map_follows_updates_loads_and_copies():
    """forward applies cached float32 scale and shift: they must follow update, load_state_dict and deepcopy."""
    import copy

    a, b, x = pg.RunningMeanStd(3), pg.RunningMeanStd(3), torch.randn(8, 3)
    a.update(torch.randn(100, 3) * torch.tensor([5.0, 0.1, 50.0]) + 2)
    expected = ((x.double() - a.mean) / a.var.sqrt()).float()
    torch.testing.assert_close(a(x), expected)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), expected)
    c = copy.deepcopy(a)
    a.update(torch.randn(100, 3) + 40)
    torch.testing.assert_close(c(x), expected)
    torch.testing.assert_close(a(x), ((x.double() - a.mean) / a.var.sqrt()).float())


def test_gaussian_head_scale_bounds_and_logprob_of_pre_tanh_sample():
    agent = pg.Agent(5, 3)
    with torch.no_grad():
        agent.actor[-1].bias[3:] = torch.tensor([-100.0, 0.0, 100.0])
        agent.actor[-1].weight.zero_()
    dist = agent.get_dist(torch.randn(7, 5))
    torch.testing.assert_close(dist.scale[0], torch.tensor([1e-3, float(np.log(2.0)) + 1e-3, 10.0]))
    sample = agent.act(torch.randn(7, 5))
    torch.testing.assert_close(sample.mean, dist.mean)
    torch.testing.assert_close(sample.log_prob, dist.log_prob(sample.action).sum(-1))


# ---------------------------------------------------------------- environments
def test_task_ids_come_from_dm_control():
    from dm_control import suite

    ids = pg.dmc_task_ids()
    assert len(ids) == len(suite.ALL_TASKS)  # the CamelCase map loses no task
    assert ids["HopperStand"] == ("hopper", "stand")
    assert ids["FingerTurnHard"] == ("finger", "turn_hard")
    assert ids["BallInCupCatch"] == ("ball_in_cup", "catch")
    for paper_task in ["CheetahRun", "FingerSpin", "FingerTurnHard", "FishSwim", "HopperStand", "WalkerWalk"]:
        assert paper_task in ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("env_id,obs_dim,action_dim", [("CheetahRun", 17, 6), ("HopperStand", 15, 4), ("Hopper-v5", 11, 3)])
def test_backend_shapes(backend, env_id, obs_dim, action_dim):
    envs = pg.VecEnv(env_id, backend, 3, seed=0)
    obs = envs.reset()
    assert obs.shape == (3, obs_dim) and obs.dtype == np.float32
    assert envs.action_dim == action_dim
    obs, reward, terminated, truncated, valid, _ = envs.step(np.zeros((3, action_dim), np.float32))
    assert obs.shape == (3, obs_dim) and reward.shape == terminated.shape == truncated.shape == valid.shape == (3,)
    envs.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_episode_end_is_truncation_and_envpool_reset_step_is_invalid(backend):
    envs = pg.VecEnv("CartpoleBalance", backend, 2, seed=0)
    envs.reset()
    zero = np.zeros((2, 1), np.float32)
    for t in range(999):
        _, _, terminated, truncated, valid, finished = envs.step(zero)
        assert not truncated.any() and not terminated.any() and valid.all() and len(finished[0]) == 0
    _, _, terminated, truncated, valid, (returns, lengths) = envs.step(zero)
    assert truncated.all() and not terminated.any() and valid.all()
    assert list(lengths) == [1000, 1000] and (returns > 0).all()
    _, reward, _, truncated, valid, _ = envs.step(zero)
    if backend == "envpool":  # the step after an episode end is a reset whose action is ignored
        assert not valid.any() and (reward == 0).all()
    else:  # SAME_STEP autoreset: the episode end already returned the new first observation
        assert valid.all()
    envs.close()


@pytest.mark.skipif(not has_envpool(), reason="envpool not installed")
def test_backends_match_statistically_on_an_open_loop_policy():
    """A fixed open-loop action sequence (the same for every env) on both backends: the returns differ only
    through the random initial states, so their means must agree within sampling error."""
    n = 24
    actions = np.sin(0.05 * np.arange(1000)[:, None] * np.arange(1, 7)[None, :]).astype(np.float32)
    returns = {}
    for backend in ["dm_control", "envpool"]:
        envs = pg.VecEnv("CheetahRun", backend, n, seed=123)
        envs.reset()
        for t in range(1000):
            _, _, _, _, _, (ended, _) = envs.step(np.repeat(actions[t : t + 1], n, 0))
        returns[backend] = ended
        envs.close()
    a, b = returns["dm_control"], returns["envpool"]
    assert len(a) == len(b) == n
    standard_error = np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    # 4 standard errors (p < 1e-4 under equal means), plus 2% of the mean for float differences between ports.
    assert abs(a.mean() - b.mean()) < 4 * standard_error + 0.02 * abs(a.mean()), (a.mean(), b.mean(), standard_error)
    assert a.std() > 0 and b.std() > 0  # the initial states are random on both


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    (["--env-id", "CheetaRun"], "did you mean CheetahRun"),
    (["--env-id", "NoSuchTask"], "unknown --env-id"),
    (["--env-id", "CheetahRun", "--total-timesteps", "1000"], "smaller than one iteration"),
    (["--env-id", "CheetahRun", "--num-envs", "0"], "--num-envs must be positive"),
    (["--env-id", "CheetahRun", "--batch-size", "-4"], "--batch-size must be positive"),
    (["--env-id", "CheetahRun", "--num-envs", "3", "--batch-size", "4", "--num-minibatches", "2"], "multiple of --num-envs"),
    (["--env-id", "CheetahRun", "--ent-coef", "-0.1"], "--ent-coef must be non-negative"),
    (["--env-id", "CheetahRun", "--learning-rate", "0"], "--learning-rate must be positive"),
    (["--eval-checkpoint", "does-not-exist.cleanrl_model"], "cannot read checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    code, out, err = run_inprocess("ppo_gaussian.py", args, tmp_path, capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_checkpoint_from_another_script_is_refused(tmp_path):
    path = tmp_path / "other.cleanrl_model"
    torch.save({"script": "gorl_ppo_fm.py", "args": {}}, path)
    # a real subprocess once: exit code and stderr as a user sees them
    r = run_script("ppo_gaussian.py", ["--eval-checkpoint", str(path)], tmp_path, timeout=120)
    assert r.returncode == 2 and "written by gorl_ppo_fm.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.skipif(has_envpool(), reason="envpool is installed here")
def test_missing_envpool_is_one_line(tmp_path):
    r = run_script("ppo_gaussian.py", ["--env-id", "CheetahRun", "--env-backend", "envpool"], tmp_path, timeout=120)
    assert r.returncode == 2 and "EnvPool is not installed (pip install envpool" in r.stderr


@pytest.mark.skipif(not has_envpool(), reason="envpool not installed")
def test_envpool_without_the_task_is_one_line(tmp_path):
    r = run_script("ppo_gaussian.py", ["--env-id", "Hopper-v2", "--env-backend", "envpool"], tmp_path, timeout=120)  # mujoco-py era
    assert r.returncode == 2 and r.stderr.strip() == "error: --env-backend envpool: EnvPool has no task 'Hopper-v2'", r.stderr
    # On dm_control, Gymnasium cannot make it (mujoco-py era): one line with Gymnasium's reason, no warnings.
    r = run_script("ppo_gaussian.py", ["--env-id", "Hopper-v2", "--env-backend", "dm_control"], tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "gymnasium-robotics" in r.stderr, r.stderr


def test_non_finite_loss_stops_with_the_iteration(tmp_path):
    r = run_script("ppo_gaussian.py", ["--env-id", "CartpoleBalance", "--env-backend", "dm_control", *TINY, "--total-timesteps", "1280",
                                       "--reward-scale", "1e30"], tmp_path, timeout=300)
    assert r.returncode == 1 and re.search(r"non-finite loss at iteration \d+", r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("backend", E2E_BACKENDS)
def test_end_to_end_logs_saves_and_reloads(tmp_path, backend):
    # 2 envs x 1024 steps: every env finishes one 1000-step episode, so charts/episodic_return is logged.
    r = run_script("ppo_gaussian.py", ["--env-id", "CheetahRun", "--env-backend", backend, *TINY, "--total-timesteps", "2048", "--save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"backend {backend}" in r.stdout
    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    for key in ["charts/SPS", "charts/episodic_return", "charts/episodic_length", "eval/episodic_return", "losses/value_loss",
                "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance"]:
        assert key in scalars, (key, sorted(scalars))
    assert [s for s, _ in scalars["eval/episodic_return"]] == [0, 1024, 2048]
    assert scalars["charts/episodic_length"][0][1] == 1000
    assert len(scalars["perf/rollout_SPS"]) == len(scalars["charts/SPS"]) > 1  # one of each per iteration
    final_eval = scalars["eval/episodic_return"][-1][1]

    model = os.path.join(run_dir, "ppo_gaussian.cleanrl_model")
    r = run_script("ppo_gaussian.py", ["--eval-checkpoint", model], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    reloaded = float(re.search(r"eval/episodic_return=([-\d.e+]+)", r.stdout).group(1))
    assert reloaded == pytest.approx(final_eval, rel=1e-5, abs=1e-4)
