"""gorl_ppo_fm.py and gorl_ppo_diff.py: decoder, reset, KL, fixed-prior refit, stages, end to end, bad input."""
import os
import re
import types

import numpy as np
import pytest
import torch

from conftest import E2E_BACKENDS, load_script, only_run_dir, read_scalars, run_inprocess, run_script

SCRIPTS = ["gorl_ppo_fm.py", "gorl_ppo_diff.py"]
DECODER_SCRIPTS = SCRIPTS + ["gorl_sac_diff.py"]  # GoRL-SAC carries the diffusion decoder and refit line for line
MODULES = {name: load_script(name) for name in DECODER_SCRIPTS}
TINY = ["--num-envs", "2", "--unroll-length", "8", "--batch-size", "2", "--num-minibatches", "8", "--update-epochs", "1",
        "--num-eval-envs", "2", "--eval-every", "100000", "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "2",
        "--decoder-batch-size", "256"]


@pytest.fixture(params=SCRIPTS)
def script(request):
    return request.param, MODULES[request.param]


@pytest.fixture(params=DECODER_SCRIPTS)
def decoder_script(request):
    return request.param, MODULES[request.param]


# ---------------------------------------------------------------- decoder, reset, KL
def test_fresh_decoder_is_exactly_the_identity(decoder_script):
    _, m = decoder_script
    decoder = m.Decoder(7, 3, 64)
    decoder.obs_mean.normal_()  # whatever its observation statistics
    obs, z = torch.randn(500, 7) * 5, torch.randn(500, 3) * 3
    assert torch.equal(decoder(obs, z), z)


def test_decoding_is_deterministic_and_batched(decoder_script):
    _, m = decoder_script
    torch.manual_seed(0)
    decoder = m.Decoder(4, 2, 32)
    torch.nn.init.normal_(decoder.net[-1].weight)  # a non-trivial decoder
    obs, z = torch.randn(256, 4), torch.randn(256, 2)
    calls = []
    decoder.net.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = decoder(obs, z)
        assert len(calls) == decoder.num_steps == 10  # one network call per step for the whole batch, no loop over samples
        assert torch.equal(out, decoder(obs, z))  # no noise in decoding
        rowwise = torch.cat([decoder(obs[i : i + 1], z[i : i + 1]) for i in range(0, 256, 37)])
    torch.testing.assert_close(rowwise, out[::37], rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, z)


def test_prior_reset_gives_standard_normal_latents_for_any_observation(script):
    _, m = script
    agent = m.Agent(9, 4)
    agent = m.reset_encoder(agent, "prior", 9, 4)
    dist = agent.get_dist(torch.randn(100, 9) * 10)
    assert torch.equal(dist.mean, torch.zeros(100, 4))
    torch.testing.assert_close(dist.scale, torch.ones(100, 4), atol=1e-6, rtol=0)
    critic_before = [p.clone() for p in agent.critic.parameters()]
    agent = m.reset_encoder(agent, "prior", 9, 4)
    assert all(torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))  # the critic is kept
    assert m.reset_encoder(agent, "none", 9, 4) is agent  # `fresh`: tests/test_gorl_mechanisms.py


