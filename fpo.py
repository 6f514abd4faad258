"""Flow Policy Optimization (FPO, McAllister et al. 2025), a generative-policy baseline of GoRL (paper Table 1, "FPO").

ppo_gaussian.py whose actor is a flow-matching policy: PPO's likelihood ratio is replaced by the exponentiated
difference of conditional flow-matching losses at stored (eps, t) samples (upstream akanazawa/fpo, fpo.py).
The code above the `# ---- plumbing` line is the whole algorithm; below it, the same plumbing in every script.

    python fpo.py --env-id HopperStand    # the paper's scale; the README has CPU-sized commands
"""
import argparse
import difflib
import importlib.util
import logging
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Optional

# Idle OpenMP threads sleep after a short spin instead of the default long one, which makes two training processes on
# the same cores slow each other down about 10x (docs/performance.md). Set before PyTorch loads OpenMP.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
os.environ.setdefault("KMP_BLOCKTIME", "1")

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import psutil
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

try:  # EnvPool: the envs on a C++ thread pool; where it has no wheel (README), dm_control runs every task
    import envpool
except ImportError:
    envpool = None


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, deterministic kernels on CUDA where PyTorch has them (a warning names any op without one)"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    threads: int = 0
    """PyTorch CPU threads; 0: one for the rollout's per-step calls, all cores (or OMP_NUM_THREADS) for the updates"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "gorl-clean"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, render env 0's episode of every evaluation through dm_control (either backend) to `videos/`"""
    save_model: bool = False
    """if toggled, keep the final checkpoint (networks, normalizer, args, ...) as `runs/{run_name}/{exp_name}.cleanrl_model`"""
    eval_checkpoint: Optional[str] = None
    """if set, load this saved model, run the deterministic evaluation on its task, print the return and exit"""
    checkpoint_every: Optional[int] = None
    """write `runs/{run_name}/checkpoint.pt` every this many steps (default: a tenth of the run) and at the end; 0: none"""
    resume: Optional[str] = None
    """if set, continue this checkpoint's run: settings, networks, optimizers, normalizer, RNGs, log dir (new episodes)"""

    env_id: str = "HopperStand"
    """DMC task in the paper's CamelCase (`HopperStand`, `CheetahRun`, ...) or a Gymnasium id (`Hopper-v5`)"""
    env_backend: Literal["auto", "envpool", "dm_control"] = "auto"
    """`envpool` (C++ thread pool), `dm_control` (Python envs; DMC through shimmy), or `auto`: envpool when it has the task"""
    total_timesteps: int = 180_000_000
    """total environment steps of training (evaluation steps are not counted)"""
    num_envs: int = 2048
    """the number of parallel training environments"""
    unroll_length: int = 30
    """the length of one trajectory segment; GAE runs within a segment"""
    batch_size: int = 1024
    """the number of segments in one minibatch"""
    num_minibatches: int = 32
    """the number of minibatches per epoch; one iteration collects num_minibatches * batch_size * unroll_length steps"""
    update_epochs: int = 16
    """the number of passes over the iteration's segments"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer (constant)"""
    gamma: float = 0.995
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    clip_coef: float = 0.05
    """the surrogate clipping coefficient"""
    vf_coef: float = 0.25
    """coefficient of the value loss: vf_coef * mean(mask * (v_target - V)^2)"""
    max_grad_norm: float = 0.0
    """the maximum global norm for gradient clipping; 0 disables it"""
    reward_scale: float = 10.0
    """rewards are multiplied by this before GAE"""
    eval_every: int = 6_000_000
    """evaluate every this many environment steps (and at the start and the end)"""
    num_eval_envs: int = 128
    """the number of evaluation episodes, one per fresh environment"""

    # The released runs' switches (the `release` preset turns them on; docs/reproducing.md has a row for each).
    obs_stats_accumulation: Literal["cumulative", "legacy_batch_only"] = "cumulative"
    """the normalizer's variance: `cumulative` over all batches (the GoRL release's fix) or `legacy_batch_only` (FPO)"""
    obs_stats_timing: Literal["rollout_consistent", "legacy_pre_update"] = "rollout_consistent"
    """merge a batch into the normalizer after the update on it (`rollout_consistent`) or before (`legacy_pre_update`: FPO)"""
    mask_time_limit_terminations: bool = False
    """mask a termination on the time-limit step like a truncation (no advantage, no value error), as the release does"""
    normalize_advantages_over_all_steps: bool = False
    """normalize advantages over all of a minibatch's steps, masked ones too, with the population std (the release)"""

    def __post_init__(self):  # impossible settings end the run with one line (check_args, in the plumbing)
        check_args(self, positive="""total_timesteps num_envs unroll_length batch_size num_minibatches update_epochs
                   learning_rate clip_coef reward_scale eval_every num_eval_envs""", unit="gamma",
                   non_negative="checkpoint_every threads vf_coef max_grad_norm gae_lambda")
        check_args(self, positive="flow_steps samples_per_action")  # FPO's own
        segments = self.batch_size * self.num_minibatches
        if self.gae_lambda > 1:
            fail(f"--gae-lambda must be in [0, 1], got {self.gae_lambda}")
        if segments % self.num_envs:
            step = self.num_envs // math.gcd(self.num_envs, self.num_minibatches)
            fail(f"--batch-size * --num-minibatches ({segments} segments per iteration) must be a multiple of --num-envs "
                 f"({self.num_envs}), so every env contributes whole segments: --batch-size "
                 f"{math.ceil(self.batch_size / step) * step} works")
        if self.total_timesteps < segments * self.unroll_length:
            fail(f"--total-timesteps {self.total_timesteps} is smaller than one iteration ({segments} segments of "
                 f"{self.unroll_length} steps = {segments * self.unroll_length})")

    flow_steps: int = 10
    """Euler steps of the flow from x_1 ~ N(0, I) to the pre-tanh action x_0"""
    samples_per_action: int = 8
    """(eps, t) pairs stored per action; the ratio uses their CFM losses"""
    average_losses_before_exp: bool = True
    """ratio exp(mean L_old - mean L_new) over the samples (upstream default); off: one clipped ratio per sample"""


