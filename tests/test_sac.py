"""sac_gaussian.py and gorl_sac_diff.py: replay buffer at episode ends, SAC updates, latent actions, end to end, bad input."""
import copy
import os
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import BACKENDS, E2E_BACKENDS, load_script, only_run_dir, read_scalars, run_inprocess, run_script

SCRIPTS = ["sac_gaussian.py", "gorl_sac_diff.py"]
MODULES = {name: load_script(name) for name in SCRIPTS}
sac_m, gorl_m = MODULES["sac_gaussian.py"], MODULES["gorl_sac_diff.py"]
TINY = ["--batch-size", "32", "--learning-starts", "100", "--utd-ratio", "1", "--num-eval-envs", "2", "--eval-every", "100000"]


@pytest.fixture(params=SCRIPTS)
def script(request):
    return request.param, MODULES[request.param]


# ---------------------------------------------------------------- replay buffer at episode ends
def fill_buffer(m, backend, env_id, steps, seed=3):
    """Random actions through VecEnv into a ReplayBuffer exactly as the training loop adds them."""
    envs = m.VecEnv(env_id, backend, 2, seed)
    rb = m.ReplayBuffer(10_000, envs.reset().shape[1], envs.action_dim, "cpu")
    obs, rng, log = envs.reset(), np.random.default_rng(0), []
    for _ in range(steps):
        action = rng.uniform(-1, 1, (2, envs.action_dim)).astype(np.float32)
        next_obs, reward, terminated, truncated, valid, _ = envs.step(action)
        if valid.any():
            rb.add(obs[valid], action[valid], reward[valid], envs.final_obs[valid], terminated[valid])
        log.append((obs.copy(), action.copy(), next_obs.copy(), envs.final_obs.copy(), terminated, truncated, valid))
        obs = next_obs
    envs.close()
    return rb, fields(rb), log


def fields(rb):
    """The buffer's columns by name (it stores each transition as one row)."""
    return dict(zip(["obs", "actions", "rewards", "next_obs", "dones"], rb.data.split(rb.fields, 1)))


def test_time_limit_stores_the_final_observation_not_the_reset_one_dm_control(script):
    """dm_control (SAME_STEP autoreset) returns the next episode's first observation at a time limit; the buffer
    must hold the observation the episode ended in. Replayed on a plain single env with the same seed and actions."""
    _, m = script
    rb, f, log = fill_buffer(m, "dm_control", "CartpoleBalance", 1001)
    ends = [t for t, entry in enumerate(log) if entry[5][0]]
    assert ends == [999]  # the 1000-step time limit
    single = gym.make("dm_control/cartpole-balance-v0")
    gym_obs, _ = single.reset(seed=3)
    for t in range(1000):
        gym_obs, *_ = single.step(log[t][1][0])
    true_final = np.concatenate([np.asarray(gym_obs[k]).ravel() for k in sorted(gym_obs)])
    stored_next = f["next_obs"][999 * 2].numpy()  # env 0's transition of step 999 (2 envs per step, all valid)
    # (float32 rounding of the action mapping makes the two trajectories drift apart by ~1e-5 in 1000 steps)
    np.testing.assert_allclose(stored_next, true_final, atol=1e-3)
    assert np.abs(stored_next - log[999][2][0]).max() > 0.1  # the returned obs is already the next episode's
    np.testing.assert_allclose(f["obs"][1000 * 2].numpy(), log[999][2][0])  # ... which is where the next transition starts
    assert f["dones"][999 * 2] == 0  # truncation is not termination: the target bootstraps
    assert rb.size == 2002


