"""Every term of the baselines' losses and targets, each pinned on a hand-made batch where it changes the number, as
tests/test_gorl_mechanisms.py does for GoRL's: ppo_gaussian.py, fpo.py, dppo.py (the PPO family) and sac_gaussian.py.

Each test compares a number the script computed with an independent float64 reference written here from the papers'
and upstream formulas, and also checks, on the same batch, that the reference *without that one term* is far from it
(`assert_pinned`): so removing the term from the script fails the test, and no test can pass vacuously.

PPO family: the loss is inline in main, so main runs in this process (runpy) for one iteration on `ScriptedEnvs`
(observations, rewards, terminations and truncations on a fixed schedule, several of each inside every segment), with
several epochs at a large learning rate so that later minibatches have ratios far outside the clip range. A profile
hook copies main's locals at every `optimizer.step()` call: the minibatch, what the loss computed, the gradients, and
the parameters the loss was computed with (not yet stepped). The first step's parameters are the rollout's (one
iteration, so the normalizer is still the identity), which gives the reference the old policy's log-probabilities.

SAC: `sac_update` is a function. It runs on a hand-made batch (a third of the transitions terminal, the target critics
moved away from the online ones), with step pre-hooks on its optimizers recording each step's parameters and gradients;
the reference redraws sac_update's noise from the same seed (the next actions' first, then one draw per actor step).

Mutation check: LOSS_TERMS_SCRIPTS=/some/dir runs every test against the copies of the scripts in that directory."""
import copy
import importlib.util
import inspect
import linecache
import math
import os
import runpy
import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ROOT

SCRIPTS_DIR = os.environ.get("LOSS_TERMS_SCRIPTS", ROOT)
TOL, MARGIN = 1e-4, 1e-2  # script vs reference: float32 noise is ~1e-6 of the scale; a removed term moves it >= MARGIN
LOG_2PI = math.log(2 * math.pi)


def script_path(name):
    return os.path.join(SCRIPTS_DIR, name)


def distance(got, want, relative_norm=False):
    """max |got - want| over max(1, max |want|); for gradients, ||got - want|| / ||want||."""
    got, want = torch.as_tensor(got).double().flatten(), torch.as_tensor(want).double().flatten()
    if relative_norm:
        return float((got - want).norm() / want.norm().clamp(min=1e-12))
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def assert_pinned(what, errors, effects):
    """`errors`: the script's distance to the full reference, per minibatch/step; `effects`: the ablated reference's
    distance to the full one. The script must match the reference everywhere, and the term must matter somewhere."""
    error, effect = max(errors), max(effects)
    print(f"{what}: script vs reference {error:.1e}, effect of removing the term {effect:.1e}")
    assert effect >= MARGIN, f"{what}: removing the term moves the number by only {effect:.1e}: this batch cannot pin it"
    assert error <= TOL, f"{what}: the script is {error:.1e} from the reference (the term removed would be {effect:.1e} away)"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ================================================================ the PPO family
def schedule(i, k):
    """Env i's step from count k: (reward, terminated, truncated). Both on one step is a termination."""
    i, k = np.asarray(i, dtype=np.float64), np.asarray(k, dtype=np.float64)
    return np.sin(0.9 * k + 1.3 * i) + 0.2 * i, (k + 2 * i) % 7 == 6, (k + i) % 5 == 4


class ScriptedEnvs:
    """Stands in for gymnasium's SyncVectorEnv (as test_mechanisms.TickEnvs): env i's observation at count k is
    [i, k, cos(0.7 k + i)] whatever the actions, and its step from count k is `schedule(i, k)`. The count goes on
    across episode ends, so an observation tells its (env, count) and hence its step's reward, termination, truncation."""

    def __init__(self, env_fns, autoreset_mode=None):
        self.n, self.tick = len(env_fns), np.zeros(len(env_fns))
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.envs = [types.SimpleNamespace(spec=types.SimpleNamespace(max_episode_steps=1000))]
        self.unwrapped, self.metadata = self, {"autoreset_mode": autoreset_mode}  # what gym.make_vec sets and checks

    def observation(self):
        i = np.arange(self.n)
        return np.stack([i, self.tick, np.cos(0.7 * self.tick + i)], 1).astype(np.float32)

    def reset(self, seed=None):
        self.tick[:] = 0
        return self.observation(), {}

    def step(self, action):
        reward, terminated, truncated = schedule(np.arange(self.n), self.tick)
        self.tick += 1
        obs = self.observation()
        return obs, reward, terminated, truncated, {"final_obs": obs.copy()}

    def close(self):
        pass


# One iteration of 2 unrolls x 8 steps x 4 envs = 8 segments, 2 minibatches of 4 segments, 4 epochs: 8 optimizer steps.
# gamma 0.8 and lambda 0.7 (not 1), reward scale 2 (not 1): each factor visibly moves the targets.
COMMON = ["--env-id", "InvertedPendulum-v5", "--env-backend", "dm_control", "--no-cuda", "--seed", "1", "--num-envs", "4",
          "--unroll-length", "8", "--batch-size", "4", "--num-minibatches", "2", "--update-epochs", "4", "--total-timesteps", "64",
          "--num-eval-envs", "1", "--eval-every", "100000", "--gamma", "0.8", "--gae-lambda", "0.7", "--reward-scale", "2",
          "--learning-rate", "1e-2"]
