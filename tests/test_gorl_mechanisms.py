"""GoRL's mechanisms, each pinned by a test that fails when the mechanism is broken (issue 13 lists the mutations).

Loop-level tests run the real scripts in this process (runpy) on the dm_control backend and record what the
environments receive by wrapping Gymnasium's SyncVectorEnv: training, evaluation and refinement use different
env counts, so each call can be told apart."""
import math
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import load_script, only_run_dir, read_scalars, run_inprocess

PPO_SCRIPTS = ["gorl_ppo_fm.py", "gorl_ppo_diff.py"]
ALL_SCRIPTS = PPO_SCRIPTS + ["gorl_sac_diff.py"]
# The two PPO scripts' main loops are identical (test_gorl_ppo_scripts_differ_only_in_the_decoder), so the loop-level
# tests run on one of them; the decoder and refit tests run on all three scripts.
LOOP_SCRIPTS = ["gorl_ppo_fm.py"]
MODULES = {name: load_script(name) for name in ALL_SCRIPTS}
# 2 training envs, 1 evaluation env, 3 refinement envs; 8-step unrolls, 8 minibatches of 2 segments: 128 steps/iteration.
# Hopper-v5 (obs 11, actions 3): a random policy's episodes end within tens of steps, so evaluations and refits are quick.
TINY = ["--env-id", "Hopper-v5", "--env-backend", "dm_control", "--num-envs", "2", "--unroll-length", "8", "--batch-size", "2",
        "--num-minibatches", "8", "--update-epochs", "1", "--num-eval-envs", "1", "--eval-every", "100000", "--refine-episodes", "3",
        "--refine-num-envs", "3", "--decoder-epochs", "2", "--decoder-batch-size", "256"]
TRAIN_ENVS, EVAL_ENVS, REFINE_ENVS = 2, 1, 3


class Recorder:
    """Every action each SyncVectorEnv receives, with the flat observation it was chosen for, keyed by env count."""

    def __init__(self, monkeypatch, flatten=lambda obs: np.asarray(obs, dtype=np.float32)):
        # by_env: one entry per vector env, numbered at its first reset (never by object identity, which the
        # interpreter reuses once an env is freed), in creation order: an evaluation, a refit, ...
        self.calls, self.by_env = {}, []
        original_reset, original_step = gym.vector.SyncVectorEnv.reset, gym.vector.SyncVectorEnv.step
        recorder = self

        def reset(env, *a, **k):
            out = original_reset(env, *a, **k)
            if not hasattr(env, "_recorded_calls"):
                env._recorded_calls = []
                recorder.by_env.append((env.num_envs, env._recorded_calls))
            env._recorded_obs = flatten(out[0])
            return out

        def step(env, action):
            recorder.calls.setdefault(env.num_envs, []).append((env._recorded_obs, np.array(action, copy=True)))
            env._recorded_calls.append((env._recorded_obs, np.array(action, copy=True)))
            out = original_step(env, action)
            env._recorded_obs = flatten(out[0])
            return out

        monkeypatch.setattr(gym.vector.SyncVectorEnv, "reset", reset)
        monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", step)

    def actions(self, num_envs):
        return np.stack([a for _, a in self.calls[num_envs]])