@pytest.mark.parametrize("backend", BACKENDS)
def test_termination_is_done_and_reset_steps_are_not_stored(script, backend):
    _, m = script
    rb, f, log = fill_buffer(m, backend, "Hopper-v5", 300)  # random actions topple the hopper within a few dozen steps
    n = rb.size
    valid = np.stack([entry[6] for entry in log])
    terminated = np.stack([entry[4] for entry in log])
    assert terminated.any()
    assert n == valid.sum()  # EnvPool's reset steps (action ignored, reward of no episode) are not transitions
    assert f["dones"][:n].sum() == terminated[valid].sum()
    if backend == "envpool":
        assert (~valid).any()
    # Env 0's first terminal transition holds the observation its episode ended in: replay its actions on a single env
    # of the same backend and seed (env 0 of a vector env is seeded like a single env) and compare.
    t_end = next(t for t, entry in enumerate(log) if entry[4][0])
    index = int(valid[:t_end].sum())  # env 0 comes first among the valid entries of step t_end
    single = m.VecEnv("Hopper-v5", backend, 1, 3)
    single.reset()
    single.reset()  # fill_buffer resets twice; EnvPool's second reset draws a new initial state
    for t in range(t_end + 1):
        single.step(log[t][1][:1])
    np.testing.assert_allclose(f["next_obs"][index].numpy(), single.final_obs[0], atol=1e-5)
    assert f["dones"][index] == 1
    first_obs_after = next(entry[0][0] for entry in log[t_end + 1 :] if entry[6][0])  # where env 0's next episode starts
    assert np.abs(f["next_obs"][index].numpy() - first_obs_after).max() > 0.05  # a final observation, not a reset one


# ---------------------------------------------------------------- SAC updates
def batch(obs_dim=5, action_dim=2, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, obs_dim, generator=g), torch.rand(n, action_dim, generator=g) * 2 - 1, torch.randn(n, generator=g),
            torch.randn(n, obs_dim, generator=g), (torch.rand(n, generator=g) < 0.1).float())


def full_update(m, sac, batch, args):
    """An update with the actor's turn, as main makes it: a critic step, then policy_frequency actor steps; returns the
    critic step's and the last actor step's losses."""
    q_stats = m.sac_update(sac, *batch, args, False)
    return q_stats, [m.sac_update(sac, *batch, args, True) for _ in range(args.policy_frequency)][-1]


def two_critics(m, seed, obs_dim=5, action_dim=2):
    """(batched critic, [Q1, Q2] as two separate CleanRL critics): the same two initializations, drawn the same way."""
    torch.manual_seed(seed)
    batched = m.SoftQNetwork(obs_dim, action_dim)
    torch.manual_seed(seed)
    return batched, [m.mlp([obs_dim + action_dim, 256, 256, 1]) for _ in range(2)]