RUNS = {
    "ppo": ("ppo_gaussian.py", [*COMMON, "--ent-coef", "0.1"]),
    "ppo-tanh-entropy": ("ppo_gaussian.py", [*COMMON, "--ent-coef", "0.1", "--tanh-entropy-correction"]),
    "fpo": ("fpo.py", [*COMMON, "--flow-steps", "4", "--learning-rate", "5e-2"]),
    # seed 3: one Adam step takes 28 per-sample log-ratios of the second minibatch below -3 (down to -9)
    "fpo-per-sample": ("fpo.py", [*COMMON, "--flow-steps", "4", "--no-average-losses-before-exp", "--learning-rate", "7e-2", "--seed", "3"]),
    # gamma_denoising 0.5: the step weights differ from 1; --min-std 0.05: the log-prob clamp's upper end (2) is reachable
    "dppo": ("dppo.py", [*COMMON, "--denoising-steps", "4", "--gamma-denoising", "0.5", "--min-std", "0.05"]),
}
KEPT = ["idx", "values", "advantages", "v_targets", "logratio", "ratio", "pg_loss", "v_loss", "entropy", "loss"]  # per minibatch
BATCH = ["b_obs", "b_actions", "b_logprobs", "b_eps", "b_t"]  # the iteration's stored rollout (FPO: its (eps, t) samples)
SEGMENTS = {"b_obs": "obs", "b_actions": "actions", "b_logprobs": "logprobs", "b_eps": "cfm_eps", "b_t": "cfm_t"}  # ppo_update's


def run_with_snapshots(name, argv, cwd):
    """Runs the script's main here; returns the run, with a snapshot of the update's locals at every `optimizer.step()`
    (in `ppo_update`, with main's iteration and normalizer, where the script has one; else in main)."""
    path, snapshots, entropy_rng, batch = script_path(name), [], [], {}
    is_step = {}

    def hook(frame, event, arg):
        if event != "call":
            return
        caller = frame.f_back
        if caller is None or caller.f_code.co_name not in ("main", "ppo_update") or caller.f_code.co_filename != path:
            return
        if frame.f_code.co_name == "entropy":  # PPO's entropy draws u for the tanh correction: keep the RNG state
            entropy_rng.append(torch.get_rng_state())
            return
        line = caller.f_lineno
        if line not in is_step:
            is_step[line] = "optimizer.step(" in linecache.getline(path, line)
        if not is_step[line]:
            return
        f = caller.f_locals
        outer = caller.f_back.f_locals if caller.f_code.co_name == "ppo_update" else f  # main's: iteration, obs_rms
        stored = {k: f["segments"][v] for k, v in SEGMENTS.items() if v in f["segments"]} if "segments" in f else f
        agent = f["agent"]
        if not batch:
            batch.update({k: stored[k].detach().clone() for k in BATCH if k in stored})
            batch.update(args=f["args"], agent=copy.deepcopy(agent))
        snapshots.append({
            **{k: f[k].detach().clone() for k in KEPT if k in f and torch.is_tensor(f[k])},
            "params": {n: p.detach().clone() for n, p in agent.named_parameters()},
            "grads": {n: p.grad.detach().clone() for n, p in agent.named_parameters()},
            "iteration": outer["iteration"], "epoch": f["epoch"], "obs_rms_count": float(outer["obs_rms"].count),
            "entropy_rng": entropy_rng[-1] if entropy_rng else None,
        })

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gym.vector, "SyncVectorEnv", ScriptedEnvs)
        mp.chdir(cwd)
        mp.setattr(sys, "argv", [name, *argv])
        linecache.checkcache(path)
        sys.setprofile(hook)
        try:
            runpy.run_path(path, run_name="__main__")
        finally:
            sys.setprofile(None)
    run = types.SimpleNamespace(**batch, snapshots=snapshots, full={})
    args = run.args
    assert len(snapshots) == args.update_epochs * args.num_minibatches, f"{len(snapshots)} optimizer steps recorded"
    assert all(s["iteration"] == 1 and s["obs_rms_count"] == 0 for s in snapshots)  # raw observations throughout
    assert snapshots[0]["epoch"] == 0  # the first step's parameters are those that acted in the rollout
    return run


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory):
    cache = {}

    def get(run_id):
        if run_id not in cache:
            name, argv = RUNS[run_id]
            cache[run_id] = run_with_snapshots(name, argv, tmp_path_factory.mktemp(run_id))
        return cache[run_id]

    return get


def float64_agent(run, params, requires_grad=False):
    agent = copy.deepcopy(run.agent).double()
    with torch.no_grad():
        for n, p in agent.named_parameters():
            p.copy_(params[n])
            p.requires_grad_(requires_grad)
    return agent


def gaussian_log_density(x, mean, std):
    """log N(x; mean, std) per dimension."""
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * LOG_2PI


def brax_gae(rewards, values, terminated, mask, gamma, lam, drop):
    """Brax PPO's compute_gae (brax/training/agents/ppo/losses.py), the authors' GAE, written out with its pieces
    removable: vs_t = V_t + delta_t + gamma lam (1 - term_t) mask_t (vs_{t+1} - V_{t+1}), delta_t = (r_t + gamma
    (1 - term_t) V_{t+1} - V_t) mask_t, and the policy advantage (r_t + gamma (1 - term_t) vs_{t+1} - V_t) mask_t, with
    vs_T = V_T (the bootstrap). `mask` is 0 where the next observation is not the successor (a truncation)."""
    def cut(term):
        return torch.ones_like(terminated) if term in drop else 1 - terminated

    def masked(term):
        return torch.ones_like(mask) if term in drop else mask

    gamma, lam = 1.0 if "gamma" in drop else gamma, 1.0 if "lambda" in drop else lam
    T = rewards.shape[1]
    vs, acc = [None] * T + [values[:, T]], torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = (rewards[:, t] + gamma * cut("termination_delta")[:, t] * values[:, t + 1] - values[:, t]) * masked("mask_delta")[:, t]
        acc = delta + gamma * lam * cut("termination_trace")[:, t] * masked("mask_trace")[:, t] * acc
        vs[t] = values[:, t] + acc
    vs = torch.stack(vs, 1)
    if "brax_advantage" in drop:  # the plain GAE sum instead of Brax's one-step return on vs
        advantages = (vs[:, :T] - values[:, :T]) * masked("mask_advantage")
    else:
        advantages = (rewards + gamma * cut("termination_advantage") * vs[:, 1:] - values[:, :T]) * masked("mask_advantage")
    return advantages, vs[:, :T]