def run(name, args, tmp_path, capsys, monkeypatch):
    code, out, err = run_inprocess(name, args, tmp_path, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    run_dir = only_run_dir(tmp_path)
    return read_scalars(run_dir), run_dir, out


def saved_model(run_dir, name):
    return torch.load(f"{run_dir}/{name.replace('.py', '.cleanrl_model')}", weights_only=True)


def shifted_decoder(m, obs_dim, action_dim, hidden=64, shift=3.0):
    """A non-identity decoder: its last layer is zero but for the bias, so decode(s, z) = z + c for a constant c;
    the bias is scaled so that c = +shift in every dimension."""
    decoder = m.Decoder(obs_dim, action_dim, hidden)
    with torch.no_grad():
        decoder.net[-1].bias.fill_(1.0)
        unit = decoder(torch.zeros(1, obs_dim), torch.zeros(1, action_dim))[0, 0].item()
        decoder.net[-1].bias.fill_(shift / unit)
    return decoder


# ---------------------------------------------------------------- 1, 8: the env receives tanh(g(s, z)) of the loaded decoder
@pytest.mark.parametrize("name", LOOP_SCRIPTS)
def test_env_receives_tanh_of_the_decoded_latent_from_the_loaded_decoder(tmp_path, capsys, monkeypatch, name):
    m = MODULES[name]
    decoder = shifted_decoder(m, 11, 3)
    other = m.Decoder(11, 3, 64)
    torch.nn.init.normal_(other.net[-1].weight)
    path = tmp_path / "decoders.cleanrl_model"
    # The run's current decoder is the one to load; the earlier stages' decoders are decoys.
    torch.save({"script": name, "args": {"env_id": "Hopper-v5", "decoder_hidden": 64}, "decoder": decoder.state_dict(),
                "loop": {"decoders": [m.Decoder(11, 3, 64).state_dict(), other.state_dict()]}}, path)
    rec = Recorder(monkeypatch)
    s, run_dir, _ = run(name, [*TINY, "--total-timesteps", "128", "--stage-weights", "1", "--decoder-checkpoint", str(path), "--save-model"],
                        tmp_path, capsys, monkeypatch)
    loaded = saved_model(run_dir, name)["decoder"]  # one stage, no refit: the run's decoder is the loaded one
    assert all(torch.equal(loaded[k], v) for k, v in decoder.state_dict().items())  # exactly the saved decoder, not a decoy
    # In the first rollout the encoder is exactly N(0, I) (prior reset), so atanh(action) - 3 must be N(0, 1) samples;
    # tanh(z) alone would be centred at 0.
    u = np.arctanh(np.clip(rec.actions(TRAIN_ENVS)[:64].reshape(-1), -1 + 1e-6, 1 - 1e-6)) - 3.0
    assert abs(u.mean()) < 0.45 and 0.6 < u.std() < 1.4, (u.mean(), u.std())
    # Evaluation at step 0 uses the latent mean z = 0: every action is tanh(0 + 3).
    np.testing.assert_allclose(rec.actions(EVAL_ENVS)[:5], np.tanh(3.0), rtol=1e-4)


# ---------------------------------------------------------------- 2, 7: after a refit, ratio 1; a new optimizer, lr and clip
@pytest.mark.parametrize("name", LOOP_SCRIPTS)
@pytest.mark.parametrize("mode", ["prior", "fresh", "none"])
def test_stage_boundary_optimizer_normalizer_lr_clip_and_first_ratio(tmp_path, capsys, monkeypatch, name, mode):
    # 2 stages of 2 iterations; one minibatch of one epoch per iteration, so each logged approx-KL is a first minibatch's.
    args = [*TINY, "--num-minibatches", "1", "--batch-size", "2", "--total-timesteps", "64", "--stage-weights", "1", "1",
            "--learning-rate", "1e-3", "--learning-rate-later", "4e-4", "--clip-coef", "0.15", "--clip-coef-later", "0.3",
            *(["--stage-encoder-resets", mode] if mode == "fresh" else ["--encoder-reset", mode]), "--save-model"]
    s, run_dir, _ = run(name, args, tmp_path, capsys, monkeypatch)
    assert [v for _, v in s["gorl/stage"]] == [0, 0, 1, 1]
    assert [round(v, 8) for _, v in s["charts/learning_rate"]] == [1e-3, 1e-3, 4e-4, 4e-4]
    assert [round(v, 6) for _, v in s["charts/clip_coef"]] == [0.15, 0.15, 0.3, 0.3]
    # PPO's log-probabilities are of z under the encoder that acted, also right after the refit and restart.
    assert all(abs(v) < 1e-6 for _, v in s["losses/approx_kl"]), s["losses/approx_kl"]
    assert all(v == 0 for _, v in s["losses/clipfrac"])
    model = saved_model(run_dir, name)
    adam_steps = {int(state["step"]) for state in model["optimizer"]["state"].values()}
    assert adam_steps == ({4} if mode == "none" else {2})  # a restarted encoder gets a new Adam (2 updates since)
    # The normalizer is kept across the boundary, except by `fresh`, which starts it over: 16 steps per iteration.
    assert model["obs_rms"]["count"].item() == (32 if mode == "fresh" else 64)


@pytest.mark.parametrize("name", LOOP_SCRIPTS)
def test_without_restarts_stage_0_still_starts_at_the_prior(tmp_path, capsys, monkeypatch, name):
    # The ablation `--encoder-reset none` (Sec. 4.3.2) drops the restarts between stages, not the prior start: its step-0
    # evaluation decodes the latent mean 0 with the identity (action 0), as the default's does. The release's per-stage
    # `--stage-encoder-resets none` keeps stage 0's plain initialization, whose latent mean is not 0.
    first_actions = {}
    for flags in [["--encoder-reset", "none"], ["--stage-encoder-resets", "none"]]:
        rec = Recorder(monkeypatch)
        (tmp_path / flags[0]).mkdir()
        run(name, [*TINY, "--total-timesteps", "128", "--stage-weights", "1", *flags], tmp_path / flags[0], capsys, monkeypatch)
        first_actions[flags[0]] = rec.actions(EVAL_ENVS)[:5]
    np.testing.assert_array_equal(first_actions["--encoder-reset"], 0.0)
    assert np.abs(first_actions["--stage-encoder-resets"]).max() > 1e-3


# ---------------------------------------------------------------- 3: beta * KL is in the loss
@pytest.mark.parametrize("name", LOOP_SCRIPTS)
def test_kl_to_prior_penalty_pulls_the_latent_policy_to_the_prior(tmp_path, capsys, monkeypatch, name):
    kl = {}
    for beta in ["0", "30"]:
        # `--stage-encoder-resets none` starts stage 0 from a plain initialization, away from N(0, I) (KL about 0.3).
        args = [*TINY, "--total-timesteps", "128", "--stage-weights", "1", "--stage-encoder-resets", "none", "--update-epochs", "16",
                "--learning-rate", "3e-3", "--beta", beta]
        (tmp_path / beta).mkdir()
        s, _, _ = run(name, args, tmp_path / beta, capsys, monkeypatch)
        kl[beta] = s["gorl/latent_kl"][0][1]
    assert kl["30"] < 0.3 * kl["0"], kl  # measured: 0.038 against 0.336


# ---------------------------------------------------------------- 4, 5: which encoder collects, and that it samples
@pytest.mark.parametrize("name", LOOP_SCRIPTS)
@pytest.mark.parametrize("refine_from", ["best", pytest.param("last", marks=pytest.mark.slow)])  # CI time: `last` is slow
def test_refinement_is_collected_by_the_chosen_encoder_sampling_z(tmp_path, capsys, monkeypatch, name, refine_from):
    rec = Recorder(monkeypatch)
    # Stage 0 starts at the prior N(0, I): its deterministic evaluation is the constant action 0 (about 750 on
    # CartpoleBalance). A learning rate of 0.5 then wrecks the encoder (saturated actions, a low return), so the
    # best-evaluated encoder is the prior one and the last one is far from it.
    args = [*TINY, "--env-id", "CartpoleBalance", "--total-timesteps", "512", "--stage-weights", "2", "2", "--eval-every", "128",
            "--learning-rate", "0.5", "--refine-from", refine_from]
    s, _, _ = run(name, args, tmp_path, capsys, monkeypatch)
    evals = [v for step, v in s["eval/episodic_return"] if step <= 256]
    assert len(evals) == 3 and evals[0] > max(evals[1:]) + 50, evals  # the setup holds: the prior encoder is the best
    expected = evals[0] if refine_from == "best" else evals[-1]
    assert s["gorl/refine_encoder_eval"][0][1] == pytest.approx(expected)
    z = np.arctanh(np.clip(rec.actions(REFINE_ENVS).reshape(-1), -1 + 1e-7, 1 - 1e-7))  # identity decoder in stage 0
    if refine_from == "best":  # z sampled from N(0, I): E|z| = 0.80 (the mean would give z = 0 everywhere)
        assert 0.65 < np.abs(z).mean() < 0.95 and abs(z.mean()) < 0.1, (np.abs(z).mean(), z.mean())
    else:
        assert np.abs(z).mean() > 1.5, np.abs(z).mean()


# ---------------------------------------------------------------- 5: what collection keeps
@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_collection_keeps_the_valid_steps_of_finished_episodes_only(name):
    m = MODULES[name]
    backend = "envpool" if "envpool" in m.resolve_backend("CartpoleBalance", "auto") else "dm_control"
    # CartpoleBalance: every episode is exactly 1000 steps; on EnvPool each is followed by a reset step (invalid).
    sample_z, decoder = (lambda x: torch.zeros(len(x), 1)), (lambda x, z: z)
    (obs, action, z, episode_id), returns, steps = m.collect_refinement_data(sample_z, decoder, "CartpoleBalance", backend, 3, 4, 0, "cpu")
    assert len(returns) == 4  # 3 envs end together, twice: 6 episodes end, the 4 asked for are kept
    ids, counts = episode_id.unique(return_counts=True)
    assert len(ids) == 4 and (counts == 1000).all(), counts
    assert steps == 3 * (2001 if backend == "envpool" else 2000)
    # Hopper-v5 ends episodes at different times: the ones still running when collection stops are dropped.
    sample_z, decoder = (lambda x: torch.zeros(len(x), 3)), (lambda x, z: z + 0.5)
    (obs, action, z, episode_id), returns, steps = m.collect_refinement_data(sample_z, decoder, "Hopper-v5", "dm_control", 4, 9, 0, "cpu")
    assert len(episode_id.unique()) == len(returns) == 9
    assert len(obs) < steps  # the unfinished episodes' steps are not kept


# ---------------------------------------------------------------- 5, 6, 8, 9: the refit
class LossSpy:
    """Records Decoder.loss's inputs and outputs: validation calls run without gradients, training calls with."""

    def __init__(self, monkeypatch, m):
        self.train, self.val = [], []
        original = m.Decoder.loss
        spy = self

        def loss(decoder, obs, action, noise, t):
            out = original(decoder, obs, action, noise, t)
            (spy.train if torch.is_grad_enabled() else spy.val).append((obs, action, noise, t, out.detach()))
            return out

        monkeypatch.setattr(m.Decoder, "loss", loss)
        self.original = original


def refit_args(**kw):
    args = dict(refine_input="prior", decoder_hidden=32, decoder_lr=1e-3, decoder_epochs=3, decoder_batch_size=256, decoder_steps=0, target_clip=3.0,
                refit_validation="epochs", refit_checkpoint_by="loss", chain_loss_weight=0.0)
    args.update(kw)
    return types.SimpleNamespace(**args)


def episode_data(n_episodes=20, length=50, obs_dim=3):
    episode_id = torch.arange(n_episodes).repeat_interleave(length)
    obs = torch.cat([episode_id[:, None].float(), torch.randn(len(episode_id), obs_dim - 1)], 1)  # obs[:, 0] = the episode
    action = torch.randn(len(episode_id), 1) * 4  # beyond the +-3 clip in places
    z = torch.full_like(action, 7.0)
    return obs, action, z, episode_id


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_refit_splits_by_episode_clips_targets_and_feeds_prior_noise(monkeypatch, name):
    m = MODULES[name]
    spy = LossSpy(monkeypatch, m)
    torch.manual_seed(0)
    m.fit_decoder(episode_data(), refit_args(), torch.device("cpu"))
    val_episodes = set(spy.val[0][0][:, 0].tolist())
    train_episodes = set(torch.cat([c[0][:, 0] for c in spy.train]).tolist())
    assert len(val_episodes) == 2 and not (val_episodes & train_episodes) and len(train_episodes) == 18  # 10% of episodes
    assert len(spy.val[0][0]) == 2 * 50 * m.SAMPLES_PER_ACTION  # every step of a held-out episode, 8 samples each
    actions = torch.cat([c[1] for c in spy.train])
    assert actions.abs().max() == 3.0  # targets clipped to +-3
    noise = torch.cat([c[2] for c in spy.train])
    assert (noise != 7.0).all() and abs(noise.std().item() - 1) < 0.1  # fresh N(0, I) noise, not the encoder's z = 7


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_refit_latent_input_ablation_and_no_target_clip(monkeypatch, name):
    m = MODULES[name]
    spy = LossSpy(monkeypatch, m)
    m.fit_decoder(episode_data(), refit_args(refine_input="latent", target_clip=0.0), torch.device("cpu"))
    assert (torch.cat([c[2] for c in spy.train]) == 7.0).all()  # the decoder's inputs are the collected z
    assert torch.cat([c[1] for c in spy.train]).abs().max() > 3.0


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_refit_keeps_the_decoder_with_the_lowest_validation_loss(monkeypatch, name):
    m = MODULES[name]
    spy = LossSpy(monkeypatch, m)
    # 12 epochs of 4 steps; from step 41 on (the last two epochs) every step also scrambles the weights, so the last
    # validations are far worse than the earlier ones and the decoder to keep is an earlier one.
    steps, original = [0], torch.optim.Adam.step

    def step(self, *a, **k):
        out = original(self, *a, **k)
        steps[0] += 1
        if steps[0] > 40:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(torch.randn_like(p))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    torch.manual_seed(0)
    decoder, _, best_val = m.fit_decoder(episode_data(), refit_args(decoder_epochs=12), torch.device("cpu"))
    val_losses = [c[4].mean().item() for c in spy.val]
    assert len(val_losses) == 12 and min(val_losses) < min(val_losses[-2:]) - 0.1, val_losses
    assert best_val == pytest.approx(min(val_losses))
    obs, action, noise, t, _ = spy.val[0]  # the fixed validation batch
    with torch.no_grad():
        again = spy.original(decoder, obs, action, noise, t).mean().item()
    assert again == pytest.approx(min(val_losses), rel=1e-5)  # the returned decoder is the best one, not the last


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_decoder_steps_makes_exactly_that_many_adam_steps(monkeypatch, name):
    m = MODULES[name]
    count = [0]
    original = torch.optim.Adam.step

    def step(self, *a, **k):
        count[0] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    m.fit_decoder(episode_data(), refit_args(decoder_steps=37), torch.device("cpu"))
    assert count[0] == 37
    count[0] = 0
    m.fit_decoder(episode_data(), refit_args(decoder_epochs=3, decoder_batch_size=256), torch.device("cpu"))
    assert count[0] == 3 * math.ceil(18 * 50 / 256)  # epochs x minibatches of the 18 training episodes


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_decoder_normalizes_observations_with_its_own_statistics(name):
    m = MODULES[name]
    g = torch.Generator().manual_seed(2)
    n = 8000
    raw = torch.randn(n, 3, generator=g)
    obs = raw * torch.tensor([50.0, 0.01, 5.0]) + torch.tensor([100.0, -3.0, 0.0])  # far from standard
    action = torch.where(raw[:, :1] > 0, 0.8, -0.8) + 0.05 * torch.randn(n, 1, generator=g)
    torch.manual_seed(0)
    args = refit_args(decoder_hidden=64, decoder_epochs=30, decoder_batch_size=512)
    decoder, _, _ = m.fit_decoder((obs, action, torch.zeros_like(action), torch.arange(n) // 100), args, torch.device("cpu"))
    torch.testing.assert_close(decoder.obs_mean, obs.mean(0), rtol=0.05, atol=0.05)
    torch.testing.assert_close(decoder.obs_std, obs.std(0), rtol=0.05, atol=1e-3)
    test_raw = torch.randn(4000, 3, generator=g)
    test_obs = test_raw * torch.tensor([50.0, 0.01, 5.0]) + torch.tensor([100.0, -3.0, 0.0])
    with torch.no_grad():
        samples = decoder(test_obs, torch.randn(4000, 1, generator=g)).squeeze(1)
    target = torch.where(test_raw[:, 0] > 0, 0.8, -0.8)
    clear = test_raw[:, 0].abs() > 0.3
    assert ((samples - target).abs() < 0.3)[clear].float().mean() > 0.9


# ---------------------------------------------------------------- encoder restarts
@pytest.mark.parametrize("name", PPO_SCRIPTS)
def test_fresh_reset_reinitializes_actor_and_critic(name):
    m = MODULES[name]
    agent = m.Agent(9, 4)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    new = m.reset_encoder(agent, "fresh", 9, 4)
    assert all(not torch.equal(before[k], v) for k, v in new.state_dict().items() if k.endswith("weight"))
    assert m.reset_encoder(agent, "warm", 9, 4) is agent and m.reset_encoder(agent, "none", 9, 4) is agent


@pytest.mark.parametrize("name", LOOP_SCRIPTS)
def test_warm_restart_restores_the_best_encoder_and_normalizer_with_a_new_adam(tmp_path, capsys, monkeypatch, name):
    # Run A: one stage of one iteration, evaluated at 0 and at its end; its encoders are the candidates for "best".
    # Run B: the same stage 0 (same seed), then a warm restart and one iteration at a learning rate of 1e-12, so B's
    # final encoder is the best encoder of stage 0 as restored.
    common = [*TINY, "--eval-every", "128", "--stage-encoder-resets", "warm", "--save-model"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    s_a, dir_a, _ = run(name, [*common, "--total-timesteps", "128", "--stage-weights", "1"], tmp_path / "a", capsys, monkeypatch)
    s_b, dir_b, _ = run(name, [*common, "--total-timesteps", "256", "--stage-weights", "1", "1", "--learning-rate-later", "1e-12"],
                        tmp_path / "b", capsys, monkeypatch)
    a, b = saved_model(dir_a, name), saved_model(dir_b, name)
    evals = dict(s_a["eval/episodic_return"])
    assert dict(s_b["eval/episodic_return"])[128] == evals[128]  # the same stage 0
    if evals[128] > evals[0]:  # the trained encoder was the best: B continues from it and from its normalizer
        for k, v in a["agent"].items():
            torch.testing.assert_close(b["agent"][k], v, atol=1e-8, rtol=0)
        assert b["obs_rms"]["count"].item() == 256
    else:  # the initial encoder was the best, with the normalizer it had then (no data yet)
        fresh = m_initial_agent(name, a)
        for k, v in fresh.items():
            torch.testing.assert_close(b["agent"][k], v, atol=1e-8, rtol=0)
        assert b["obs_rms"]["count"].item() == 128
    assert {int(st["step"]) for st in b["optimizer"]["state"].values()} == {8}  # a new Adam: 8 updates since the restart


def m_initial_agent(name, checkpoint):
    torch.manual_seed(checkpoint["args"]["seed"])
    return MODULES[name].Agent(checkpoint["loop"]["obs_dim"], checkpoint["loop"]["action_dim"]).state_dict()


# ---------------------------------------------------------------- GoRL-SAC
def test_gorl_sac_restarted_actor_is_the_prior():
    m = MODULES["gorl_sac_diff.py"]
    actor = m.actor_at_prior(m.Actor(6, 3))
    dist = actor.get_dist(torch.randn(64, 6) * 10)
    assert torch.equal(dist.mean, torch.zeros(64, 3))
    torch.testing.assert_close(dist.scale, torch.ones(64, 3), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    z = actor.get_action(torch.randn(20000, 6)).action
    assert z.mean().abs() < 0.03 and (z.std() - 1).abs() < 0.03


# ---------------------------------------------------------------- the two PPO scripts
def test_gorl_ppo_scripts_differ_only_in_the_decoder():
    import ast
    import os

    from conftest import ROOT

    sources = {}
    for name in PPO_SCRIPTS:
        text = open(os.path.join(ROOT, name)).read()
        tree = ast.parse(text)
        parts = {n.name: ast.get_source_segment(text, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        parts["__main__"] = text[text.index('if __name__ == "__main__":'):]
        sources[name] = parts
    fm, diff = (sources[n] for n in PPO_SCRIPTS)
    assert set(fm) == set(diff)
    differing = {k for k in fm if fm[k] != diff[k]}
    assert differing <= {"Decoder", "Args", "presets"}, differing  # Args and presets: per-decoder lr, clip, release


# ---------------------------------------------------------------- the release's KL form, per-stage beta
@pytest.mark.parametrize("name", PPO_SCRIPTS)  # gorl_sac_diff.py has only the analytic KL
def test_release_kl_form_value_and_gradient(name):
    m = MODULES[name]
    mu = torch.tensor([[1.0, 0.0]], requires_grad=True)
    sigma = torch.tensor([[1.0, 2.0]], requires_grad=True)
    value = m.kl_to_prior(torch.distributions.Normal(mu, sigma), "moments")
    torch.testing.assert_close(value, torch.tensor([(1 + 0) / 2 + (1 + 4) / 2]))  # mean mu^2 + mean sigma^2 = 3
    value.sum().backward()
    torch.testing.assert_close(mu.grad, torch.tensor([[1.0, 0.0]]))  # 2 mu / D
    torch.testing.assert_close(sigma.grad, torch.tensor([[1.0, 2.0]]))  # 2 sigma / D: toward 0, not 1


@pytest.mark.parametrize("name", LOOP_SCRIPTS)
def test_per_stage_beta_and_kl_form_are_in_force(tmp_path, capsys, monkeypatch, name):
    args = [*TINY, "--num-minibatches", "1", "--total-timesteps", "64", "--stage-weights", "1", "1", "--stage-betas", "5e-4", "1e-3",
            "--kl-form", "moments"]
    s, _, _ = run(name, args, tmp_path, capsys, monkeypatch)
    assert [round(v, 8) for _, v in s["gorl/beta"]] == [5e-4, 5e-4, 1e-3, 1e-3]
    # The release form of an N(0, I) latent policy is 0 + 1 = 1 (the analytic KL would be 0): stage 0's first minibatch.
    assert s["gorl/latent_kl"][0][1] == pytest.approx(1.0, abs=0.05)


def test_gorl_sac_evaluates_the_new_decoder_at_z_0_right_after_the_refit(tmp_path, capsys, monkeypatch):
    m = MODULES["gorl_sac_diff.py"]
    rec = Recorder(monkeypatch)
    args = ["--env-id", "Hopper-v5", "--env-backend", "dm_control", "--batch-size", "32", "--learning-starts", "100", "--utd-ratio", "1",
            "--num-envs", "2", "--num-eval-envs", "3", "--eval-every", "100000", "--total-timesteps", "400", "--stage-weights", "1", "1",
            "--refine-episodes", "4", "--refine-num-envs", "4", "--decoder-epochs", "2", "--save-model"]
    s, run_dir, _ = run("gorl_sac_diff.py", args, tmp_path, capsys, monkeypatch)
    decoder = m.Decoder(11, 3, saved_model(run_dir, "gorl_sac_diff.py")["args"]["decoder_hidden"])
    decoder.load_state_dict(saved_model(run_dir, "gorl_sac_diff.py")["decoder"])  # the last stage's, refit at its start
    evaluations = [calls for num_envs, calls in rec.by_env if num_envs == 3]
    assert len(evaluations) == 4  # at 0, at the stage end, right after the refit, at the end
    # Right after the refit the restarted actor is the prior, so its deterministic latent is z = 0 for every state.
    obs, actions = (np.stack(x) for x in zip(*evaluations[2]))
    with torch.no_grad():
        expected = torch.tanh(decoder(torch.as_tensor(obs).flatten(0, 1), torch.zeros(obs.shape[0] * 3, 3))).numpy()
    np.testing.assert_allclose(actions.reshape(-1, 3), expected, atol=1e-5)


@pytest.mark.parametrize("name", LOOP_SCRIPTS)
def test_later_stage_learning_rates_and_gradient_clipping_are_in_force(tmp_path, capsys, monkeypatch, name):
    args = [*TINY, "--num-minibatches", "1", "--total-timesteps", "48", "--stage-weights", "1", "1", "1", "--learning-rate", "1e-3",
            "--stage-learning-rates", "1e-3", "4e-4", "2e-4", "--max-grad-norm", "0.5", "--stage-max-grad-norms", "0.5", "0.7"]
    s, _, _ = run(name, args, tmp_path, capsys, monkeypatch)
    assert [round(v, 8) for _, v in s["charts/learning_rate"]] == [1e-3, 4e-4, 2e-4]
    assert [round(v, 6) for _, v in s["charts/max_grad_norm"]] == [0.5, 0.7, 0.7]
