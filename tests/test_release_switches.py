"""The released code's behaviours, each a flag that is off by default: upstream FPO's normalizer (`legacy_batch_only`,
`legacy_pre_update`), its tanh entropy term, and the release's per-stage encoder restarts. Each test fails when its
flag is ignored (or, for the per-stage ones, when only one of the values is used for every stage)."""
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import has_envpool, run_main, load_script, only_run_dir, read_scalars, run_inprocess

BASELINES = ["ppo_gaussian.py", "fpo.py", "dppo.py"]
FAST_ENV = ["--env-id", "InvertedPendulum-v5", "--env-backend", "dm_control", "--num-eval-envs", "1", "--eval-every", "100000"]
ONE_UPDATE = ["--num-minibatches", "1", "--update-epochs", "1"]
TINY_BASE = [*FAST_ENV, *ONE_UPDATE, "--num-envs", "4", "--unroll-length", "8", "--batch-size", "8"]  # 64 steps/iteration
# GoRL: 2 training envs, 1 evaluation env, 3 refinement envs; one minibatch of 2 segments of 8 steps: 16 steps/iteration.
TINY_GORL = ["--env-id", "Hopper-v5", "--env-backend", "dm_control", "--num-envs", "2", "--unroll-length", "8",
             "--batch-size", "2", "--num-minibatches", "1", "--update-epochs", "1", "--num-eval-envs", "1",
             "--eval-every", "100000", "--refine-episodes", "3", "--refine-num-envs", "3", "--decoder-epochs", "2",
             "--decoder-batch-size", "256"]
ppo = load_script("ppo_gaussian.py")