def normalized(advantages, mask, drop):
    """Zero mean, unit std (n - 1) over the steps with mask 1, the others left 0 (the script's choice; Brax's
    normalize_advantage takes every step). Without the advantage mask, every step is an ordinary step."""
    if "normalization" in drop:
        return advantages
    if "normalization_over_valid" in drop or "mask_advantage" in drop:  # over every step, as Brax
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    valid = advantages[mask > 0]
    return (advantages - valid.mean()) / (valid.std() + 1e-8) * mask


def surrogate(advantages, ratio, clip, drop):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7): -mean(min(A r, A clip(r, 1 - eps, 1 + eps)))."""
    clipped = ratio.clamp(1 - clip, 1 + clip)
    if "clip" in drop:
        return -(advantages * ratio).mean()
    if "min" in drop:
        return -(advantages * clipped).mean()
    return -torch.min(advantages * ratio, advantages * clipped).mean()


def cfm_losses(agent, x, a, eps, t):
    """FPO's per-sample CFM loss (McAllister et al. 2025; upstream fpo.py, mode "u_but_supervise_as_eps"):
    x_t = t eps + (1 - t) a, x1_pred = x_t + (1 - t) v(s, x_t, t), L = mean over action dims of (eps - x1_pred)^2."""
    x_t = t * eps + (1 - t) * a.unsqueeze(-2)
    v = agent.velocity(x.unsqueeze(-2).expand(*t.shape[:-1], x.shape[-1]), x_t, t)
    return ((eps - (x_t + (1 - t) * v)) ** 2).mean(-1)


def dppo_chain_logprobs(agent, x, chain, drop):
    """DPPO's per-step log-likelihoods (Ren et al. 2024; upstream model/diffusion/diffusion_ppo.py): column j is the
    step x_{K-j} -> x_{K-j-1} (noisiest first), log N per action dimension clamped to [-5, 2], then averaged."""
    K, columns = agent.K, []
    for j in range(K):
        dist = agent.step_dist(x, chain[..., j, :], torch.full_like(x[..., :1], float(K - 1 - j)))
        log_density = gaussian_log_density(chain[..., j + 1, :], dist.loc, dist.scale)
        if "logprob_clamp" not in drop:
            log_density = log_density.clamp(-5.0, 2.0)
        columns.append(log_density.sum(-1) if "mean_over_dims" in drop else log_density.mean(-1))
    return torch.stack(columns, -1)


def ppo_family_reference(run_id, run, k, drop=frozenset(), grads=False):
    """The loss terms of minibatch `k`, recomputed in float64 from the stored rollout and the parameters the script's
    loss saw; `drop` names the terms to remove. With `grads`, also the gradient of the loss."""
    snap, args, family = run.snapshots[k], run.args, RUNS[run_id][0]
    agent = float64_agent(run, snap["params"], requires_grad=grads)
    rollout_agent = float64_agent(run, run.snapshots[0]["params"])
    idx = snap["idx"]
    obs = run.b_obs[idx].double()
    env, count = obs[:, 0, 0].round().numpy(), obs[:, :-1, 1].round().numpy()
    reward, terminated, truncated = schedule(env[:, None], count)
    rewards = torch.as_tensor(reward) * (1.0 if "reward_scale" in drop else args.reward_scale)
    terminations = torch.as_tensor(terminated, dtype=torch.float64)
    mask = torch.as_tensor(~(truncated & ~terminated), dtype=torch.float64)  # a termination on a truncation step stays one

    values = agent.get_value(obs)  # the *current* critic, every minibatch
    gae_values = values if "stop_gradient" in drop else values.detach()  # Brax: the targets are under stop_gradient
    advantages, v_targets = brax_gae(rewards, gae_values, terminations, mask, args.gamma, args.gae_lambda, drop)
    advantages = normalized(advantages, mask, drop)

    x, out = obs[:, :-1], {}
    if family == "ppo_gaussian.py":  # log-probabilities of the stored pre-tanh u: the tanh Jacobian cancels in the ratio
        actions = run.b_actions[idx].double()
        dist = agent.get_dist(x)
        new = gaussian_log_density(actions, dist.loc, dist.scale).sum(-1)
        rollout_dist = rollout_agent.get_dist(x)
        old = gaussian_log_density(actions, rollout_dist.loc, rollout_dist.scale).sum(-1)
        logratio = new - (new.detach() if "old_policy" in drop else old)
        ratio = logratio.exp()
    elif family == "fpo.py":  # FPO's ratio: exp(L_old - L_new) at the stored (eps, t) samples
        a, eps, t = run.b_actions[idx].double(), run.b_eps[idx].double(), run.b_t[idx].double()
        new = cfm_losses(agent, x, a, eps, t)
        old = new.detach() if "old_policy" in drop else cfm_losses(rollout_agent, x, a, eps, t)
        if args.average_losses_before_exp:  # upstream default: one ratio per action, exp(mean_S L_old - mean_S L_new)
            logratio = old.mean(-1) - new.mean(-1)
            ratio = (old - new).exp().mean(-1) if "average_before_exp" in drop else logratio.exp()
        else:  # one ratio per sample, its log clipped to +-3 (upstream fpo.py); the surrogate averages over samples too
            logratio = old - new if "logratio_clip" in drop else (old - new).clamp(-3.0, 3.0)
            ratio, advantages = logratio.exp(), advantages.unsqueeze(-1)
    else:  # DPPO: one ratio per (transition, denoising step), against the transition's advantage times the step's weight
        chain = run.b_actions[idx].double()
        new = dppo_chain_logprobs(agent, x, chain, drop)
        old = new.detach() if "old_policy" in drop else dppo_chain_logprobs(rollout_agent, x, chain, drop)
        logratio = new - old
        ratio, K = logratio.exp(), agent.K
        weights = torch.ones(K) if "step_weights" in drop else args.gamma_denoising ** torch.arange(K - 1, -1, -1.0)
        advantages = advantages.unsqueeze(-1) * weights.double()  # weight 1 for the step that produces the action

    pg_loss = surrogate(advantages, ratio, args.clip_coef, drop)
    v_loss = (1.0 if "vf_coef" in drop else args.vf_coef) * (mask * (v_targets - values[:, :-1]) ** 2).mean()
    loss = pg_loss + (0.0 if "value_loss" in drop else v_loss)
    if family == "ppo_gaussian.py":  # Gaussian entropy of u, sum over dims, mean over steps; the bonus is -ent_coef * H
        entropy = (0.5 + 0.5 * LOG_2PI + torch.log(dist.scale)).sum(-1).mean()
        if args.tanh_entropy_correction and "tanh_correction" not in drop:  # + E log|d tanh(u)/du| at one sample u
            with torch.random.fork_rng():
                torch.set_rng_state(snap["entropy_rng"])
                noise = torch.randn(dist.loc.shape)  # the script's rsample, redrawn (float32, as the script's)
            u = dist.loc + dist.scale * noise.double()
            entropy = entropy + torch.log1p(-torch.tanh(u) ** 2).sum(-1).mean()
        out["entropy"] = entropy
        if "entropy_bonus" not in drop:
            loss = loss + (1 if "entropy_sign" in drop else -1) * args.ent_coef * entropy
    out.update(values=values, v_targets=v_targets, advantages=advantages, logratio=logratio, ratio=ratio, pg_loss=pg_loss, v_loss=v_loss, loss=loss)
    if grads:
        names = [n for n, _ in agent.named_parameters()]
        g = torch.autograd.grad(loss, list(agent.parameters()), allow_unused=True)
        g = {n: torch.zeros_like(p) if gi is None else gi for (n, p), gi in zip(agent.named_parameters(), g)}
        out["actor_grad"] = torch.cat([g[n].flatten() for n in names if n.startswith("actor.")])
        out["critic_grad"] = torch.cat([g[n].flatten() for n in names if n.startswith("critic.")])
    return {name: value.detach() for name, value in out.items()}


def script_quantity(snap, quantity):
    if quantity in ("actor_grad", "critic_grad"):
        prefix = quantity.split("_")[0] + "."
        return torch.cat([g.flatten() for n, g in snap["grads"].items() if n.startswith(prefix)])
    return snap[quantity]


def full_reference(run_id, run, k):
    """The full reference of minibatch k (with gradients), computed once per run."""
    if k not in run.full:
        run.full[k] = ppo_family_reference(run_id, run, k, grads=True)
    return run.full[k]


GAE_RUNS = ["ppo", "fpo", "dppo"]  # the shared GAE lines, in each of the three scripts
ALL_RUNS = list(RUNS)
# (runs, term removed, the number it changes, what it pins). GAE and the advantage: Brax PPO's compute_gae and loss
# (the authors' code; GAE of Schulman et al. 2016); the surrogate: PPO-clip (Schulman et al. 2017, eq. 7); the ratios:
# FPO (McAllister et al. 2025, upstream fpo.py) and DPPO (Ren et al. 2024, upstream diffusion_ppo.py).
PPO_FAMILY_TERMS = [
    (GAE_RUNS, "termination_delta", "v_targets", "no bootstrap from V(s') after a termination: delta = r + gamma (1 - term) V' - V"),
    (GAE_RUNS, "termination_trace", "v_targets", "the GAE trace stops at a termination: gamma lam (1 - term) (vs' - V')"),
    (GAE_RUNS, "termination_advantage", "advantages", "Brax's policy advantage r + gamma (1 - term) vs' - V: no vs' after a termination"),
    (GAE_RUNS, "mask_delta", "v_targets", "no TD error at a truncation (its next obs is another episode's)"),
    (GAE_RUNS, "mask_trace", "v_targets", "the GAE trace does not cross a truncation"),
    (GAE_RUNS, "mask_advantage", "advantages", "a truncation step's advantage is 0, before and after the normalization"),
    (GAE_RUNS, "gamma", "v_targets", "the discount"),
    (GAE_RUNS, "lambda", "v_targets", "GAE's lambda"),
    (GAE_RUNS, "reward_scale", "v_targets", "--reward-scale multiplies the rewards"),
    (GAE_RUNS, "brax_advantage", "advantages", "the policy advantage is Brax's one-step return on vs, not the GAE sum"),
    (GAE_RUNS, "normalization", "advantages", "advantages normalized per minibatch"),
    (GAE_RUNS, "normalization_over_valid", "advantages", "...over the steps with mask 1 only (Brax: over all)"),
    (GAE_RUNS, "stop_gradient", "critic_grad", "advantages and targets are constants (Brax: stop_gradient)"),
    (ALL_RUNS, "old_policy", "ratio", "the ratio is against the rollout policy: away from 1 in later minibatches"),
    (["fpo"], "average_before_exp", "ratio", "FPO: exp(mean_S L_old - mean_S L_new), the mean inside the exp"),
    (["fpo-per-sample"], "logratio_clip", "logratio", "FPO per-sample ratios: log-ratio clipped to +-LOGRATIO_CLIP = 3"),
    (["dppo"], "logprob_clamp", "ratio", "DPPO: per-dimension step log-probs clamped to [-5, 2]"),
    (["dppo"], "mean_over_dims", "ratio", "DPPO: step log-probs averaged (not summed) over action dimensions"),
    (["dppo"], "step_weights", "advantages", "DPPO: denoising step j weighted gamma_denoising^(K-1-j)"),
    (ALL_RUNS, "clip", "pg_loss", "the ratio clipped to [1 - eps, 1 + eps] in the surrogate"),
    (ALL_RUNS, "min", "pg_loss", "the pessimistic min of the clipped and unclipped surrogates"),
    (ALL_RUNS, "vf_coef", "v_loss", "vf_coef * mean(mask * (vs - V)^2) (Brax: 0.5 * 0.5)"),
    (ALL_RUNS, "value_loss", "loss", "the value loss is in the total loss"),
    (["ppo"], "entropy_bonus", "loss", "PPO: loss = pg + v - ent_coef * H"),
    (["ppo"], "entropy_sign", "loss", "PPO: the entropy is a bonus (minus sign)"),
    (["ppo-tanh-entropy"], "entropy_bonus", "loss", "PPO with the tanh correction: the bonus"),
    (["ppo-tanh-entropy"], "tanh_correction", "entropy", "+ log(1 - tanh(u)^2) at one sample u (upstream FPO's PPO)"),
]
# The mask in the value loss, vf_coef * mean(mask * (vs - V)^2), is not among them: GAE already makes vs = V at every
# masked step (its delta and trace are 0), so the mask multiplies zeros and removing it cannot change any number.
CASES = [pytest.param(run_id, term, quantity, what, id=f"{run_id}-{term}") for runs_, term, quantity, what in PPO_FAMILY_TERMS
         for run_id in runs_]


@pytest.mark.parametrize("run_id,term,quantity,what", CASES)
def test_ppo_family_loss_term(runs, run_id, term, quantity, what):
    run = runs(run_id)
    grads = quantity.endswith("_grad")
    errors, effects = [], []
    for k, snap in enumerate(run.snapshots):
        full = full_reference(run_id, run, k)
        ablated = ppo_family_reference(run_id, run, k, frozenset([term]), grads=grads)
        errors.append(distance(script_quantity(snap, quantity), full[quantity], grads))
        effects.append(distance(ablated[quantity], full[quantity], grads))
    assert_pinned(f"{run_id}: {term} ({quantity}: {what})", errors, effects)


@pytest.mark.parametrize("run_id", ALL_RUNS)
def test_ppo_family_gradient_is_the_reference_loss(runs, run_id):
    """The step follows the gradient of the reference loss: values are right *and* flow where they should (a detached
    term, or one computed without gradient, changes no logged number but this)."""
    run = runs(run_id)
    for k, snap in enumerate(run.snapshots):
        full = full_reference(run_id, run, k)
        for quantity in ("actor_grad", "critic_grad"):
            error = distance(script_quantity(snap, quantity), full[quantity], relative_norm=True)
            assert full[quantity].norm() > 0 and error <= TOL, f"minibatch {k}: {quantity} {error:.1e} from the reference"
        for quantity in ("values", "v_targets", "advantages", "ratio", "pg_loss", "v_loss", "loss"):
            assert distance(snap[quantity], full[quantity]) <= TOL, f"minibatch {k}: {quantity}"
    print(f"{run_id}: {len(run.snapshots)} minibatches, ratio range "
          f"[{min(float(s['ratio'].min()) for s in run.snapshots):.3f}, {max(float(s['ratio'].max()) for s in run.snapshots):.3f}]")


def test_ppo_family_batch_has_what_the_terms_need(runs):
    """The scripted rollout puts terminations, truncations (masked steps) and a termination on a truncation step inside
    the segments, the later minibatches' ratios leave the clip range on both sides, and the stored rollout quantities
    are the rollout policy's (which the references take from the first step's parameters)."""
    run = runs("ppo")
    obs = run.b_obs.double()
    _, terminated, truncated = schedule(obs[:, 0, 0].round().numpy()[:, None], obs[:, :-1, 1].round().numpy())
    assert terminated[:, :-1].sum() >= 3 and (truncated & ~terminated)[:, :-1].sum() >= 3 and (truncated & terminated).any()
    ratio = torch.cat([s["ratio"].flatten() for s in run.snapshots[4:]])
    eps = run.args.clip_coef
    assert (ratio > 1 + 2 * eps).any() and (ratio < 1 - 2 * eps).any(), (float(ratio.min()), float(ratio.max()))
    agent = float64_agent(run, run.snapshots[0]["params"])
    dist = agent.get_dist(obs[:, :-1])
    stored = gaussian_log_density(run.b_actions.double(), dist.loc, dist.scale).sum(-1)
    assert distance(run.b_logprobs, stored) <= TOL


# ================================================================ SAC
SAC_OBS, SAC_ACTIONS, SAC_BATCH = 5, 2, 64
_sac_module = []


def sac_script():
    if not _sac_module:
        spec = importlib.util.spec_from_file_location("sac_gaussian_under_test", script_path("sac_gaussian.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _sac_module.append(module)
    return _sac_module[0]


# The one place that knows how the critics are stored and how sac_update is called: adapt these if that changes.
# Now one batched module `sac.qf(obs, u) -> [2, B]` and its target `sac.qf_target`; before, qf1, qf2 (and targets).
def critic_modules(sac):
    """(online critic modules, target critic modules)."""
    if hasattr(sac, "qf"):
        return [sac.qf], [sac.qf_target]
    return [sac.qf1, sac.qf2], [sac.qf1_target, sac.qf2_target]


def q1_q2(modules, obs, u):
    """(Q1(s, u), Q2(s, u)), each [B], from the critic modules (or copies of them)."""
    if len(modules) == 1:
        q = modules[0](obs, u)
        return q[0], q[1]
    return modules[0](obs, u), modules[1](obs, u)


def parameters_of(modules):
    return [p for module in modules for p in module.parameters()]


def call_sac_update(m, sac, batch, args, update):
    """The `update`-th update as main makes it: a critic step (`actor=False`), and on every policy_frequency-th update
    policy_frequency actor steps (`actor=True`). Returns (critic stats, the last actor step's stats or None). (Earlier
    versions made all of it in one call, passed the counter or an `actor_step` flag.)"""
    last = list(inspect.signature(m.sac_update).parameters)[-1]
    if last != "actor":
        return m.sac_update(sac, *batch, args, update % args.policy_frequency == 0 if last == "actor_step" else update)
    q_stats, pi_stats = m.sac_update(sac, *batch, args, False), None
    for _ in range(args.policy_frequency if update % args.policy_frequency == 0 else 0):
        pi_stats = m.sac_update(sac, *batch, args, True)
    return q_stats, pi_stats


def sac_batch(seed):
    """A hand-made batch: stored pre-tanh actions, nonzero rewards, every third transition terminal."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SAC_BATCH, SAC_OBS, generator=g), 1.5 * torch.randn(SAC_BATCH, SAC_ACTIONS, generator=g),
            torch.randn(SAC_BATCH, generator=g), torch.randn(SAC_BATCH, SAC_OBS, generator=g),
            (torch.arange(SAC_BATCH) % 3 == 0).float())