def presets(env_id):
    """The named settings: `python fpo.py [paper|cpu|release] --env-id CheetahRun` (any flag overrides them).
    paper: Args' defaults, FPO as the paper's Table 1 row describes it, at the paper's scale (180M steps on 2048 envs).
    cpu: the same algorithm at a budget two CPU cores run in under an hour: 3M steps on 16 envs, 8 minibatches of 16
      segments and 8 epochs per iteration, gamma 0.99, an evaluation of 32 episodes every 100k steps. The learning rate
      stays the paper's 3e-4: at PPO's CPU-sized 1e-3, CheetahRun's policy diverged at 0.7M steps (approx-KL 1.7, 11,
      98 in three iterations, then a non-finite loss).
    release: the paper's FPO row as the authors ran it (upstream FPO): its observation normalizer.
    FingerSpin takes the released runs' gamma 0.95 in cpu and release."""
    paper = Args(env_id=env_id)
    finger_spin = env_id == "FingerSpin"
    cpu = replace(paper, total_timesteps=3_000_000, num_envs=16, batch_size=16, num_minibatches=8, update_epochs=8,
                  gamma=0.95 if finger_spin else 0.99, eval_every=100_000, num_eval_envs=32)
    release = replace(paper, gamma=0.95 if finger_spin else paper.gamma, mask_time_limit_terminations=True,
                      normalize_advantages_over_all_steps=True, obs_stats_accumulation="legacy_batch_only",
                      obs_stats_timing="legacy_pre_update")
    return {"paper": paper, "cpu": cpu, "release": release}


# ---- the algorithm: the networks, the observation normalizer, GAE and the losses ----
def layer_init(layer):
    """LeCun-uniform weights and zero biases, as the Flax networks of the paper's code."""
    bound = np.sqrt(3.0 / layer.in_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [layer_init(nn.Linear(sizes[i], sizes[i + 1])), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class RunningMeanStd(nn.Module):
    """Observation normalizer: running mean and variance merged batch by batch (Chan et al.'s parallel Welford update:
    k merges equal one pass over all), in float64 buffers, so it stays exact over 1e8 samples and checkpoints carry it."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        # What forward applies, float32 x * scale + shift (one fused op per call), refreshed whenever the statistics change.
        self.register_buffer("scale", torch.ones(shape), persistent=False)
        self.register_buffer("shift", torch.zeros(shape), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    @torch.no_grad()
    def update(self, x, accumulate=True):
        """`accumulate=False` is upstream FPO's `RunningStats.update` (418c255; the release's `legacy_batch_only`): the
        sum of squares keeps only this batch's while the count accumulates, so the std shrinks like 1/sqrt(batches)."""
        x = x.reshape(-1, self.mean.shape[-1]).double()
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False)
        n = x.shape[0]
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = (self.var * self.count if accumulate else 0.0) + batch_var * n + delta**2 * self.count * n / total
        self.mean.add_(delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)
        self.refresh()

    @torch.no_grad()
    def refresh(self):
        std = self.var.sqrt().clamp(1e-6, 1e6)
        self.scale.copy_(1 / std)
        self.shift.copy_(-self.mean / std)

    def forward(self, x):
        """(x - mean) / std."""
        return torch.addcmul(self.shift, x, self.scale)


def compute_gae(rewards, values, terminated, mask, gamma, gae_lambda):
    """Advantages and value targets over segments, as Brax PPO's `compute_gae` (the authors' FPO and GoRL code).
    rewards, terminated, mask: [B, T]; values: [B, T + 1], the last one V(final next-obs). Within a segment the next
    observation of step t is that of step t + 1 except at an episode end, and exactly those steps (truncation, EnvPool
    reset) have mask 0: their advantage and value error are zeroed and the recursion does not cross them. The value
    targets are vs = V + GAE(lambda); the policy advantage is Brax's one-step return on them, r_t + gamma (1 - term_t)
    vs_{t+1} - V_t (vs after the last step: the bootstrap value), not the GAE sum. Returns (advantages, targets)."""
    not_terminated = 1.0 - terminated
    deltas = (rewards + gamma * not_terminated * values[:, 1:] - values[:, :-1]) * mask
    gae = torch.zeros_like(deltas)
    last = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        last = deltas[:, t] + gamma * gae_lambda * not_terminated[:, t] * mask[:, t] * last
        gae[:, t] = last
    v_targets = gae + values[:, :-1]
    next_targets = torch.cat([v_targets[:, 1:], values[:, -1:]], dim=1)
    advantages = (rewards + gamma * not_terminated * next_targets - values[:, :-1]) * mask
    return advantages, v_targets


def to_segments(x, device):
    """Rollout storage [U unrolls, T steps, N envs, ...] -> segments [U * N, T, ...]: T consecutive steps of one env each."""
    return torch.as_tensor(x, device=device).transpose(1, 2).flatten(0, 1)