def test_batched_critics_equal_two_separate_networks(script):
    """SoftQNetwork holds both critics as stacked weights: its Q1 and Q2, their critic losses and their gradients are
    those of two separate networks on a fixed batch. Dropping one network's weights from the stack (both rows one
    network) fails here."""
    _, m = script
    batched, separate = two_critics(m, 0)
    obs, actions, rewards, next_obs, dones = batch()
    target = torch.randn(len(obs))
    q = batched(obs, actions)
    reference = torch.stack([net(torch.cat([obs, torch.tanh(actions)], -1)).squeeze(-1) for net in separate])
    torch.testing.assert_close(q, reference, rtol=1e-5, atol=1e-5)
    assert (reference[0] - reference[1]).abs().mean() > 0.05  # two different critics, so a stack of one would show
    losses = ((q - target) ** 2).mean(1)
    ref_losses = torch.stack([((r - target) ** 2).mean() for r in reference])
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    ref_losses.sum().backward()
    for i, (w, b) in enumerate(zip(batched.weights, batched.biases)):
        for k, net in enumerate(separate):
            torch.testing.assert_close(w.grad[k], net[2 * i].weight.grad.T, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(b.grad[k, 0], net[2 * i].bias.grad, rtol=1e-4, atol=1e-6)


def test_sac_update_moves_targets_by_tau_after_the_critic_step(script):
    _, m = script
    torch.manual_seed(0)
    args = m.Args(policy_frequency=1)
    sac = m.make_sac(5, 2, args, "cpu")
    old_target, old_online = copy.deepcopy(sac.qf_target), copy.deepcopy(sac.qf)
    full_update(m, sac, batch(), args)
    assert any(not torch.equal(a, b) for a, b in zip(old_online.parameters(), sac.qf.parameters()))  # the critics moved
    for o, t, q in zip(old_target.parameters(), sac.qf_target.parameters(), sac.qf.parameters()):
        torch.testing.assert_close(t, (1 - args.tau) * o + args.tau * q)  # toward the *updated* critics


def actor_with_log_std(m, action_dim, log_std):
    """An actor whose log-std is `log_std` for every observation (mean 0)."""
    actor = m.Actor(5, action_dim)
    raw = np.arctanh(np.clip(2 * (log_std - m.LOG_STD_MIN) / (m.LOG_STD_MAX - m.LOG_STD_MIN) - 1, -1 + 1e-7, 1 - 1e-7))
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias[:action_dim] = 0.0
        actor.net[-1].bias[action_dim:] = float(raw)
    return actor


@pytest.mark.parametrize("log_std,direction", [(0.0, -1), (-5.0, +1)])
def test_entropy_coefficient_moves_toward_the_target_entropy(script, log_std, direction):
    """Entropy above the target (-action_dim) lowers alpha; far below it raises alpha."""
    _, m = script
    torch.manual_seed(0)
    args = m.Args(policy_frequency=1)
    sac = m.make_sac(5, 2, args, "cpu")
    sac.actor = actor_with_log_std(m, 2, log_std)
    sac.actor_optimizer = torch.optim.Adam(sac.actor.parameters(), lr=0.0)  # keep the policy as set
    _, pi_stats = full_update(m, sac, batch(), args)
    entropy = float(pi_stats["losses/entropy"])
    assert (entropy > sac.target_entropy) == (direction < 0)
    assert np.sign(float(sac.log_alpha.detach())) == direction  # log alpha starts at 0 (alpha 1)


def test_no_autotune_keeps_alpha_fixed(script):
    _, m = script
    args = m.Args(policy_frequency=1, autotune=False, alpha=0.2)
    sac = m.make_sac(5, 2, args, "cpu")
    for i in range(3):
        full_update(m, sac, batch(seed=i), args)
    assert float(sac.log_alpha.exp()) == pytest.approx(0.2)


def test_tanh_gaussian_log_prob_matches_change_of_variables(script):
    """log pi(a) of a = tanh(u): the Gaussian density of u minus log |da/du|, checked against torch's own transform."""
    _, m = script
    torch.manual_seed(0)
    actor = m.Actor(5, 2)
    x = torch.randn(1000, 5)
    u, log_prob, mean = actor.get_action(x)
    dist = actor.get_dist(x)
    squashed = torch.distributions.TransformedDistribution(dist, [torch.distributions.TanhTransform()])
    ok = u.abs().max(-1).values < 4  # where 1 - tanh^2 is well above the 1e-6 guard
    torch.testing.assert_close(log_prob[ok], squashed.log_prob(torch.tanh(u)).sum(-1)[ok], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mean, dist.mean)


def test_critic_sees_the_squashed_action(script):
    """Q(s, u) = Q(s, tanh(u)): bounded in |u|, so the actor cannot chase an extrapolating critic to huge latents."""
    _, m = script
    torch.manual_seed(0)
    q = m.SoftQNetwork(5, 2)
    x = torch.randn(10, 5)
    assert torch.allclose(q(x, torch.full((10, 2), 30.0)), q(x, torch.full((10, 2), 1e6)))


# ---------------------------------------------------------------- GoRL-SAC: latent actions, frozen decoder
def test_identity_decoder_in_stage_0_acts_exactly_like_sac():
    """Same seed, same network outputs: tanh(g(s, z)) with a fresh decoder is SAC's tanh(u), sampled and deterministic."""
    obs = torch.randn(256, 11) * 3
    torch.manual_seed(0)
    sac = sac_m.make_sac(11, 3, sac_m.Args(), "cpu")
    torch.manual_seed(0)
    gorl = gorl_m.make_sac(11, 3, gorl_m.Args(), "cpu")
    for a, b in zip([*sac.actor.parameters(), *sac.qf.parameters()], [*gorl.actor.parameters(), *gorl.qf.parameters()]):
        assert torch.equal(a, b)
    decoder = gorl_m.Decoder(11, 3, 64)
    torch.manual_seed(5)
    u, log_prob, u_mean = sac.actor.get_action(obs)
    torch.manual_seed(5)
    z, latent_log_prob, z_mean = gorl.actor.get_action(obs)
    with torch.no_grad():
        torch.testing.assert_close(torch.tanh(decoder(obs, z)), torch.tanh(u))
        torch.testing.assert_close(torch.tanh(decoder(obs, z_mean)), torch.tanh(u_mean))
    torch.testing.assert_close(latent_log_prob, log_prob)  # the same entropy term
    torch.testing.assert_close(gorl.qf(obs, z), sac.qf(obs, u))  # and the same critics


def test_actor_and_critic_losses_send_no_gradient_to_the_decoder():
    """The rollout decodes z as the training loop does; SAC's updates on the stored z leave the decoder untouched."""
    torch.manual_seed(0)
    args = gorl_m.Args(policy_frequency=1, beta=0.1)
    sac = gorl_m.make_sac(5, 2, args, "cpu")
    decoder = gorl_m.Decoder(5, 2, 32)  # trainable here on purpose: any gradient path would fill .grad
    torch.nn.init.normal_(decoder.net[-1].weight)
    before = copy.deepcopy(decoder.state_dict())
    obs = torch.randn(64, 5)
    z = sac.actor.get_action(obs).action.detach()
    with torch.no_grad():
        env_action = torch.tanh(decoder(obs, z))
    assert env_action.shape == z.shape
    _, _, reward, next_obs, done = batch()
    q_stats, pi_stats = full_update(gorl_m, sac, (obs, z, reward, next_obs, done), args)
    assert pi_stats is not None and float(pi_stats["gorl/latent_kl"]) > 0  # the KL term was part of the actor loss
    assert all(p.grad is None for p in decoder.parameters())
    assert all(torch.equal(v, before[k]) for k, v in decoder.state_dict().items())
    assert all(p.grad is not None for p in sac.actor.parameters()) and all(p.grad is not None for p in sac.qf.parameters())


def test_kl_term_pulls_the_latent_policy_to_the_prior():
    torch.manual_seed(0)
    args = gorl_m.Args(policy_frequency=1, beta=100.0, autotune=False, alpha=0.0)
    sac = gorl_m.make_sac(5, 2, args, "cpu")
    with torch.no_grad():
        sac.actor.net[-1].bias[:2] = 3.0  # latent mean far from the prior's 0
    obs = torch.randn(64, 5)
    kl_before = float(gorl_m.kl_to_prior(sac.actor.get_dist(obs)).mean().detach())
    for i in range(30):
        full_update(gorl_m, sac, (obs, *batch()[1:]), args)
    assert float(gorl_m.kl_to_prior(sac.actor.get_dist(obs)).mean().detach()) < 0.5 * kl_before


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    (["--env-id", "Hoper-v5"], "unknown --env-id 'Hoper-v5'; did you mean Hopper-v5"),
    (["--utd-ratio", "0"], "--utd-ratio must be positive"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--alpha", "-1"], "--alpha must be non-negative"),
    (["--q-lr", "-1e-3"], "--q-lr must be positive"),
    (["--total-timesteps", "5000"], "leaves no learning"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, script, args, message):
    name, _ = script
    code, out, err = run_inprocess(name, args, tmp_path, capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("args,message", [
    (["--beta", "-0.1"], "--beta must be non-negative"),
    (["--stage-weights", "1", "0"], "--stage-weights must be positive"),
    (["--total-timesteps", "12000"], "each stage of --total-timesteps 12000 needs more than --learning-starts"),
    (["--refine-episodes", "4"], "--refine-episodes at least 2"),
])
def test_gorl_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    code, out, err = run_inprocess("gorl_sac_diff.py", args, tmp_path, capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_checkpoint_from_another_script_is_refused(tmp_path, capsys, monkeypatch, script):
    name, _ = script
    other = "gorl_sac_diff.py" if name == "sac_gaussian.py" else "sac_gaussian.py"
    path = tmp_path / "other.cleanrl_model"
    torch.save({"script": other, "args": {}}, path)
    code, out, err = run_inprocess(name, ["--eval-checkpoint", str(path)], tmp_path, capsys, monkeypatch)
    assert code == 2 and f"written by {other}" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("backend", E2E_BACKENDS)
def test_sac_end_to_end_with_save_and_reload(tmp_path, backend):
    r = run_script("sac_gaussian.py", ["--env-id", "Hopper-v5", "--env-backend", backend, *TINY, "--num-envs", "2", "--total-timesteps", "600", "--save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    s = read_scalars(run_dir)
    for key in ["losses/qf1_values", "losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/actor_loss", "losses/alpha", "losses/alpha_loss",
                "charts/SPS", "charts/episodic_return", "eval/episodic_return", "eval/episodic_return_std"]:
        assert key in s, key
    assert [step for step, _ in s["eval/episodic_return"]] == [0, 600]
    assert s["losses/alpha"][-1][1] < 1.0  # the entropy coefficient was tuned from its start at 1
    model = os.path.join(run_dir, "sac_gaussian.cleanrl_model")
    r = run_script("sac_gaussian.py", ["--eval-checkpoint", model], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    reloaded = float(re.search(r"eval/episodic_return=([-\d.e+]+)", r.stdout).group(1))
    assert reloaded == pytest.approx(s["eval/episodic_return"][-1][1], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("backend", E2E_BACKENDS)
def test_gorl_sac_three_stages_end_to_end_with_save_and_reload(tmp_path, backend):
    # 3 stages of 400/200/200 steps on 2 envs; each restarts SAC with 100 random-latent steps; refits on 2 episodes.
    r = run_script("gorl_sac_diff.py", ["--env-id", "Hopper-v5", "--env-backend", backend, *TINY, "--num-envs", "2", "--total-timesteps", "800",
                                        "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "2", "--save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    s = read_scalars(run_dir)
    assert [step for step, _ in s["eval/episodic_return"]] == [0, 400, 600, 800]  # start and every stage end
    assert [step for step, _ in s["gorl/eval_after_refit"]] == [400, 600]
    assert [v for _, v in s["gorl/stage"]][-1] == 2
    for key in ["gorl/latent_kl", "decoder/train_loss", "decoder/val_loss", "gorl/refine_return", "gorl/refine_steps", "losses/qf1_loss", "losses/actor_loss"]:
        assert key in s, key
    model = os.path.join(run_dir, "gorl_sac_diff.cleanrl_model")
    checkpoint = torch.load(model, weights_only=True)
    assert checkpoint["loop"]["stage"] == 2 and "decoders" not in checkpoint["loop"]  # only the current decoder is saved
    assert not torch.equal(checkpoint["decoder"]["net.8.weight"], torch.zeros_like(checkpoint["decoder"]["net.8.weight"]))  # refit, no longer the identity
    r = run_script("gorl_sac_diff.py", ["--eval-checkpoint", model], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    reloaded = float(re.search(r"eval/episodic_return=([-\d.e+]+)", r.stdout).group(1))
    assert reloaded == pytest.approx(s["eval/episodic_return"][-1][1], rel=1e-5, abs=1e-4)


def test_both_scripts_start_from_the_same_policy(tmp_path):
    """Same seed: GoRL-SAC's stage-0 policy through the identity decoder is SAC's policy (the step-0 evaluation)."""
    returns = []
    for name in SCRIPTS:
        cwd = tmp_path / name
        cwd.mkdir()
        extra = ["--stage-weights", "1"] if name == "gorl_sac_diff.py" else []
        r = run_script(name, ["--env-id", "Hopper-v5", "--env-backend", "dm_control", *TINY, "--total-timesteps", "101", *extra], cwd)
        assert r.returncode == 0, r.stderr[-3000:]
        returns.append(read_scalars(only_run_dir(cwd))["eval/episodic_return"][0][1])
    assert returns[0] == returns[1]


# ---------------------------------------------------------------- --compile
def test_compile_falls_back_with_one_line_where_torch_compile_cannot_build(script, capsys, monkeypatch):
    _, m = script

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    update = m.compile_update(m.sac_update, torch.device("cpu"))
    out = capsys.readouterr().out
    assert update is m.sac_update and out.count("\n") == 1 and out.startswith("note: --compile: torch.compile does not work here")


@pytest.mark.slow  # compiling takes about a minute on 2 cores
def test_compiled_update_computes_what_the_eager_one_does(script):
    _, m = script
    args = m.Args(policy_frequency=1)
    torch.manual_seed(0)
    eager_sac = m.make_sac(5, 2, args, "cpu")
    compiled_sac = copy.deepcopy(eager_sac)
    compiled = m.compile_update(m.sac_update, torch.device("cpu"))
    for i in range(3):
        torch.manual_seed(i)
        q, pi = m.sac_update(eager_sac, *batch(seed=i), args, False), m.sac_update(eager_sac, *batch(seed=i), args, True)
        torch.manual_seed(i)
        cq, cpi = compiled(compiled_sac, *batch(seed=i), args, False), compiled(compiled_sac, *batch(seed=i), args, True)
        for name in q:
            torch.testing.assert_close(cq[name], q[name], rtol=1e-4, atol=1e-5)
        for name in pi:
            torch.testing.assert_close(cpi[name], pi[name], rtol=1e-4, atol=1e-5)
    for a, b in zip(eager_sac.qf.parameters(), compiled_sac.qf.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