def values_of(tensors):
    return [t.detach().clone() for t in tensors]


def sac_updates(updates, **overrides):
    """Calls sac_update as main's `update`-th updates on a fresh SAC; returns each call's record: its batch and seed, the
    networks before it, what its optimizers' steps saw (parameters and gradients, not yet stepped), its stats."""
    m = sac_script()
    args = m.Args(**{"gamma": 0.8, "policy_frequency": 2, "compile": "off", **overrides})
    torch.manual_seed(0)
    sac = m.make_sac(SAC_OBS, SAC_ACTIONS, args, "cpu")
    online, target = critic_modules(sac)
    with torch.no_grad():  # hand-made: the targets away from the online critics, so target vs online and tau show
        for p in parameters_of(target):
            p.add_(0.1 * torch.randn_like(p))
    steps = {"critic": [], "actor": [], "alpha": []}

    def record(kind, tensors, with_grads):
        def hook(optimizer, *_):
            seen = tensors()
            steps[kind].append({"values": values_of(seen), "grads": [t.grad.detach().clone() for t in seen[:with_grads]]})
        return hook

    sac.q_optimizer.register_step_pre_hook(record("critic", lambda: parameters_of(online), len(parameters_of(online))))
    # at an actor step: the actor's parameters and gradients, the critic it is trained against, the alpha it used
    actor_seen = lambda: [*sac.actor.parameters(), *parameters_of(online), sac.log_alpha]  # noqa: E731
    sac.actor_optimizer.register_step_pre_hook(record("actor", actor_seen, len(list(sac.actor.parameters()))))
    sac.a_optimizer.register_step_pre_hook(record("alpha", lambda: [sac.log_alpha], 1))
    history = []
    for n, update in enumerate(updates):
        batch, seed = sac_batch(n), 1000 + n
        before = {"actor": copy.deepcopy(sac.actor), "online": copy.deepcopy(online), "target": copy.deepcopy(target),
                  "log_alpha": float(sac.log_alpha.detach())}
        counts = {kind: len(s) for kind, s in steps.items()}
        torch.manual_seed(seed)
        q_stats, pi_stats = call_sac_update(m, sac, batch, args, update)
        history.append(types.SimpleNamespace(
            update=update, batch=batch, seed=seed, before=before, q_stats=q_stats, pi_stats=pi_stats,
            **{kind: s[counts[kind]:] for kind, s in steps.items()},
            after={"online": values_of(parameters_of(online)), "target": values_of(parameters_of(target)),
                   "log_alpha": float(sac.log_alpha.detach())}))
    return args, history