def test_kl_to_prior_is_analytic_and_pulls_to_standard_normal(decoder_script):
    _, m = decoder_script
    dist = torch.distributions.Normal(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0]]))
    # 0.5 * [(1 + 1 - 1 - 0) + (0 + 4 - 1 - 2 ln 2)]
    torch.testing.assert_close(m.kl_to_prior(dist), torch.tensor([0.5 * (1 + 3 - 2 * np.log(2.0))], dtype=torch.float32))
    assert m.kl_to_prior(torch.distributions.Normal(torch.zeros(3, 2), torch.ones(3, 2))).abs().max() == 0
    reference = torch.distributions.kl_divergence(dist, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(m.kl_to_prior(dist), reference)
    mu = torch.tensor([[1.5, -2.0]], requires_grad=True)
    log_sigma = torch.tensor([[1.0, -1.0]], requires_grad=True)
    optimizer = torch.optim.SGD([mu, log_sigma], lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        m.kl_to_prior(torch.distributions.Normal(mu, log_sigma.exp())).sum().backward()
        optimizer.step()
    torch.testing.assert_close(mu.detach(), torch.zeros(1, 2), atol=1e-3, rtol=0)
    torch.testing.assert_close(log_sigma.detach(), torch.zeros(1, 2), atol=1e-3, rtol=0)


# ---------------------------------------------------------------- the fixed-prior refit (paper Sec. 3.2, Eq. 4)
def fit(m, obs, action, epochs=40):
    torch.manual_seed(0)
    args = types.SimpleNamespace(refine_input="prior", decoder_hidden=64, decoder_lr=1e-3, decoder_epochs=epochs, decoder_batch_size=512,
                                 decoder_steps=0, target_clip=3.0, refit_validation="epochs", refit_checkpoint_by="loss",
                                 chain_loss_weight=0.0)
    episode = torch.arange(len(obs)) // 100  # 100-step "episodes"; 10% of them are held out
    return m.fit_decoder((obs, action, torch.zeros_like(action), episode), args, torch.device("cpu"))


def test_refit_from_the_prior_learns_a_bimodal_action_distribution(decoder_script):
    _, m = decoder_script
    g = torch.Generator().manual_seed(1)
    n = 12000
    obs = torch.randn(n, 3, generator=g)
    action = torch.where(torch.rand(n, 1, generator=g) < 0.5, 0.8, -0.8) + 0.05 * torch.randn(n, 1, generator=g)
    decoder, train_loss, val_loss = fit(m, obs, action)
    assert np.isfinite(train_loss) and np.isfinite(val_loss)
    with torch.no_grad():
        samples = decoder(torch.randn(4000, 3, generator=g), torch.randn(4000, 1, generator=g)).squeeze(1)
    near_plus, near_minus = ((samples - 0.8).abs() < 0.3).float().mean(), ((samples + 0.8).abs() < 0.3).float().mean()
    between = (samples.abs() < 0.4).float().mean()
    # The best single Gaussian (mean 0, std 0.8) puts 38% of its mass in |a| < 0.4 and 68% between the modes.
    gaussian = torch.distributions.Normal(0.0, action.std().item())
    gaussian_between = (gaussian.cdf(torch.tensor(0.4)) - gaussian.cdf(torch.tensor(-0.4))).item()
    assert gaussian_between > 0.35
    assert near_plus > 0.35 and near_minus > 0.35, (near_plus, near_minus)
    assert between < 0.1, between


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    (["--beta", "-0.1"], "--beta must be non-negative"),
    (["--obs-stats-timing", "rollout_consistent", "rollout_consistent", "--stage-weights", "1"], "one value or one per stage"),
    (["--stage-betas", "1e-3", "-1"], "--stage-betas must be non-negative"),
    (["--stage-learning-rates", "0"], "--stage-learning-rates must be positive"),
    (["--stage-weights", "1", "0"], "--stage-weights must be positive"),
    (["--stage-weights", "-1"], "--stage-weights must be positive"),
    (["--stage-weights", "100", "1", *TINY, "--total-timesteps", "12800"], "needs 1 iteration"),
    (["--refine-episodes", "8", "--refine-num-envs", "64"], "--refine-episodes must be at least 2"),
    (["--decoder-epochs", "0"], "--decoder-epochs must be positive"),
    (["--decoder-steps", "-5"], "--decoder-steps must be non-negative"),
    (["--target-clip", "-1"], "--target-clip must be non-negative"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, script, args, message):
    name, _ = script
    code, out, err = run_inprocess(name, ["--env-id", "CheetahRun", *args], tmp_path, capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_empty_stage_weights_is_refused(tmp_path, capsys, monkeypatch, script):
    name, _ = script
    code, out, err = run_inprocess(name, ["--env-id", "CheetahRun", "--stage-weights"], tmp_path, capsys, monkeypatch)
    assert code == 2, err


def test_decoder_checkpoint_from_another_script_or_task_is_refused(tmp_path, capsys, monkeypatch, script):
    name, _ = script
    other = tmp_path / "ppo.cleanrl_model"
    torch.save({"script": "ppo_gaussian.py", "args": {"env_id": "CheetahRun"}}, other)
    code, out, err = run_inprocess(name, ["--env-id", "CheetahRun", "--decoder-checkpoint", str(other), *TINY, "--total-timesteps", "256", "--stage-weights", "1"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "written by ppo_gaussian.py" in err and len(err.strip().splitlines()) == 1, err
    same_script_other_task = tmp_path / "walker.cleanrl_model"
    torch.save({"script": name, "args": {"env_id": "WalkerWalk", "decoder_hidden": 64}, "decoders": []}, same_script_other_task)
    code, out, err = run_inprocess(name, ["--env-id", "CheetahRun", "--decoder-checkpoint", str(same_script_other_task), *TINY, "--total-timesteps", "256", "--stage-weights", "1"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "is no decoder of --env-id CheetahRun" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("backend", E2E_BACKENDS)
def test_two_stages_end_to_end_with_stage_budgets_and_reload(tmp_path, script, backend):
    name, _ = script
    # 2 stages of 8 iterations (128 steps each): 2048 training steps; refinement collects 2 episodes (2000 steps).
    r = run_script(name, ["--env-id", "CartpoleBalance", "--env-backend", backend, *TINY, "--total-timesteps", "2048", "--stage-weights", "1", "1", "--save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    s = read_scalars(run_dir)
    stages = [v for _, v in s["gorl/stage"]]
    assert stages == [0] * 8 + [1] * 8  # the stages' iterations are the split of --total-timesteps
    assert s["charts/SPS"][-1][0] == 2048  # global_step counts training steps only
    assert s["gorl/refine_steps"] == [(1024, 2000.0)]  # refinement steps are logged on their own
    assert [step for step, _ in s["eval/episodic_return"]] == [0, 1024, 2048]  # start and every stage end
    for key in ["perf/rollout_SPS", "gorl/latent_kl", "gorl/latent_mean", "gorl/latent_std", "decoder/train_loss", "decoder/val_loss", "gorl/refine_return", "gorl/eval_after_refit"]:
        assert key in s, key
    checkpoint = torch.load(os.path.join(run_dir, name.replace(".py", ".cleanrl_model")), weights_only=True)
    assert checkpoint["loop"]["stage"] == 1 and "decoders" not in checkpoint["loop"]  # the refit decoder is the model's
    assert not torch.equal(checkpoint["decoder"]["net.8.weight"], torch.zeros_like(checkpoint["decoder"]["net.8.weight"]))

    r = run_script(name, ["--eval-checkpoint", os.path.join(run_dir, name.replace(".py", ".cleanrl_model"))], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    reloaded = float(re.search(r"eval/episodic_return=([-\d.e+]+)", r.stdout).group(1))
    assert reloaded == pytest.approx(s["eval/episodic_return"][-1][1], rel=1e-5, abs=1e-4)