def normalize_advantages(advantages, mask, over_all_steps=False):
    """Zero mean and unit std over the steps with mask 1; the masked steps stay 0. `over_all_steps` (the release, upstream
    FPO's ppo.py): over every step, the masked ones' zeros included, with the population std, and not masked again."""
    if over_all_steps:
        return (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    n = mask.sum().clamp(min=2)
    mean = advantages.sum() / n
    std = (((advantages - mean) * mask) ** 2).sum().div(n - 1).sqrt()
    return (advantages - mean) / (std + 1e-8) * mask


def explained_variance(targets, values, mask):
    """1 - Var(targets - values) / Var(targets) over the steps with mask 1 (CleanRL's losses/explained_variance)."""
    n = mask.sum().clamp(min=2)
    target_var = (((targets - (targets * mask).sum() / n) * mask) ** 2).sum() / n
    return 1 - (((targets - values) * mask) ** 2).sum() / n / target_var.clamp(min=1e-8)


LOGRATIO_CLIP = 3.0  # upstream FPO clips each per-sample log-ratio to +-this (with --no-average-losses-before-exp)


class CFMSamples(NamedTuple):
    """The (eps, t) pairs drawn for one action and their CFM losses under the parameters that acted: PPO reuses them."""

    eps: torch.Tensor
    t: torch.Tensor
    losses: torch.Tensor


class Sample(NamedTuple):
    """What `act` returns: the sampled pre-tanh action u, its CFM samples (FPO's stand-in for a log-probability), and
    the environment's action in [-1, 1] (what evaluation runs)."""

    action: torch.Tensor
    cfm_samples: CFMSamples
    env_action: torch.Tensor


class Agent(nn.Module):
    """Flow actor 4x32 (inputs [obs_norm, x_t, temb(t)], output times 0.25) and critic 5x256, SiLU MLPs, as upstream FPO."""

    def __init__(self, obs_dim, action_dim, flow_steps, samples_per_action):
        super().__init__()
        self.critic = mlp([obs_dim, 256, 256, 256, 256, 256, 1])
        self.actor = mlp([obs_dim + action_dim + 8, 32, 32, 32, 32, action_dim])
        self.flow_steps = flow_steps
        self.samples_per_action = samples_per_action

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    def velocity(self, x, x_t, t):
        """v(s, x_t, t) ~ eps - a; time embedding [cos(t 2^k), sin(t 2^k)], k = 0..3."""
        tk = t * 2.0 ** torch.arange(4, device=x.device)
        return 0.25 * self.actor(torch.cat([x, x_t, torch.cos(tk), torch.sin(tk)], dim=-1))

    def cfm_loss(self, x, a, eps, t):
        """Per-sample CFM loss, mode "u_but_supervise_as_eps": x_t = t eps + (1 - t) a, x1_pred = x_t + (1 - t) v,
        L = mean_d (eps - x1_pred)^2. x: [..., D], a: [..., A], eps: [..., S, A], t: [..., S, 1]; returns [..., S]."""
        x_t = t * eps + (1 - t) * a.unsqueeze(-2)
        v = self.velocity(x.unsqueeze(-2).expand(*t.shape[:-1], x.shape[-1]), x_t, t)
        return ((eps - (x_t + (1 - t) * v)) ** 2).mean(-1)

    def act(self, x, generator=None):
        """Samples x_1 ~ N(0, I) and integrates x <- x - v / K at t = 1, ..., 1/K to the pre-tanh action u. Also draws
        the (eps, t) pairs PPO will reuse, t from the schedule {1/K, ..., 1}, with their CFM losses under the current
        parameters. A flow has no tractable mean, so evaluation samples too, from a seeded CPU `generator` (the same
        noise on every device). Returns a `Sample`: u, its `CFMSamples` and the environment action tanh(u)."""
        B = x.shape[0]
        S = self.samples_per_action
        K = self.flow_steps
        dev = x.device if generator is None else "cpu"
        u = torch.randn(B, self.actor[-1].out_features, device=dev, generator=generator).to(x.device)
        for k in range(K):
            u = u - self.velocity(x, u, torch.full_like(u[:, :1], 1.0 - k / K)) / K
        eps = torch.randn(B, S, u.shape[1], device=dev, generator=generator).to(x.device)
        t = torch.randint(1, K + 1, (B, S, 1), device=dev, generator=generator).to(x.device) / K
        return Sample(action=u, cfm_samples=CFMSamples(eps=eps, t=t, losses=self.cfm_loss(x, u, eps, t)),
                      env_action=torch.tanh(u))


def ppo_update(agent, optimizer, segments, args):
    """`--update-epochs` passes over the iteration's segments in minibatches of `--batch-size`: the clipped surrogate on
    FPO's ratio and the masked value loss. Returns each minibatch's statistics (0-d tensors, still on the device)."""
    stats = []
    num_segments = len(segments["obs"])
    for epoch in range(args.update_epochs):
        perm = torch.randperm(num_segments, device=segments["obs"].device)
        for start in range(0, num_segments, args.batch_size):
            idx = perm[start : start + args.batch_size]
            mb_obs = segments["obs"][idx]
            mb_mask = segments["masks"][idx]
            values = agent.get_value(mb_obs)
            with torch.no_grad():  # GAE from the *current* critic in every minibatch, under stop-gradient (Brax PPO)
                advantages, v_targets = compute_gae(segments["rewards"][idx], values, segments["terminations"][idx], mb_mask,
                                                    args.gamma, args.gae_lambda)
                advantages = normalize_advantages(advantages, mb_mask, args.normalize_advantages_over_all_steps)

            new_losses = agent.cfm_loss(mb_obs[:, :-1], segments["actions"][idx], segments["cfm_eps"][idx],
                                        segments["cfm_t"][idx])
            old_losses = segments["old_losses"][idx]
            if args.average_losses_before_exp:  # one ratio per transition: exp(mean_S L_old - mean_S L_new)
                logratio = old_losses.mean(-1) - new_losses.mean(-1)
            else:  # a ratio per (eps, t) sample, log clipped to +-LOGRATIO_CLIP (upstream); the surrogate averages them
                logratio = (old_losses - new_losses).clamp(-LOGRATIO_CLIP, LOGRATIO_CLIP)
                advantages = advantages.unsqueeze(-1)
            ratio = logratio.exp()
            clipped_ratio = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
            pg_loss = -torch.min(advantages * ratio, advantages * clipped_ratio).mean()
            v_loss = args.vf_coef * (mb_mask * (v_targets - values[:, :-1]) ** 2).mean()
            loss = pg_loss + v_loss  # FPO has no entropy term

            optimizer.zero_grad()
            loss.backward()
            if args.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            approx_kl = ((ratio - 1) - logratio).mean()
            clipfrac = ((ratio - 1).abs() > args.clip_coef).float().mean()
            explained_var = explained_variance(v_targets, values[:, :-1].detach(), mb_mask)
            stats.append({"losses/loss": loss, "losses/policy_loss": pg_loss, "losses/value_loss": v_loss,
                          "losses/cfm_loss": new_losses.mean(), "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac,
                          "losses/explained_variance": explained_var})
    return stats


def eval_policy(agent, obs_rms, seed):
    """The policy that evaluation runs: raw observation -> action in [-1, 1]. It samples the flow from x_1 ~ N(0, I) (a
    flow policy has no tractable mean) with noise from a generator seeded `seed` here, so every evaluation draws the
    same noise and a reloaded checkpoint reproduces its return."""
    generator = torch.Generator().manual_seed(seed)  # on the CPU: --eval-checkpoint gives the same return on any device
    return lambda x: agent.act(obs_rms(x), generator).env_action


def load_policy(checkpoint, device):
    """The evaluation policy of a saved model (--eval-checkpoint)."""
    obs_dim = checkpoint["loop"]["obs_dim"]
    action_dim = checkpoint["loop"]["action_dim"]
    obs_rms = RunningMeanStd(obs_dim).to(device)
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    agent = Agent(obs_dim, action_dim, checkpoint["args"]["flow_steps"], checkpoint["args"]["samples_per_action"]).to(device)
    agent.load_state_dict(checkpoint["agent"])
    return eval_policy(agent, obs_rms, checkpoint["args"]["seed"] + EVAL_SEED_OFFSET)


def main(args):
    checkpoint, backend, device, writer, run_name = setup(args, load_policy)
    steps_per_iteration = args.batch_size * args.num_minibatches * args.unroll_length
    num_iterations = args.total_timesteps // steps_per_iteration
    checkpoint_every = args.checkpoint_every or max(args.total_timesteps // 10, 1)
    print(f"{run_name}: backend {backend}, device {device}, {num_iterations} iterations of {steps_per_iteration} steps "
          f"({num_iterations * steps_per_iteration} of --total-timesteps {args.total_timesteps}: whole iterations)")
    writer.add_text("eval", "FPO evaluation samples x_1 ~ N(0, I) with a fixed seed: a flow policy has no tractable mean")
    # Per-step inference on a few envs is fastest on one thread; the updates' minibatches are 1.5-1.9x faster on two cores.
    rollout_threads = args.threads or 1
    update_threads = args.threads or torch.get_num_threads()

    envs = VecEnv(args.env_id, backend, args.num_envs, args.seed)
    next_obs = envs.reset()
    obs_dim = next_obs.shape[1]
    action_dim = envs.action_dim
    obs_rms = RunningMeanStd(obs_dim).to(device)
    agent = Agent(obs_dim, action_dim, args.flow_steps, args.samples_per_action).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-8)

    # Rollout storage: U unrolls of T steps on N envs; obs has T + 1 entries so each segment carries its bootstrap obs.
    # `masks` is 0 where a step's next observation is not its successor (a truncation, EnvPool's reset step).
    U = args.batch_size * args.num_minibatches // args.num_envs
    T = args.unroll_length
    N = args.num_envs
    obs = torch.zeros((U, T + 1, N, obs_dim), device=device)
    actions = torch.zeros((U, T, N, action_dim), device=device)
    S = args.samples_per_action  # per action: S stored (eps, t) pairs and their CFM losses under the rollout parameters
    cfm_eps = torch.zeros((U, T, N, S, action_dim), device=device)
    cfm_t = torch.zeros((U, T, N, S, 1), device=device)
    old_losses = torch.zeros((U, T, N, S), device=device)
    rewards = np.zeros((U, T, N), np.float32)
    terminations = np.zeros((U, T, N), np.float32)
    masks = np.zeros((U, T, N), np.float32)

    modules = {"agent": agent, "optimizer": optimizer, "obs_rms": obs_rms}
    loop = {"iteration": 0, "global_step": 0, "train_time": 0.0, "eval_time": 0.0, "eval_return": float("nan"), "eval_step": 0,
            "train_return": float("nan")}
    eval_seed = args.seed + EVAL_SEED_OFFSET  # the same evaluation noise every time
    if checkpoint is None:
        eval_and_log(eval_policy(agent, obs_rms, eval_seed), 0, args, backend, device, writer, run_name, loop)
    else:
        loop.update(restore(checkpoint, modules))  # an older checkpoint may lack a counter: it starts at its default
    global_step = loop["global_step"]
    first_iteration = loop["iteration"] + 1  # of this process: the one whose pace warns of a run of days
    for iteration in range(first_iteration, num_iterations + 1):
        iteration_start = time.time()
        torch.set_num_threads(rollout_threads)
        for unroll in range(U):
            for t in range(T):
                obs[unroll, t] = torch.as_tensor(next_obs, device=device)
                with torch.no_grad():
                    sample = agent.act(obs_rms(obs[unroll, t]))
                actions[unroll, t] = sample.action
                cfm_eps[unroll, t] = sample.cfm_samples.eps
                cfm_t[unroll, t] = sample.cfm_samples.t
                old_losses[unroll, t] = sample.cfm_samples.losses
                next_obs, reward, terminated, truncated, valid, ended = envs.step(sample.env_action.cpu().numpy())
                rewards[unroll, t] = reward * args.reward_scale
                terminations[unroll, t] = terminated
                # A termination on the time-limit step stays one (GAE sees it), unless masked as the release does.
                truncation = truncated if args.mask_time_limit_terminations else truncated & ~terminated
                masks[unroll, t] = valid & ~truncation
                step = global_step + (unroll * T + t + 1) * N
                loop["train_return"] = log_episodes(writer, ended, step, loop["train_return"])
            obs[unroll, T] = torch.as_tensor(next_obs, device=device)
        global_step += steps_per_iteration
        rollout_time = time.time() - iteration_start
        if iteration == first_iteration:  # a run of days says so at its first update step (paced with the rollout)
            steps_per_update = steps_per_iteration / (args.num_minibatches * args.update_epochs)
            warn_if_long(args, rollout_time / steps_per_iteration, optimizer, steps_per_update)

        if args.obs_stats_timing == "legacy_pre_update":  # upstream FPO: the batch is merged before the update on it
            obs_rms.update(obs[:, :T], args.obs_stats_accumulation == "cumulative")
        # Segments, observations normalized with the statistics that acted on them (with legacy_pre_update, statistics
        # that include them, while the stored CFM losses came from the old ones).
        segments = {"obs": to_segments(obs_rms(obs), device), "actions": to_segments(actions, device),
                    "cfm_eps": to_segments(cfm_eps, device), "cfm_t": to_segments(cfm_t, device),
                    "old_losses": to_segments(old_losses, device), "rewards": to_segments(rewards, device),
                    "terminations": to_segments(terminations, device), "masks": to_segments(masks, device)}

        torch.set_num_threads(update_threads)  # also for the evaluation that follows
        stats = ppo_update(agent, optimizer, segments, args)
        # The normalizer merges the new batch only after the update on it ("rollout-consistent", as the GoRL release's fix).
        if args.obs_stats_timing == "rollout_consistent":
            obs_rms.update(obs[:, :T], args.obs_stats_accumulation == "cumulative")

        log_scalars(writer, finite_means(stats, lambda i: f"at iteration {iteration} (epoch {i // args.num_minibatches + 1}, "
                                                          f"minibatch {i % args.num_minibatches + 1})"), global_step)
        loop["train_time"] += time.time() - iteration_start
        sps = int(global_step / loop["train_time"])
        log_scalars(writer, {"charts/SPS": sps, "perf/rollout_SPS": int(steps_per_iteration / rollout_time)}, global_step)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        if crossed(global_step, steps_per_iteration, args.eval_every) or iteration == num_iterations:
            eval_and_log(eval_policy(agent, obs_rms, eval_seed), global_step, args, backend, device, writer, run_name, loop)
        print(f"iter {iteration}/{num_iterations} global_step={global_step} SPS={sps} train_return={loop['train_return']:.1f} "
              f"eval_return={loop['eval_return']:.1f} (at step {loop['eval_step']}) {eta(loop, iteration, num_iterations)}")
        loop.update(iteration=iteration, global_step=global_step, obs_dim=obs_dim, action_dim=action_dim)
        if crossed(global_step, steps_per_iteration, checkpoint_every) or iteration == num_iterations:
            writer.flush()  # the logs up to the checkpoint are on disk before it: a resumed run purges only later ones
            save_checkpoint(args, backend, run_name, modules, loop)

    finish(args, run_name, envs, writer, loop)


# ---- plumbing: the same in every script, and not the algorithm (environments, evaluation, checkpoints, logging) ----
EVAL_SEED_OFFSET = 100_000  # evaluation envs are seeded seed + this: episodes the training envs never see
START = time.time()  # the run's wall clock, setup included


def fail(message):
    """Bad input ends the run with one line on stderr and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args, positive="", non_negative="", unit=""):
    """Refuses a flag named in `positive`, `non_negative` or `unit` (in (0, 1]) when one of its values is out of range."""
    for names, ok, what in [(positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, "non-negative"),
                            (unit, lambda v: 0 < v <= 1, "in (0, 1]")]:
        for name in names.split():
            values = [v for v in np.atleast_1d(getattr(args, name)) if v is not None]  # a flag may hold several values
            if not all(ok(v) for v in values):
                fail(f"--{name.replace('_', '-')} must be {what}, got {' '.join(map(str, values))}")


def parse_args():
    """`python script.py [PRESET] [--flag ...]`: the preset (`presets`; `paper` when none is named) gives the defaults,
    flags override them. --resume and --eval-checkpoint take the saved run's and refuse a flag that would change what it
    learns (a resumed run may go on for more --total-timesteps, an evaluation take any --num-eval-envs)."""
    argv = sys.argv[1:]
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the flags that choose the defaults
    for flag in ["--env-id", "--resume", "--eval-checkpoint"]:
        early.add_argument(flag)
    known = early.parse_known_args(argv)[0]
    named = presets(known.env_id or Args.env_id)
    preset = argv.pop(0) if argv and argv[0] in named else "paper"
    if argv and not argv[0].startswith("-"):
        fail(f"unknown preset {argv[0]!r}: a command's first word is a preset, one of {', '.join(named)}")
    checkpoint = load_checkpoint(known.resume or known.eval_checkpoint) if known.resume or known.eval_checkpoint else None
    saved = checkpoint["args"] if checkpoint else None
    defaults = Args(**saved) if saved else named[preset]
    changes = " ".join(f"{k}={v}" for k, v in vars(defaults).items() if v != getattr(named["paper"], k)) or "nothing"
    source = "the saved run" if saved else f"preset {preset!r} (of {', '.join(named)})"
    description = f"{__doc__}\nThe defaults below are {source}'s; beyond the paper's it sets: {changes}."
    args = tyro.cli(Args, default=defaults, args=argv, description=description)
    if saved:  # a saved run continues or is evaluated as it was; only these may change (an evaluation: its episodes too)
        may_differ = "resume eval_checkpoint checkpoint_every cuda threads track wandb_project_name wandb_entity capture_video"
        may_differ += " num_eval_envs" if known.eval_checkpoint else " total_timesteps"
        for name, value in vars(args).items():
            if value != saved[name] and name not in may_differ.split():
                fail(f"--resume and --eval-checkpoint take the saved run's --{name.replace('_', '-')} {saved[name]}")
        if known.resume and args.total_timesteps < checkpoint["loop"]["global_step"]:
            fail(f"--total-timesteps {args.total_timesteps} is below the {checkpoint['loop']['global_step']} steps run")
    if args.save_model and args.checkpoint_every == 0:
        fail("--save-model keeps the final checkpoint, which --checkpoint-every 0 turns off")
    return args


def setup(args, load_policy):
    """--resume, --eval-checkpoint (evaluates, exits), backend, memory, device, seed, writer: all before training."""
    checkpoint = load_checkpoint(args.resume or args.eval_checkpoint) if args.resume or args.eval_checkpoint else None
    os.environ.setdefault("MUJOCO_GL", "egl" if args.capture_video else "disable")  # before dm_control loads OpenGL
    logging.getLogger("absl").setLevel(logging.ERROR)  # dm_control's model-compiler deprecation warnings
    torch.set_flush_denormal(True)  # on the CPU, denormal floats in Adam's state slow every update down over time
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.torch_deterministic and device.type == "cuda":  # the CPU kernels used here are deterministic already
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    backend = resolve_backend(args.env_id, checkpoint["backend"] if checkpoint else args.env_backend)
    run_name = checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.capture_video:  # fail now, with one line, where OpenGL cannot render
        import mujoco
        try:
            mujoco.Renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 8, 8).close()
        except Exception:
            fail(f"--capture-video: MUJOCO_GL={os.environ['MUJOCO_GL']} cannot render here: install EGL (libegl1) or osmesa")
    if args.eval_checkpoint is not None:  # the saved model's deterministic evaluation, on its task and seeds
        video_path = f"videos/{run_name}/eval_checkpoint.mp4" if args.capture_video else None
        mean, std = evaluate(load_policy(checkpoint, device), args.env_id, backend, args.num_eval_envs,
                             args.seed + EVAL_SEED_OFFSET, device, video_path)
        video = f"; video: {video_path}" if video_path else ""
        print(f"eval/episodic_return={mean:.4f} eval/episodic_return_std={std:.4f} ({args.num_eval_envs} episodes){video}")
        sys.exit(0)
    check_memory(args, backend, spare_envs=max(args.num_eval_envs, getattr(args, "refine_num_envs", 0)))  # GoRL's refit
    torch.manual_seed(args.seed)  # the only global RNG the scripts draw from (envs are seeded one by one)
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track needs wandb: pip install wandb")
    if args.track:  # Weights and Biases reads the tensorboard logs
        importlib.import_module("wandb").init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                                              sync_tensorboard=True, config=vars(args), save_code=True)
    resume = f"python {os.path.basename(__file__)} --resume runs/{run_name}/checkpoint.pt"
    resume = f"to continue from the last checkpoint: {resume}" if args.checkpoint_every != 0 else "no checkpoints were written"
    signal.signal(signal.SIGINT, lambda *_: fail(f"interrupted; {resume}"))
    # A resumed run writes on in its directory; tensorboard drops what the killed run logged after its checkpoint.
    writer = SummaryWriter(f"runs/{run_name}", purge_step=checkpoint["loop"]["global_step"] + 1 if checkpoint else None)
    table = "\n".join(f"|{k}|{v}|" for k, v in {**vars(args), "backend": backend}.items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return checkpoint, backend, device, writer, run_name


def dmc_task_ids():
    """The paper's CamelCase names from dm_control's own task list: ('ball_in_cup', 'catch') -> 'BallInCupCatch'."""
    from dm_control import suite
    return {"".join(w.capitalize() for w in f"{d}_{t}".split("_")): (d, t) for d, t in suite.ALL_TASKS}


def resolve_backend(env_id, backend):
    """Checks that the task exists and returns the backend that runs it: `auto` is EnvPool when it has the task."""
    dmc = dmc_task_ids()
    if env_id not in dmc and env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, [*dmc, *gym.registry], n=3, cutoff=0.6)
        fail(f"unknown --env-id {env_id!r}; " + (f"did you mean {', '.join(close)}?" if close else
                                                 "use a DMC task (CheetahRun) or a Gymnasium id (Hopper-v5)"))
    pool_ids = {i.lower(): i for i in envpool.list_all_envs()} if envpool else {}  # DMC: `{id}-v1`, any case
    pool_id = pool_ids.get((f"{env_id}-v1" if env_id in dmc else env_id).lower())
    why = f"EnvPool has the task ({pool_id})" if pool_id else f"EnvPool has no task {env_id!r}"
    why = why if envpool else "EnvPool is not installed (pip install envpool==1.2.5; CPython 3.11-3.14, Linux, macOS)"
    if backend == "envpool" and pool_id is None:
        fail(f"--env-backend envpool: {why}")
    if backend == "auto":  # said in one line, so a slow dm_control run is never a silent surprise
        backend = "envpool" if pool_id else "dm_control"
        print(f"backend auto -> {backend}: {why}")
    if backend == "dm_control" and env_id not in dmc:  # a Gymnasium id: made once, so a missing dependency is one line
        try:
            with warnings.catch_warnings():  # Gymnasium's deprecation warning for the ids it no longer makes
                warnings.simplefilter("ignore")
                gym.make(env_id).close()
        except Exception as e:
            fail(f"--env-id {env_id!r} cannot be made: {str(e).splitlines()[0][:200]}")
    if backend == "dm_control" and env_id not in dmc and gym.spec(env_id).max_episode_steps is None:
        fail(f"--env-id {env_id!r} has no time limit (max_episode_steps) in Gymnasium, so its episodes may never end")
    return backend


def check_memory(args, backend, spare_envs):
    """Refuses a run whose envs (each what 8 add to this process) cannot fit in memory (tests: GORL_MEMORY_LIMIT_BYTES)."""
    available = int(os.environ.get("GORL_MEMORY_LIMIT_BYTES", 0)) or psutil.virtual_memory().available
    if (args.num_envs + spare_envs) * 2**28 <= 0.9 * available:  # 256 MiB an env fits: not measured
        return
    VecEnv(args.env_id, backend, 1, args.seed).close()  # one-time costs first: imports, EnvPool's thread pool, assets
    before = psutil.Process().memory_info().rss
    probe = VecEnv(args.env_id, backend, 8, args.seed)
    probe.reset()
    per_env = max(psutil.Process().memory_info().rss - before, 1) / 8
    probe.close()
    fits = int(0.9 * available / per_env) - spare_envs  # a tenth for the storage, the networks and slack
    if args.num_envs > fits:
        fits = 2 ** int(np.log2(fits)) if fits > 0 else 0  # a power of 2 divides PPO's layouts
        fail(f"{args.num_envs} training + {spare_envs} evaluation/refinement envs of {args.env_id} on {backend} need about "
             f"{(args.num_envs + spare_envs) * per_env / 2**30:.1f} GiB ({per_env / 2**20:.1f} MiB each, measured), more "
             f"than the {available / 2**30:.1f} GiB free; " + (f"--num-envs {fits} fits" if fits else "lower --num-eval-envs"))


class VecEnv:
    """`num_envs` copies of a task on either backend: flat float32 observations, actions in [-1, 1] mapped to the bounds.
    `step` also returns `valid` (False on EnvPool's reset step after an episode end) and the ended episodes' stats."""

    def __init__(self, env_id, backend, num_envs, seed, render=False):
        dmc = dmc_task_ids()
        self.backend = backend
        self.num_envs = num_envs
        self.seed = seed
        if backend == "envpool":
            pool_id = {i.lower(): i for i in envpool.list_all_envs()}[(f"{env_id}-v1" if env_id in dmc else env_id).lower()]
            self.envs = envpool.make(pool_id, env_type="gymnasium", num_envs=num_envs, seed=seed)
            space = self.envs.action_space
            self.max_episode_steps = self.envs.spec.config.max_episode_steps
            if env_id in dmc:  # EnvPool pads some tasks with a sibling task's all-zero entries: keep dm_control's own
                from dm_control import suite
                self.keys = sorted(suite.load(*dmc[env_id]).observation_spec())
        else:  # dm_control through shimmy; DMC tasks never end on their own: cut at 1000 steps, as EnvPool does
            import shimmy
            gym.register_envs(shimmy)
            name, limit = ("dm_control/{}-{}-v0".format(*dmc[env_id]), 1000) if env_id in dmc else (env_id, None)
            # SAME_STEP autoreset: the step that ends an episode returns the next one's first observation, nothing is lost
            self.envs = gym.make_vec(name, num_envs, "sync", {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                                     [gym.wrappers.FlattenObservation], max_episode_steps=limit,
                                     render_mode="rgb_array" if render else None)
            space = self.envs.single_action_space
            self.max_episode_steps = self.envs.envs[0].spec.max_episode_steps
        if not isinstance(space, gym.spaces.Box):
            fail(f"--env-id {env_id!r} has {type(space).__name__} actions; these scripts need continuous (Box) actions")
        bounded = (np.abs(space.low) < 1e6) & (np.abs(space.high) < 1e6)  # LQR's unbounded actuators (+-1e10): as they are
        self.low, self.high = (np.where(bounded, b.astype(np.float64), s) for b, s in [(space.low, -1.0), (space.high, 1.0)])
        self.action_dim = self.low.size
        self.identity = bool(np.all(self.low == -1) and np.all(self.high == 1))  # every DMC task: no mapping
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.close = self.envs.close

    def flatten(self, obs):
        if isinstance(obs, dict):  # EnvPool's DMC tasks
            obs = np.concatenate([np.asarray(obs[k]).reshape(self.num_envs, -1) for k in self.keys], axis=1)
        return np.asarray(obs, dtype=np.float32).reshape(self.num_envs, -1)

    def reset(self):
        self.returns[:] = 0
        self.lengths[:] = 0
        return self.flatten(self.envs.reset()[0] if self.backend == "envpool" else self.envs.reset(seed=self.seed)[0])

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)  # mapped in float64 and clipped: rounding never leaves the bounds
        if not self.identity:
            action = np.clip(self.low + (action + 1) / 2 * (self.high - self.low), self.low, self.high)
        obs, reward, terminated, truncated, info = self.envs.step(action)
        # EnvPool reports a termination on the time-limit step as a truncation only; Gymnasium's TimeLimit reports both
        # (the loops keep such a step a termination). DMC tasks never terminate: both backends truncate them.
        valid = info["elapsed_step"] > 0 if self.backend == "envpool" else np.ones(self.num_envs, dtype=bool)
        reward = np.asarray(reward, np.float32) * valid
        terminated = np.asarray(terminated)
        truncated = np.asarray(truncated)
        done = terminated | truncated
        self.returns = self.returns + reward
        self.lengths = self.lengths + valid
        ended = self.returns[done], self.lengths[done]
        self.returns[done] = 0
        self.lengths[done] = 0
        obs = self.final_obs = self.flatten(obs)
        if self.backend != "envpool" and done.any():  # EnvPool returns the final observation itself, resetting a step later
            self.final_obs = obs.copy()
            self.final_obs[done] = np.stack(info["final_obs"][done])
        return obs, reward, terminated, truncated, valid, ended


@torch.no_grad()
def evaluate(policy, env_id, backend, num_envs, seed, device, video_path=None, frames=None):
    """(mean, std) of one episode's return on each of `num_envs` fresh envs seeded alike every time (video: env 0's)."""
    envs = VecEnv(env_id, backend, num_envs, seed, render=frames is not None)
    obs = envs.reset()
    returns = np.zeros(num_envs)
    done = np.zeros(num_envs, dtype=bool)
    for _ in range(envs.max_episode_steps):
        if frames is not None:
            frames.append(envs.envs.render()[0])
        obs, reward, terminated, truncated, _, _ = envs.step(policy(torch.as_tensor(obs, device=device)).cpu().numpy())
        returns = returns + reward * ~done
        done = done | terminated | truncated
        if done.all():
            break
    envs.close()  # frees a GL context now: dm_control's EGL cleanup at exit raises
    if video_path is not None:  # EnvPool cannot render
        evaluate(policy, env_id, "dm_control", 1, seed, device, frames=(frames := []))
        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        imageio.mimwrite(video_path, frames, fps=30, macro_block_size=1)
    return float(returns.mean()), float(returns.std())


def eval_and_log(policy, global_step, args, backend, device, writer, run_name, loop):
    """The deterministic evaluation of `policy` at `global_step`, on the evaluation seeds (with --capture-video, a video):
    logs eval/episodic_return and its std, keeps the return, its step and the time taken in `loop`; returns the return."""
    start = time.time()
    video_path = f"videos/{run_name}/step_{global_step}.mp4" if args.capture_video else None
    seed = args.seed + EVAL_SEED_OFFSET
    mean, std = evaluate(policy, args.env_id, backend, args.num_eval_envs, seed, device, video_path)
    log_scalars(writer, {"eval/episodic_return": mean, "eval/episodic_return_std": std}, global_step)
    loop.update(eval_return=mean, eval_step=global_step, eval_time=loop["eval_time"] + time.time() - start)
    return mean


def save_checkpoint(args, backend, run_name, modules, loop):
    """`modules`' state_dicts, the counters `loop` and the RNGs, written over `runs/{run_name}/checkpoint.pt` so that a
    kill leaves one whole; nothing with --checkpoint-every 0."""
    if args.checkpoint_every == 0:
        return
    path = f"runs/{run_name}/checkpoint.pt"
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []  # only when this run uses CUDA
    checkpoint = {"script": os.path.basename(__file__), "args": vars(args), "backend": backend, "run_name": run_name,
                  "loop": loop, "rng": {"torch": torch.get_rng_state(), "cuda": cuda}}
    try:
        torch.save({**checkpoint, **{name: module.state_dict() for name, module in modules.items()}}, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    except (OSError, RuntimeError) as e:  # a full disk, no permission: the last whole checkpoint is still there
        last = f"the last complete one is {path}" if os.path.exists(path) else "no complete one was written"
        fail(f"cannot write the checkpoint {path}.tmp ({str(e).splitlines()[0][:80]}); {last}")


def load_checkpoint(path):
    """A checkpoint of this script, loaded without running code from it (weights_only); others are refused."""
    if not os.path.isfile(path):
        fail(f"cannot read checkpoint {path!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated, corrupt or foreign file: unpickling errors have no common type
        fail(f"cannot read checkpoint {path!r}: not a whole checkpoint of these scripts (truncated, corrupt or foreign)")
    script = checkpoint.get("script") if isinstance(checkpoint, dict) else "something else"
    if script != os.path.basename(__file__):
        fail(f"checkpoint {path!r} was written by {script}, not by {os.path.basename(__file__)}")
    return checkpoint


def restore(checkpoint, modules):
    """Loads a checkpoint into `modules` and the RNGs; returns its counters. Envs start new episodes."""
    for name, module in modules.items():
        module.load_state_dict(checkpoint[name])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"][: torch.cuda.device_count()])
    print(f"resuming {checkpoint['run_name']} at global_step={checkpoint['loop']['global_step']}")
    return checkpoint["loop"]


def finish(args, run_name, envs, writer, loop):
    """Closes the run and says where it all is: the last evaluation, the wall clock, the logs, checkpoint and model."""
    checkpoint = f"runs/{run_name}/checkpoint.pt"
    model = f"runs/{run_name}/{args.exp_name}.cleanrl_model" if args.save_model else checkpoint
    if args.save_model:  # the final checkpoint is the model
        shutil.copyfile(checkpoint, model)
    envs.close()
    writer.close()
    minutes = (time.time() - START) / 60
    print(f"done in {minutes:.1f} min: eval/episodic_return={loop['eval_return']:.1f} at step {loop['eval_step']}")
    videos = f"videos: videos/{run_name}; " if args.capture_video else ""
    again = f"evaluate again: python {os.path.basename(__file__)} --eval-checkpoint {model}"
    print(f"logs: runs/{run_name}; {videos}{again if args.checkpoint_every != 0 else 'no checkpoint (--checkpoint-every 0)'}")


def eta(loop, done, total, refits_left=0):
    """The time left: the steps (or iterations) left at the mean time per step so far, training and evaluations, plus
    each refit left at the mean time of the refits so far, or before the first one ends at `loop["refit_estimate"]`
    (without one, the refits left are named)."""
    minutes = (total - done) / done * (loop["train_time"] + loop["eval_time"]) / 60
    refit = loop["refit_time"] / loop["stage"] if loop.get("stage") else loop.get("refit_estimate")
    if refits_left and refit is None:
        return f"ETA={minutes:.1f}min+{refits_left}x refit"
    return f"ETA={minutes + refits_left * (refit or 0) / 60:.1f}min"


def warn_if_long(args, seconds_per_step, optimizer=None, steps_per_update=1):
    """One line when the run would take more than a day here at `seconds_per_step` per env step (SAC: its first 1000
    steps with updates), naming a preset that fits. Given the `optimizer` (PPO: after the first rollout), it waits for
    the first update step and adds its time, spread over the `steps_per_update` env steps each update step stands for."""
    if optimizer is not None:
        start = time.time()

        def first_update_step(*_):
            hook.remove()
            warn_if_long(args, seconds_per_step + (time.time() - start) / steps_per_update)

        hook = optimizer.register_step_post_hook(first_update_step)
    elif seconds_per_step * args.total_timesteps > 86_400:
        print(f"warning: at its first steps' pace this run takes about {seconds_per_step * args.total_timesteps / 86_400:.1f} "
              f"days here; the `cpu` preset fits a CPU: python {os.path.basename(__file__)} cpu --env-id {args.env_id}")


def crossed(global_step, steps, every):
    """True when the last `steps` env steps passed a multiple of `every` (evaluation and checkpoint points)."""
    return global_step // every > (global_step - steps) // every


def log_scalars(writer, scalars, global_step):
    for name, value in scalars.items():
        writer.add_scalar(name, value, global_step)


def log_episodes(writer, ended, step, train_return):
    """Logs the episodes that just ended, `ended` = (returns, lengths); returns the latest training return."""
    if len(ended[0]) == 0:
        return train_return
    log_scalars(writer, {"charts/episodic_return": ended[0].mean(), "charts/episodic_length": ended[1].mean()}, step)
    return float(ended[0].mean())


def finite_means(stats, where):
    """Means of `stats`, [{name: 0-d tensor}], in one copy to the host; a non-finite loss exits 1, saying `where(i)`."""
    names = list(stats[0])
    values = torch.stack([torch.stack([entry[name].detach() for name in names]) for entry in stats]).cpu()
    bad = (~torch.isfinite(values[:, [name.endswith("loss") for name in names]])).any(1).nonzero()
    if len(bad):
        print(f"error: non-finite loss {where(int(bad[0]))}; stopping", file=sys.stderr)
        sys.exit(1)
    return dict(zip(names, values.mean(0).tolist()))


if __name__ == "__main__":
    main(parse_args())