def float64_copies(modules, values=None):
    """float64 copies of `modules`, with their parameters set to `values` if given."""
    copies = [copy.deepcopy(module).double() for module in modules]
    if values is not None:
        params = parameters_of(copies)
        assert len(params) == len(values)
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
    return copies


def tanh_gaussian_log_prob(u, mean, std, drop):
    """log pi(tanh(u)) = log N(u; mean, std) - log(1 - tanh(u)^2), summed over dims (SAC, Haarnoja et al. 2018, App. C),
    with CleanRL's guard: log(1 - tanh(u)^2 + 1e-6) (it moves the gradient of a sample at |u| = 4 by 1e-3)."""
    log_prob = gaussian_log_density(u, mean, std)
    if "tanh_log_prob" not in drop:
        log_prob = log_prob - torch.log(1 - torch.tanh(u) ** 2 + 1e-6)
    return log_prob.sum(-1)


def sac_reference(args, h, drop=frozenset()):
    """One sac_update call in float64, from the networks before it and, for the actor and alpha steps, the parameters
    each step saw; `drop` names the terms to remove. Returns the gradients each step should have followed."""
    obs, actions, rewards, next_obs, dones = (x.double() for x in h.batch)
    with torch.random.fork_rng():  # sac_update's draws, in its order: the next actions first, then one per actor step
        torch.manual_seed(h.seed)
        noise = [torch.randn(SAC_BATCH, SAC_ACTIONS).double() for _ in range(1 + len(h.actor))]
    online, target = float64_copies(h.before["online"]), float64_copies(h.before["target"])
    (actor,) = float64_copies([h.before["actor"]])
    alpha = math.exp(h.before["log_alpha"])
    out = {}
    with torch.no_grad():  # the soft target y = r + (1 - done) gamma (min_i Q_target_i(s', a') - alpha log pi(a'|s'))
        dist = actor.get_dist(next_obs)
        next_u = dist.loc + dist.scale * noise[0]
        next_log_pi = tanh_gaussian_log_prob(next_u, dist.loc, dist.scale, drop)
        qa, qb = q1_q2(online if "target_networks" in drop else target, next_obs, next_u)
        next_q = qa if "target_min" in drop else torch.min(qa, qb)
        soft = next_q - (0.0 if "target_entropy" in drop else alpha * next_log_pi)
        y = (0.0 if "reward" in drop else rewards) + (1.0 if "done_mask" in drop else 1 - dones) * (
            1.0 if "gamma" in drop else args.gamma) * soft
    q1, q2 = q1_q2(online, obs, actions)
    qf1_loss, qf2_loss = ((q1 - y) ** 2).mean(), ((q2 - y) ** 2).mean()  # each critic's MSE to the one target
    critic_loss = (0.0 if "qf1_loss" in drop else qf1_loss) + (0.0 if "qf2_loss" in drop else qf2_loss)  # their sum
    params = parameters_of(online)
    grads = torch.autograd.grad(critic_loss, params, allow_unused=True)
    out["critic_grad"] = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
    out["critic_losses"] = torch.stack([qf1_loss, qf2_loss]).detach()
    out["actor_grad"], out["alpha_grad"], out["actor_loss"], out["alpha_loss"] = [], [], None, None
    n_actor = len(list(actor.parameters()))
    for i, step in enumerate(h.actor):  # each actor step: at the parameters it saw, against the stepped critic
        (actor_i,) = float64_copies([h.before["actor"]], step["values"][:n_actor])
        critic_i = float64_copies(h.before["online"], step["values"][n_actor:-1])
        alpha_i = float(step["values"][-1].exp())  # alpha as it is at this step (detached: a constant of the actor loss)
        dist = actor_i.get_dist(obs)
        u = dist.loc + dist.scale * noise[1 + i]  # reparameterized
        log_pi = tanh_gaussian_log_prob(u, dist.loc, dist.scale, drop)
        qa, qb = q1_q2(critic_i, obs, u)
        min_q = qa if "actor_min" in drop else torch.min(qa, qb)
        actor_loss = ((0.0 if "actor_entropy" in drop else alpha_i * log_pi) - min_q).mean()  # alpha log pi - min Q
        out["actor_grad"].append(torch.cat([g.flatten() for g in torch.autograd.grad(actor_loss, list(actor_i.parameters()))]))
        # alpha loss -exp(log_alpha) (log pi + target entropy) (SAC v2, as CleanRL); d/d log_alpha of it is itself
        sign = 1.0 if "alpha_sign" in drop else -1.0
        target_entropy = 0.0 if "alpha_target_entropy" in drop else -float(SAC_ACTIONS)
        alpha_loss = sign * alpha_i * (log_pi.detach() + target_entropy).mean()
        out["alpha_grad"].append(alpha_loss.reshape(1))
        out["actor_loss"], out["alpha_loss"] = actor_loss.detach(), alpha_loss.detach()
    return out


