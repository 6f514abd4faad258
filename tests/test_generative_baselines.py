"""fpo.py and dppo.py: the stored rollout quantities are reused exactly, the policies' invariants, end to end."""
import os
import re

import pytest
import torch

from conftest import E2E_BACKENDS, load_script, only_run_dir, read_scalars, run_inprocess, run_script

fpo = load_script("fpo.py")
dppo = load_script("dppo.py")
TINY = ["--num-envs", "2", "--unroll-length", "8", "--batch-size", "2", "--num-minibatches", "8", "--update-epochs", "1",
        "--num-eval-envs", "2", "--eval-every", "1024"]


# ---------------------------------------------------------------- FPO
def test_fpo_stored_samples_reproduce_the_stored_losses():
    torch.manual_seed(0)
    agent = fpo.Agent(6, 3, flow_steps=10, samples_per_action=8)
    obs = torch.randn(64, 6)
    u, (eps, t, losses), env_action = agent.act(obs)
    assert eps.shape == (64, 8, 3) and t.shape == (64, 8, 1) and losses.shape == (64, 8)
    assert set(torch.round(t * 10).unique().tolist()) <= set(range(1, 11))  # t from the schedule {0.1, ..., 1.0}
    torch.testing.assert_close(env_action, torch.tanh(u))
    # The update recomputes the losses at the stored (eps, t): same parameters -> same losses -> ratio exactly 1.
    again = agent.cfm_loss(obs, u, eps, t)
    assert torch.equal(again, losses) or torch.allclose(again, losses, rtol=1e-6, atol=1e-7)
    assert torch.exp(losses.mean(-1) - again.mean(-1)).sub(1).abs().max() < 1e-6