def run(name, args, tmp_path, capsys, monkeypatch):
    code, out, err = run_inprocess(name, args, tmp_path, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    run_dir = only_run_dir(tmp_path)
    return read_scalars(run_dir), run_dir


def reference_update(stats, x, accumulate):
    """Upstream FPO's RunningStats.update (accumulate=False) or the Welford merge, on (mean, m2, count), float64."""
    mean, m2, count = stats
    total = count + len(x)
    new_mean = mean + (x - mean).sum(0) / total
    batch_m2 = ((x - mean) * (x - new_mean)).sum(0)
    return new_mean, (m2 if accumulate else 0.0) + batch_m2, total


# ---------------------------------------------------------------- the normalizer's accumulation
def test_legacy_batch_only_keeps_the_last_batch_variance_over_the_accumulated_count():
    # By hand: [0, 2] gives mean 1, var 1. Then [1, 3]: mean 1.5; upstream keeps only this batch's
    # sum (x - 1)(x - 1.5) = 0 * -0.5 + 2 * 1.5 = 3 over the count 4: var 0.75 (all four samples: 1.25).
    legacy, cumulative = ppo.RunningMeanStd(1), ppo.RunningMeanStd(1)
    for batch in ([[0.0], [2.0]], [[1.0], [3.0]]):
        legacy.update(torch.tensor(batch), accumulate=False)
        cumulative.update(torch.tensor(batch))
    assert legacy.count.item() == cumulative.count.item() == 4
    assert legacy.mean.item() == cumulative.mean.item() == 1.5
    assert legacy.var.item() == pytest.approx(0.75, abs=1e-12)
    assert cumulative.var.item() == pytest.approx(1.25, abs=1e-12)
    torch.testing.assert_close(legacy(torch.tensor([[3.0]])), torch.tensor([[1.5 / 0.75**0.5]]))


def test_legacy_batch_only_std_shrinks_like_one_over_sqrt_batches():
    torch.manual_seed(0)
    legacy, cumulative = ppo.RunningMeanStd(3), ppo.RunningMeanStd(3)
    for _ in range(100):
        x = torch.randn(1000, 3) * 2.0
        legacy.update(x, accumulate=False)
        cumulative.update(x)
    assert cumulative.var.sqrt().sub(2.0).abs().max() < 0.05
    assert legacy.var.sqrt().sub(0.2).abs().max() < 0.02  # 2 / sqrt(100)


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_loop_uses_the_legacy_accumulation(tmp_path, monkeypatch, name):
    # Two iterations; the last merge must be upstream's: the old mean follows from the new one, the count and the batch.
    args = [*TINY_BASE, "--total-timesteps", "128", "--obs-stats-accumulation", "legacy_batch_only"]
    g = run_main(name, args, tmp_path, monkeypatch)
    rms, x = g["obs_rms"], g["obs"][:, : g["T"]].reshape(-1, g["obs_dim"]).double()
    total, n = rms.count.item(), len(x)
    assert total == 128
    old_mean = (rms.mean * total - x.sum(0)) / (total - n)
    expected = ((x - old_mean) * (x - rms.mean)).sum(0) / total
    torch.testing.assert_close(rms.var, expected, msg=lambda m: f"the loop's normalizer is not upstream's legacy merge: {m}")


# ---------------------------------------------------------------- the normalizer's timing
@pytest.mark.parametrize("name", BASELINES)
def test_pre_update_timing_normalizes_the_batch_with_statistics_that_include_it(tmp_path, monkeypatch, name):
    raw_of = lambda g: g["obs"].transpose(1, 2).reshape(-1, g["T"] + 1, g["obs_dim"])  # noqa: E731
    (tmp_path / "legacy").mkdir(), (tmp_path / "default").mkdir()
    args = [*TINY_BASE, "--total-timesteps", "64", "--obs-stats-timing", "legacy_pre_update"]
    g = run_main(name, args, tmp_path / "legacy", monkeypatch)
    raw = raw_of(g)
    assert g["obs_rms"].count.item() == 64  # one iteration, merged once (before its update)
    torch.testing.assert_close(g["segments"]["obs"], g["obs_rms"](raw))
    assert not torch.allclose(g["segments"]["obs"], raw)  # the merged statistics moved the normalization
    # The default normalizes the first batch with the statistics that acted on it: the initial identity.
    g = run_main(name, [*TINY_BASE, "--total-timesteps", "64"], tmp_path / "default", monkeypatch)
    torch.testing.assert_close(g["segments"]["obs"], raw_of(g))
    assert g["obs_rms"].count.item() == 64


def test_gorl_timing_per_stage_shows_in_the_first_minibatch_ratio(tmp_path, capsys, monkeypatch):
    # 2 stages of 2 iterations, one minibatch each: its approx-KL is 0 exactly when the update normalizes as the
    # rollout did (rollout_consistent) and not when the statistics changed in between (legacy_pre_update). `fresh`, so
    # the latent policy depends on the observation from the start (`prior` is N(0, I) for any observation).
    args = [*TINY_GORL, "--total-timesteps", "64", "--stage-weights", "1", "1", "--stage-encoder-resets", "fresh",
            "--obs-stats-timing", "legacy_pre_update", "rollout_consistent"]
    s, _ = run("gorl_ppo_fm.py", args, tmp_path, capsys, monkeypatch)
    kl = [v for _, v in s["losses/approx_kl"]]
    assert [v for _, v in s["gorl/stage"]] == [0, 0, 1, 1]
    assert all(abs(v) > 1e-5 for v in kl[:2]) and all(abs(v) < 1e-6 for v in kl[2:]), kl


def test_gorl_accumulation_per_stage_matches_a_reference_on_the_recorded_observations(tmp_path, capsys, monkeypatch):
    observations = []
    original_step = gym.vector.SyncVectorEnv.step

    def step(env, action):
        out = original_step(env, action)
        if env.num_envs == 2:  # the training envs (evaluation has 1, the refit 3)
            observations.append(np.asarray(out[0], dtype=np.float32))
        return out

    original_reset = gym.vector.SyncVectorEnv.reset

    def reset(env, *a, **k):
        out = original_reset(env, *a, **k)
        if env.num_envs == 2:
            observations.append(np.asarray(out[0], dtype=np.float32))
        return out

    monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", step)
    monkeypatch.setattr(gym.vector.SyncVectorEnv, "reset", reset)
    args = [*TINY_GORL, "--total-timesteps", "64", "--stage-weights", "1", "1", "--save-model",
            "--obs-stats-accumulation", "cumulative", "legacy_batch_only"]
    _, run_dir = run("gorl_ppo_fm.py", args, tmp_path, capsys, monkeypatch)
    model = torch.load(os.path.join(run_dir, "gorl_ppo_fm.cleanrl_model"), weights_only=False)
    acted = np.stack(observations[:-1])  # the observations each action was chosen for: 4 iterations of 8 steps
    assert acted.shape[0] == 32
    stats = (np.zeros(11), np.zeros(11), 0)
    for iteration in range(4):
        x = acted[iteration * 8 : (iteration + 1) * 8].reshape(-1, 11).astype(np.float64)
        stats = reference_update(stats, x, accumulate=iteration < 2)  # stage 0 cumulative, stage 1 upstream's
    mean, m2, count = stats
    assert model["obs_rms"]["count"].item() == count == 64
    np.testing.assert_allclose(model["obs_rms"]["mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model["obs_rms"]["var"].numpy(), m2 / count, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the tanh entropy term
@pytest.mark.parametrize("name,extra", [("ppo_gaussian.py", []), ("gorl_ppo_fm.py", ["--stage-weights", "1"])])
def test_tanh_entropy_correction_adds_the_log_jacobian(tmp_path, monkeypatch, name, extra):
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir()
    args = [*TINY_BASE, "--total-timesteps", "64", *extra]
    g = run_main(name, [*args, "--tanh-entropy-correction"], tmp_path / "on", monkeypatch, function="ppo_update")
    plain = g["dist"].entropy().sum(-1).mean().item()
    # log(1 - tanh(u)^2) < 0 for every u: the corrected entropy is below the Gaussian one by about D * E[log(1 - tanh^2)].
    assert g["entropy"].item() < plain - 0.05, (g["entropy"].item(), plain)
    g = run_main(name, args, tmp_path / "off", monkeypatch, function="ppo_update")
    assert g["entropy"].item() == pytest.approx(g["dist"].entropy().sum(-1).mean().item(), abs=1e-6)


# ---------------------------------------------------------------- per-stage encoder restarts
def test_encoder_reset_per_stage(tmp_path, capsys, monkeypatch):
    # prior, then fresh (new actor, critic, normalizer and Adam), then none (everything kept): 3 stages of 2 iterations.
    args = [*TINY_GORL, "--total-timesteps", "96", "--stage-weights", "1", "1", "1", "--save-model",
            "--stage-encoder-resets", "prior", "fresh", "none"]
    s, run_dir = run("gorl_ppo_fm.py", args, tmp_path, capsys, monkeypatch)
    assert [v for _, v in s["gorl/stage"]] == [0, 0, 1, 1, 2, 2]
    model = torch.load(os.path.join(run_dir, "gorl_ppo_fm.cleanrl_model"), weights_only=False)
    assert model["obs_rms"]["count"].item() == 64  # reset at stage 1 (fresh), kept at stage 2 (none): 2 * 2 * 16
    assert {int(state["step"]) for state in model["optimizer"]["state"].values()} == {4}  # one Adam since stage 1


def test_prior_best_takes_critic_and_normalizer_from_the_best_encoder(tmp_path, capsys, monkeypatch):
    # Stage 0 evaluates at step 0 and at its end (32 steps); with this seed the step-0 encoder is the best one, so
    # `prior-best` restarts from its normalizer (count 0) where `prior` keeps the last one (count 32).
    args = [*TINY_GORL, "--total-timesteps", "64", "--stage-weights", "1", "1", "--save-model",
            "--stage-encoder-resets", "prior-best"]
    s, run_dir = run("gorl_ppo_fm.py", args, tmp_path, capsys, monkeypatch)
    evals = [v for _, v in s["eval/episodic_return"]]
    assert evals[0] > evals[1], f"precondition: the step-0 encoder must be stage 0's best, got {evals}"
    model = torch.load(os.path.join(run_dir, "gorl_ppo_fm.cleanrl_model"), weights_only=False)
    assert model["obs_rms"]["count"].item() == 32
    actor = model["agent"]
    assert not any(k.startswith("actor") and torch.isnan(v).any() for k, v in actor.items())


def test_per_stage_lists_longer_than_the_stages_are_refused(tmp_path, capsys, monkeypatch):
    for flag, values in [("--stage-encoder-resets", ["prior", "fresh", "warm"]), ("--stage-betas", ["1", "2", "3"])]:
        args = [*TINY_GORL, "--stage-weights", "1", "1", flag, *values]
        code, _, err = run_inprocess("gorl_ppo_fm.py", args, tmp_path, capsys, monkeypatch)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"{flag} takes one value per stage" in err, err


def test_entropy_coefficient_of_the_later_stages(tmp_path, monkeypatch):
    # 2 stages; the last minibatch is in stage 1, whose loss must carry stage 1's entropy coefficient, not --ent-coef.
    args = [*TINY_GORL, "--total-timesteps", "64", "--stage-weights", "1", "1", "--ent-coef", "0.01",
            "--stage-ent-coefs", "0.01", "3.0"]
    g = run_main("gorl_ppo_fm.py", args, tmp_path, monkeypatch, function="ppo_update")
    assert g["args"].ent_coef == 3.0
    rest = g["loss"] - (g["pg_loss"] + g["v_loss"] + g["args"].beta * g["latent_kl"])
    torch.testing.assert_close(rest, -3.0 * g["entropy"])


# ---------------------------------------------------------------- advantages normalized over every step
PPO_FAMILY = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py"]


@pytest.mark.parametrize("name", PPO_FAMILY)
def test_advantage_normalization_over_all_steps_counts_the_masked_ones(name):
    m = load_script(name)
    advantages = torch.tensor([[1.0, 2.0, 0.0, 5.0], [3.0, 0.0, -1.0, 2.0]])  # the masked steps' advantages are already 0
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
    paper = m.normalize_advantages(advantages, mask)
    valid = advantages[mask == 1]
    torch.testing.assert_close(paper[mask == 1], (valid - valid.mean()) / (valid.std() + 1e-8))  # unbiased, valid steps
    assert (paper[mask == 0] == 0).all()
    release = m.normalize_advantages(advantages, mask, over_all_steps=True)
    torch.testing.assert_close(release, (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8))
    assert (release[mask == 0] != 0).all()  # the masked steps take part in the surrogate


@pytest.mark.skipif(not has_envpool(), reason="EnvPool's reset steps are the masked steps here")
@pytest.mark.parametrize("name", PPO_FAMILY)
def test_the_update_normalizes_as_the_flag_says(tmp_path, monkeypatch, name):
    # Hopper falls within tens of steps under a random policy, and EnvPool's reset step after each fall is masked.
    args = ["--env-id", "Hopper-v5", "--env-backend", "envpool", "--num-envs", "4", "--unroll-length", "16", "--batch-size", "8",
            "--num-minibatches", "1", "--update-epochs", "1", "--num-eval-envs", "1", "--eval-every", "100000",
            "--total-timesteps", "128", *(["--stage-weights", "1"] if "gorl" in name else [])]
    for flag, masked_zero in [([], True), (["--normalize-advantages-over-all-steps"], False)]:
        (tmp_path / str(masked_zero)).mkdir()
        u = run_main(name, [*args, *flag], tmp_path / str(masked_zero), monkeypatch)["update"]
        advantages = u["advantages"][..., -1] if u["advantages"].dim() == 3 else u["advantages"]  # FPO, DPPO: per sample/step
        assert (u["mb_mask"] == 0).any(), "precondition: the minibatch has masked steps"
        assert bool((advantages[u["mb_mask"] == 0] == 0).all()) == masked_zero, (name, flag)


# ---------------------------------------------------------------- the refit's validation
@pytest.mark.parametrize("name", ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"])
def test_release_refit_validation_keeps_the_initial_decoder_when_nothing_beats_it(name):
    """A refit whose training only makes the decoder worse (a huge learning rate): the release's validation (`steps`)
    has the initial decoder among its candidates and keeps it; per-epoch validation never does."""
    import types

    m = load_script(name)
    torch.manual_seed(0)
    episodes = 20
    obs = torch.randn(episodes * 50, 5)
    action = torch.randn(episodes * 50, 2) * 0.1
    data = (obs, action, torch.randn_like(action), torch.arange(episodes).repeat_interleave(50))
    kept = {}
    for schedule in ["epochs", "steps"]:
        args = types.SimpleNamespace(target_clip=3.0, decoder_hidden=16, decoder_lr=50.0, refine_input="prior", decoder_steps=0,
                                     decoder_epochs=3, decoder_batch_size=64, refit_validation=schedule,
                                     refit_checkpoint_by="loss", chain_loss_weight=0.0)
        torch.manual_seed(1)
        decoder, _, _ = m.fit_decoder(data, args, "cpu")
        kept[schedule] = decoder.net[-1].weight.abs().sum().item()  # the initial decoder's last layer is zero
    assert kept["steps"] == 0.0 and kept["epochs"] > 0.0, kept


def refit_data(episodes=20, steps=50):
    torch.manual_seed(0)
    obs = torch.randn(episodes * steps, 5)
    action = torch.tanh(obs[:, :2]) + 0.05 * torch.randn(episodes * steps, 2)  # a function of the state
    return obs, action, torch.randn_like(action), torch.arange(episodes).repeat_interleave(steps)


def refit_args(**overrides):
    import types

    return types.SimpleNamespace(**{"target_clip": 3.0, "decoder_hidden": 32, "decoder_lr": 3e-3, "refine_input": "prior",
                                    "decoder_steps": 0, "decoder_epochs": 4, "decoder_batch_size": 64, "refit_validation": "epochs",
                                    "refit_checkpoint_by": "loss", "chain_loss_weight": 0.0, **overrides})


@pytest.mark.parametrize("name", ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"])
def test_chain_loss_fits_the_decode_of_the_encoders_own_latents(name):
    """The release's diffusion refits add the error of the whole decode of the encoder's z: with it the decoder maps
    those z to their actions far better than the prior-noise loss alone does."""
    m = load_script(name)
    obs, _, z, episode = refit_data()
    action = -0.5 * z  # the encoder's latent decides the action, mirrored: the prior-noise fit alone learns z -> +0.5 z
    errors = {}
    for weight in [0.0, 1.0]:
        torch.manual_seed(1)
        decoder, _, _ = m.fit_decoder((obs, action, z, episode), refit_args(chain_loss_weight=weight), "cpu")
        with torch.no_grad():
            errors[weight] = ((decoder(obs, z) - action) ** 2).mean().item()
    assert errors[1.0] < 0.7 * errors[0.0], errors


@pytest.mark.parametrize("name", ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"])
def test_action_error_checkpoint_keeps_the_decoder_whose_decoded_actions_are_closest(name, monkeypatch):
    """`--refit-checkpoint-by action-error` ranks the validated decoders by their decoded held-out actions: a decoder
    made to decode a chosen constant at each validation is kept at the validation whose constant is closest to them."""
    m = load_script(name)
    obs, _, z, episode = refit_data()
    action = torch.zeros(len(obs), 2)  # so a decoder that outputs c has the action error c^2
    constants = iter([3.0, 2.0, 0.5, 1.0])  # one per validation (4 epochs): the third is the best
    original = m.Decoder.forward

    def forward(self, o, latent):
        if torch.is_grad_enabled():  # training passes (the chain loss is off here): the real decoder
            return original(self, o, latent)
        return torch.full_like(latent, next(constants))

    monkeypatch.setattr(m.Decoder, "forward", forward)
    torch.manual_seed(1)
    _, _, best = m.fit_decoder((obs, action, z, episode), refit_args(refit_checkpoint_by="action-error"), "cpu")
    assert best == pytest.approx(0.25), best
    constants = iter([3.0, 2.0, 0.5, 1.0])
    torch.manual_seed(1)
    _, _, best = m.fit_decoder((obs, action, z, episode), refit_args(), "cpu")
    assert best != pytest.approx(0.25) and next(constants) == 3.0  # the loss ranks them, and never decodes


# ---------------------------------------------------------------- the release's evaluation schedule
def test_evals_per_stage_evaluates_across_each_stage_and_the_restarted_encoder_can_be_the_best(tmp_path, capsys, monkeypatch):
    # 2 stages of 4 iterations of 16 steps. --evals-per-stage 3: the start (step 0; later, right after the refit) and
    # after iterations 1 and 4 of each stage, so evaluations at steps 0, 16, 64 | 80, 128; off: 0, 64 | 128. Stage 1
    # trains at a learning rate of 1e-30: its encoder moves by ~1e-30, so every evaluation of stage 1 returns what the
    # restarted encoder (last layer exactly 0) returns, and the first candidate stays the stage's best.
    common = [*TINY_GORL, "--total-timesteps", "128", "--stage-weights", "1", "1", "--save-model", "--stage-learning-rates", "1e-3",
              "1e-30"]
    models = {}
    for flags in [[], ["--evals-per-stage", "3"]]:
        (tmp_path / str(len(flags))).mkdir()
        s, run_dir = run("gorl_ppo_fm.py", [*common, *flags], tmp_path / str(len(flags)), capsys, monkeypatch)
        models[len(flags)] = (s, torch.load(os.path.join(run_dir, "gorl_ppo_fm.cleanrl_model"), weights_only=True))
    (s_off, off), (s_on, on) = models[0], models[2]
    assert [step for step, _ in s_off["eval/episodic_return"]] == [0, 64, 128]
    assert [step for step, _ in s_on["eval/episodic_return"]] == [0, 16, 64, 80, 128]
    assert on["loop"]["best_return"] == pytest.approx(s_on["gorl/eval_after_refit"][0][1])
    assert (on["best_agent"]["actor.8.weight"] == 0).all()  # the restarted encoder, kept as the best
    assert (off["best_agent"]["actor.8.weight"] != 0).any()  # off: stage 1's first candidate is its end, after updates