def sac_script_quantity(h, quantity):
    if quantity == "critic_grad":
        return torch.cat([g.flatten() for g in h.critic[0]["grads"]])
    if quantity == "critic_losses":
        return torch.stack([h.q_stats["losses/qf1_loss"], h.q_stats["losses/qf2_loss"]])
    if quantity == "actor_grad":
        return [torch.cat([g.flatten() for g in step["grads"]]) for step in h.actor]
    if quantity == "alpha_grad":
        return [step["grads"][0].reshape(1) for step in h.alpha]
    return h.pi_stats[f"losses/{quantity}"]


def sac_errors(got, want, relative_norm):
    if isinstance(want, list):
        assert len(got) == len(want) > 0
        return [distance(g, w, relative_norm) for g, w in zip(got, want)]
    return [distance(got, want, relative_norm)]


@pytest.fixture(scope="module")
def sac_first_update(one_thread):
    """Update 0 with --policy-frequency 2: one critic step, then two actor steps and two alpha steps."""
    args, history = sac_updates([0])
    return args, history[0]


# (term removed, the numbers it changes, what it pins): SAC v2's losses (Haarnoja et al. 2018b) with clipped double
# Q (Fujimoto et al. 2018), as CleanRL's sac_continuous_action.py; the critic steps on the sum of both critics' MSE.
SAC_TERMS = [
    ("target_min", ["critic_grad", "critic_losses"], "the target takes the min of both target critics (clipped double Q)"),
    ("target_entropy", ["critic_grad", "critic_losses"], "the soft target's - alpha log pi(a'|s') entropy term"),
    ("done_mask", ["critic_grad", "critic_losses"], "no bootstrap after a terminal transition: (1 - done)"),
    ("gamma", ["critic_grad", "critic_losses"], "the discount"),
    ("reward", ["critic_grad", "critic_losses"], "the reward"),
    ("target_networks", ["critic_grad", "critic_losses"], "the bootstrap is from the target critics, not the online ones"),
    ("tanh_log_prob", ["critic_grad", "critic_losses", "actor_grad", "alpha_grad"], "log pi of tanh(u): the change of variables"),
    ("qf1_loss", ["critic_grad", "critic_losses"], "the critic loss is the sum of both critics' MSE: Q1's"),
    ("qf2_loss", ["critic_grad", "critic_losses"], "... and Q2's"),
    ("actor_entropy", ["actor_grad", "actor_loss"], "actor loss alpha log pi - min Q: the entropy term"),
    ("actor_min", ["actor_grad", "actor_loss"], "actor loss: the min of both critics"),
    ("alpha_sign", ["alpha_grad", "alpha_loss"], "alpha loss -alpha (log pi + target entropy): its sign"),
    ("alpha_target_entropy", ["alpha_grad", "alpha_loss"], "... the target entropy -action_dim"),
]
# alpha is detached in the actor loss, but removing the .detach() changes nothing observable: the actor loss's gradient
# on log_alpha is cleared by a_optimizer.zero_grad() before the alpha loss's backward (and without --autotune log_alpha
# needs no gradient). That line has no test because it cannot have one.