def test_fpo_cfm_loss_is_lower_on_own_samples_than_on_shifted_actions():
    torch.manual_seed(1)
    agent = fpo.Agent(4, 2, flow_steps=10, samples_per_action=8)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-3)
    obs = torch.randn(512, 4)
    target = torch.tanh(obs[:, :2]) * 0.5  # a state-dependent action the flow learns to produce
    for _ in range(200):
        eps = torch.randn(512, 8, 2)
        t = torch.rand(512, 8, 1)
        loss = agent.cfm_loss(obs, target, eps, t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        u, (eps, t, own), _ = agent.act(obs)
        shifted = agent.cfm_loss(obs, u + 1.0, eps, t)
        assert (u - target).abs().mean() < 0.3  # the flow samples near what it was trained on
    assert own.mean() < shifted.mean()


# ---------------------------------------------------------------- DPPO
def test_dppo_recomputed_step_logprobs_match_the_stored_ones():
    torch.manual_seed(0)
    agent = dppo.Agent(5, 3, denoising_steps=10, min_std=0.1)
    torch.nn.init.normal_(agent.actor[-1].weight, std=0.5)
    obs = torch.randn(32, 5)
    chain, logprobs, action = agent.act(obs)
    assert chain.shape == (32, 11, 3) and logprobs.shape == (32, 10)
    torch.testing.assert_close(agent.chain_logprobs(obs, chain), logprobs, rtol=1e-5, atol=1e-5)
    # and on a [B, T, ...] batch, as in the update
    torch.testing.assert_close(agent.chain_logprobs(obs.view(4, 8, 5), chain.view(4, 8, 11, 3)), logprobs.view(4, 8, 10), rtol=1e-5, atol=1e-5)
    assert (logprobs <= 2).all() and (logprobs >= -5).all()


@pytest.mark.parametrize("min_std", [0.1, 0.3])
def test_dppo_std_floor_holds_at_every_step(min_std):
    agent = dppo.Agent(5, 2, denoising_steps=10, min_std=min_std)
    obs, x = torch.randn(16, 5), torch.randn(16, 2)
    stds = [agent.step_dist(obs, x, torch.full((16, 1), float(t))).stddev for t in range(10)]
    assert min(s.min().item() for s in stds) >= min_std - 1e-7
    assert stds[0].min().item() == pytest.approx(min_std)  # the last step's posterior std is 0: floored


def test_dppo_actions_stay_in_bounds():
    torch.manual_seed(2)
    agent = dppo.Agent(5, 4, denoising_steps=10, min_std=0.1)
    for p in agent.actor.parameters():
        torch.nn.init.normal_(p, std=3.0)  # a wild network
    _, _, action = agent.act(torch.randn(256, 5) * 10)
    assert action.abs().max() <= 1.0


def test_dppo_deterministic_sampling_is_upstreams_rule():
    # DPPO's evaluation (model/diffusion/diffusion_vpg.py, forward, DDPM branch): every step keeps the schedule's own
    # posterior std floored at 1e-3 (not --min-std) and the step that makes the action adds no noise. Rebuild each step
    # of the returned chain from a twin of the generator and check it against that rule.
    torch.manual_seed(3)
    agent = dppo.Agent(5, 3, denoising_steps=10, min_std=0.5)  # 0.5 is above the schedule's std at steps 1..5
    torch.nn.init.normal_(agent.actor[-1].weight, std=0.5)
    obs = torch.randn(64, 5)
    with torch.no_grad():
        chain, _, action = agent.act(obs, torch.Generator().manual_seed(7), deterministic=True)
        twin = torch.Generator().manual_seed(7)
        torch.testing.assert_close(chain[:, 0], torch.randn(64, 3, generator=twin), rtol=0, atol=0)
        for k, t in enumerate(range(9, -1, -1)):
            mean = agent.step_dist(obs, chain[:, k], torch.full((64, 1), float(t))).mean
            noise = torch.randn(64, 3, generator=twin).clamp(-3.0, 3.0)
            std = agent.std[t].clamp(min=1e-3) if t > 0 else 0.0
            torch.testing.assert_close(chain[:, k + 1], mean + std * noise, msg=lambda m: f"step t={t}: {m}")
        last = agent.step_dist(obs, chain[:, 9], torch.zeros(64, 1)).mean
        assert torch.equal(chain[:, 10], last), "the last denoising step added noise"
        torch.testing.assert_close(action, last.clamp(-1.0, 1.0), rtol=0, atol=0)
        again = agent.act(obs, torch.Generator().manual_seed(7), deterministic=True)[2]
        sampled = agent.act(obs, torch.Generator().manual_seed(7))[2]
    assert torch.equal(action, again)  # the same generator seed, the same evaluation actions
    assert (sampled - action).abs().max() > 0.05  # the training sampler differs (--min-std noise, also at the end)


# ---------------------------------------------------------------- both
@pytest.mark.parametrize("name", ["fpo.py", "dppo.py"])
def test_first_minibatch_after_a_rollout_has_ratio_one(tmp_path, name):
    # One epoch of one minibatch: the logged approx-KL and clip fraction are those of the first minibatch, computed
    # from the stored rollout quantities through the whole storage/reshape path.
    r = run_script(name, ["--env-id", "InvertedPendulum-v5", "--env-backend", "dm_control", "--num-envs", "4", "--unroll-length", "8", "--batch-size", "4",
                          "--num-minibatches", "1", "--update-epochs", "1", "--total-timesteps", "96", "--eval-every", "100000", "--num-eval-envs", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_scalars(only_run_dir(tmp_path))
    assert all(abs(v) < 1e-6 for _, v in s["losses/approx_kl"]), s["losses/approx_kl"]
    assert all(v == 0 for _, v in s["losses/clipfrac"])


@pytest.mark.parametrize("name", ["fpo.py", "dppo.py"])
@pytest.mark.parametrize("backend", E2E_BACKENDS)
def test_end_to_end_saves_and_reloads(tmp_path, name, backend):
    r = run_script(name, ["--env-id", "CheetahRun", "--env-backend", backend, *TINY, "--total-timesteps", "1024", "--save-model"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    s = read_scalars(run_dir)
    for key in ["charts/SPS", "eval/episodic_return", "losses/policy_loss", "losses/value_loss", "losses/approx_kl", "losses/clipfrac",
                "perf/rollout_SPS"]:
        assert key in s, key
    r = run_script(name, ["--eval-checkpoint", os.path.join(run_dir, name.replace(".py", ".cleanrl_model"))], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    reloaded = float(re.search(r"eval/episodic_return=([-\d.e+]+)", r.stdout).group(1))
    assert reloaded == pytest.approx(s["eval/episodic_return"][-1][1], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("name,args,message", [
    ("fpo.py", ["--flow-steps", "0"], "--flow-steps must be positive"),
    ("fpo.py", ["--samples-per-action", "0"], "--samples-per-action must be positive"),
    ("fpo.py", ["--clip-coef", "-0.05"], "--clip-coef must be positive"),
    ("dppo.py", ["--denoising-steps", "0"], "--denoising-steps must be positive"),
    ("dppo.py", ["--min-std", "-0.1"], "--min-std must be positive"),
    ("dppo.py", ["--env-id", "CheetaRun"], "did you mean CheetahRun"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, name, args, message):
    code, out, err = run_inprocess(name, ["--env-id", "CheetahRun", *args], tmp_path, capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("name", ["fpo.py", "dppo.py"])
def test_ppo_checkpoint_is_refused(tmp_path, capsys, monkeypatch, name):
    path = tmp_path / "ppo.cleanrl_model"
    torch.save({"script": "ppo_gaussian.py", "args": {}}, path)
    code, out, err = run_inprocess(name, ["--eval-checkpoint", str(path)], tmp_path, capsys, monkeypatch)
    assert code == 2 and "written by ppo_gaussian.py" in err