@pytest.mark.parametrize("term,quantities,what", [pytest.param(t, q, w, id=t) for t, q, w in SAC_TERMS])
def test_sac_loss_term(sac_first_update, term, quantities, what):
    args, h = sac_first_update
    assert len(h.critic) == 1 and len(h.actor) == len(h.alpha) == 2  # the batch exercises every step
    full, ablated = sac_reference(args, h), sac_reference(args, h, frozenset([term]))
    errors, effects = [], []
    for quantity in quantities:
        relative_norm = quantity.endswith("_grad")
        errors += sac_errors(sac_script_quantity(h, quantity), full[quantity], relative_norm)
        effects += sac_errors(ablated[quantity], full[quantity], relative_norm)
    assert_pinned(f"sac: {term} ({what})", errors, effects)


def test_sac_critic_step_is_one_adam_step_on_the_critic_gradient(sac_first_update):
    args, h = sac_first_update
    step = h.critic[0]
    for before, seen in zip(parameters_of(h.before["online"]), step["values"]):  # the critic step comes first
        assert torch.equal(before, seen)
    params = [v.clone().requires_grad_() for v in step["values"]]
    for p, g in zip(params, step["grads"]):
        p.grad = g.clone()
    torch.optim.Adam(params, lr=args.q_lr).step()
    params = [p.detach() for p in params]
    error = max(float((a - p).abs().max()) for a, p in zip(h.after["online"], params))
    moved = max(float((p - b).abs().max()) for p, b in zip(params, step["values"]))
    print(f"sac critic step: {error:.1e} from one Adam step, which moves the critic by up to {moved:.1e}")
    assert moved > 0.5 * args.q_lr and error < 1e-3 * moved


def test_sac_polyak_target_update_after_every_critic_update():
    """target <- tau online + (1 - tau) target, toward the critic just stepped, after every update (also the updates
    with no actor step); the targets start away from the online critics, so tau shows."""
    args, history = sac_updates([0, 1, 2, 3])
    assert [len(h.actor) > 0 for h in history] == [True, False, True, False]
    for h in history:
        for before, online, after in zip(values_of(parameters_of(h.before["target"])), h.after["online"], h.after["target"]):
            expected = (1 - args.tau) * before + args.tau * online
            error, effect = float((after - expected).abs().max()), float((expected - before).abs().max())
            assert effect > 1e-5 and error < 1e-3 * effect, f"update {h.update}: {error:.1e} from Polyak's (moves {effect:.1e})"


def test_sac_update_steps_actor_and_alpha_policy_frequency_times_on_actor_updates():
    _, history = sac_updates(range(4), policy_frequency=3)
    assert [len(h.critic) for h in history] == [1] * 4
    assert [len(h.actor) for h in history] == [3, 0, 0, 3]
    assert [len(h.alpha) for h in history] == [3, 0, 0, 3]
    assert [h.pi_stats is None for h in history] == [False, True, True, False]


def test_sac_main_makes_actor_updates_every_policy_frequency_updates(tmp_path, monkeypatch):
    """main's updates 0, 3, 6, ... are the actor updates with --policy-frequency 3 (CleanRL's delayed policy update)."""
    path, calls = script_path("sac_gaussian.py"), []

    def hook(frame, event, arg):
        caller = frame.f_back
        if event == "call" and frame.f_code.co_name == "sac_update" and caller is not None and caller.f_code.co_name in ("main", "<listcomp>"):
            while caller.f_code.co_name != "main":
                caller = caller.f_back
            calls.append((caller.f_locals["loop"]["updates"], frame.f_locals["actor"]))

    monkeypatch.setattr(gym.vector, "SyncVectorEnv", ScriptedEnvs)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sac_gaussian.py", "--env-id", "InvertedPendulum-v5", "--env-backend", "dm_control", "--no-cuda",
                                      "--compile", "off", "--num-envs", "1", "--total-timesteps", "12", "--learning-starts", "4",
                                      "--utd-ratio", "1", "--batch-size", "4", "--policy-frequency", "3", "--num-eval-envs", "1",
                                      "--eval-every", "100000"])
    sys.setprofile(hook)
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.setprofile(None)
    # each update: one critic step, and on updates 0, 3, 6 three actor steps after it
    assert calls == [call for u in range(9) for call in [(u, False)] + [(u, True)] * (3 if u % 3 == 0 else 0)]


def test_sac_without_autotune_keeps_alpha_and_uses_it():
    args, history = sac_updates([0, 1], autotune=False, alpha=0.2)
    for h in history:
        assert not h.alpha and h.after["log_alpha"] == h.before["log_alpha"] == pytest.approx(math.log(0.2))
    h = history[0]
    full = sac_reference(args, h)
    h_alpha_1 = types.SimpleNamespace(**{**vars(h), "before": {**h.before, "log_alpha": 0.0}})  # autotune's starting alpha
    h_alpha_1.actor = [{**s, "values": [*s["values"][:-1], torch.tensor(0.0)]} for s in h.actor]
    ablated = sac_reference(args, h_alpha_1)
    errors, effects = [], []
    for quantity in ("critic_grad", "actor_grad"):
        errors += sac_errors(sac_script_quantity(h, quantity), full[quantity], True)
        effects += sac_errors(ablated[quantity], full[quantity], True)
    assert_pinned("sac without autotune: alpha 0.2 in the target and the actor loss", errors, effects)
