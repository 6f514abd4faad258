"""GoRL with a PPO encoder and a diffusion decoder (paper Sec. 3, Algorithm 1, App. E), CleanRL style:
gorl_ppo_fm.py with only the decoder changed.

The policy is a latent Gaussian encoder z ~ pi(z|s) and a decoder g; the environment receives tanh(g(s, z)).
Training runs in stages (`--stage-weights`); each stage is Algorithm 1's two phases and a re-initialization:
  Phase 1, latent policy optimization: PPO on z with g frozen as part of the environment, plus the penalty
    `--beta` * `kl_to_prior`, KL(pi(z|s) || N(0, I)) (Eq. 3). Stage 0's g is the identity: PPO through tanh.
  Phase 2, decoder refinement (`refine_decoder`): the stage's last encoder collects episodes through g, and
    `fit_decoder` trains a new g from scratch, from the fixed prior N(0, I) to the collected actions (Eq. 4):
    epsilon-prediction diffusion; decoding is 10 DDIM steps from z.
  Stage-wise re-initialization: `reset_encoder` restarts the encoder at the prior N(0, I).
The code above the `# ---- plumbing` line is the whole algorithm; below it, the same plumbing in every script.
`diff ppo_gaussian.py gorl_ppo_diff.py` shows what GoRL adds to PPO.

    python gorl_ppo_diff.py --env-id HopperStand --beta 1e-3      # the paper's run (preset `paper`)
    python gorl_ppo_diff.py cpu --env-id CheetahRun                # the same method on 2 CPU cores (preset `cpu`)
    python gorl_ppo_diff.py release --env-id CheetahRun            # the authors' released run of the task
"""
import argparse
import copy
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
from typing import Literal, NamedTuple, Optional, Tuple

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
import torch.nn.functional as F
import tyro
from torch.distributions import Normal
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
    learning_rate: float = 1e-3
    """the learning rate of the encoder's optimizer in stage 0 (constant within a stage)"""
    learning_rate_later: float = 3e-4
    """the encoder's learning rate in stages 1, 2, ..."""
    gamma: float = 0.995
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    clip_coef: float = 0.15
    """the surrogate clipping coefficient in stage 0"""
    clip_coef_later: float = 0.15
    """the surrogate clipping coefficient in stages 1, 2, ..."""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus (Gaussian entropy, no tanh term)"""
    vf_coef: float = 0.25
    """coefficient of the value loss: vf_coef * mean(mask * (v_target - V)^2)"""
    max_grad_norm: float = 0.5
    """the maximum global norm for gradient clipping; 0 disables it"""
    reward_scale: float = 10.0
    """rewards are multiplied by this before GAE"""
    eval_every: int = 6_000_000
    """evaluate every this many environment steps (and at the start and the end)"""
    num_eval_envs: int = 128
    """the number of evaluation episodes, one per fresh environment"""

    stage_weights: Tuple[float, ...] = (2, 2, 1, 1)
    """relative env-step budgets of the stages: 2 2 1 1 of 180M gives 60M/60M/30M/30M; one decoder refit between stages"""
    beta: float = 1e-3
    """coefficient of the KL-to-prior penalty KL(pi(z|s) || N(0, I)) (paper Eq. 3)"""
    encoder_reset: Literal["prior", "none"] = "prior"
    """at each stage start after the first: the encoder restarted at the prior N(0, I) (Sec. 3) or kept (`none`, Sec. 4.3.2)"""
    refine_episodes: int = 4096
    """full episodes collected by the stage's encoder to refit the decoder (not counted in global_step)"""
    refine_num_envs: int = 64
    """the number of parallel environments collecting the refinement episodes"""
    refine_input: Literal["prior", "latent"] = "prior"
    """decoder inputs during the refit: fresh N(0, I) noise (the paper) or the encoder's z (ablation Sec. 4.3.1)"""
    decoder_epochs: int = 50
    """passes over the refinement training split per refit (paper v1)"""
    target_clip: float = 3.0
    """refit targets (pre-tanh actions) are clipped to +-this; 0 turns clipping off"""
    decoder_batch_size: int = 8192
    """actions per decoder minibatch (each with 8 noise samples)"""
    decoder_lr: float = 3e-4
    """the learning rate of the decoder's Adam optimizer"""
    decoder_hidden: int = 64
    """the width of the decoder's 4 hidden layers"""
    decoder_checkpoint: Optional[str] = None
    """start stage 0 from the last decoder of a model saved by this script on the same task (frozen decoder, Sec. 4.3.3)"""

    # The released runs' switches (the `release` preset turns them on; docs/reproducing.md has a row for each).
    tanh_entropy_correction: bool = False
    """add log(1 - tanh(u)^2) at one reparameterized sample u to the entropy bonus: the entropy of tanh(u), as upstream
    FPO's PPO (418c255, playground/src/flow_policy/ppo.py) that ran the paper's PPO row; the GoRL release has it off"""
    obs_stats_accumulation: Tuple[Literal["cumulative", "legacy_batch_only"], ...] = ("cumulative",)
    """the normalizer's variance, one value or one per stage: `cumulative` (the release's fix) or `legacy_batch_only` (FPO)"""
    obs_stats_timing: Tuple[Literal["rollout_consistent", "legacy_pre_update"], ...] = ("rollout_consistent",)
    """one value or one per stage: merge a batch into the normalizer after (`rollout_consistent`) or before the update on it"""
    mask_time_limit_terminations: bool = False
    """mask a termination on the time-limit step like a truncation (no advantage, no value error), as the release does"""
    normalize_advantages_over_all_steps: bool = False
    """normalize advantages over all of a minibatch's steps, masked ones too, with the population std (the release)"""
    kl_form: Literal["analytic", "moments"] = "analytic"
    """the penalty: `analytic` KL (the paper) or `moments`, mean mu^2 + mean sigma^2 (the released code; `kl_to_prior`)"""
    refine_from: Literal["last", "best"] = "last"
    """the stage's encoder that collects the refit data: the last (the paper) or the best-evaluated one (the release)"""
    decoder_steps: int = 0
    """if positive, Adam steps per refit on minibatches drawn with replacement instead of --decoder-epochs (the release)"""
    refit_validation: Literal["epochs", "steps"] = "epochs"
    """`epochs`: validate the refit every epoch on the first 65,536 held-out actions (obs std unbiased, >= 1e-6); `steps`
    (the release): at step 0, 1 and every 100, on 8 fixed batches of 8,192 drawn with replacement (std + 1e-8)"""
    refit_checkpoint_by: Literal["loss", "action-error"] = "loss"
    """keep the refit's decoder with the lowest validation loss, or (`action-error`, the release's FM refits on FingerSpin
    and FishSwim) the lowest error of 4,096 held-out actions decoded from fixed N(0, I) latents"""
    chain_loss_weight: float = 0.0
    """add this times the error of the whole decode of the encoder's own z against its action to the refit's training
    and validation losses (the release's diffusion refits: 1e-3)"""
    stage_learning_rates: Tuple[float, ...] = ()
    """the encoder's learning rate per stage, the last repeating; empty: --learning-rate, then --learning-rate-later"""
    stage_ent_coefs: Tuple[float, ...] = ()
    """the entropy coefficient per stage, the last repeating; empty: --ent-coef in every stage"""
    stage_max_grad_norms: Tuple[float, ...] = ()
    """the gradient clipping norm per stage, the last repeating; empty: --max-grad-norm in every stage"""
    stage_betas: Tuple[float, ...] = ()
    """the KL-to-prior coefficient per stage, the last repeating; empty: --beta in every stage"""
    stage_encoder_resets: Tuple[Literal["prior", "prior-best", "fresh", "warm", "none"], ...] = ()
    """the encoder at each stage start (stage 0 included), the last repeating (`reset_encoder`); empty: --encoder-reset"""
    evals_per_stage: int = 0
    """if positive, evaluate at each stage's start and this many - 1 times evenly across it, the start a candidate for the
    stage's best encoder (the release: 10); 0: every --eval-every steps and at each stage end"""

    def __post_init__(self):  # impossible settings end the run with one line (check_args, in the plumbing)
        check_args(self, positive="""total_timesteps num_envs unroll_length batch_size num_minibatches update_epochs
                   learning_rate clip_coef reward_scale eval_every num_eval_envs""", unit="gamma",
                   non_negative="checkpoint_every threads ent_coef vf_coef max_grad_norm gae_lambda")
        check_args(self, positive="""learning_rate_later clip_coef_later stage_weights refine_episodes refine_num_envs
                   decoder_epochs decoder_batch_size decoder_lr decoder_hidden stage_learning_rates""",  # GoRL's own
                   non_negative="""beta decoder_steps target_clip stage_ent_coefs stage_max_grad_norms stage_betas
                   chain_loss_weight evals_per_stage""")
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
        if not self.stage_weights:
            fail("--stage-weights takes one weight per stage")
        for name in "obs_stats_accumulation obs_stats_timing".split():
            if not 1 <= len(getattr(self, name)) <= len(self.stage_weights):
                fail(f"--{name.replace('_', '-')} takes one value or one per stage ({len(self.stage_weights)} stages)")
        for name in "stage_learning_rates stage_ent_coefs stage_max_grad_norms stage_betas stage_encoder_resets".split():
            if len(getattr(self, name)) > len(self.stage_weights):
                fail(f"--{name.replace('_', '-')} takes one value per stage at most ({len(self.stage_weights)} stages)")
        if len(self.stage_weights) > 1 and self.refine_episodes < max(2, self.refine_num_envs):
            fail(f"--refine-episodes must be at least 2 (one is held out) and --refine-num-envs ({self.refine_num_envs})")
        iteration = segments * self.unroll_length
        if int(self.total_timesteps * min(self.stage_weights) / sum(self.stage_weights)) < iteration:
            smallest = int(iteration * sum(self.stage_weights) / min(self.stage_weights)) - 2
            while int(smallest * min(self.stage_weights) / sum(self.stage_weights)) < iteration:  # as stage_iterations splits
                smallest += 1
            fail(f"each stage of --total-timesteps {self.total_timesteps} needs 1 iteration ({iteration}): "
                 f"--total-timesteps {smallest} is the smallest that works")


def presets(env_id):
    """The named settings: `python gorl_ppo_diff.py [paper|cpu|release] --env-id CheetahRun` (any flag overrides them).
    paper: Args' defaults, the paper's GoRL at the paper's scale (180M steps on 2048 envs, stages of 60M/60M/30M/30M).
    cpu: the same method at a budget two CPU cores run in about half an hour: 3M steps in the same 2:2:1:1 stages, on 16
      envs with 8 minibatches of 16 segments and 8 epochs per iteration, clip 0.2 and gamma 0.99 for so small a batch, no
      entropy bonus or gradient clipping, an evaluation of 32 episodes every 100k steps, and refits on 32 episodes fit
      for 200 epochs (50 epochs over 32 episodes undertrain a decoder that the paper fits on 4096; docs/cpu-preset.md).
    release: the authors' released run of `env_id` (docs/reproducing.md): the KL's moments form, refit data from the
      stage's best encoder, a fresh encoder in stage 0 and the stage's best after, per-stage and per-task settings.
    FingerSpin takes the released runs' gamma 0.95 in cpu and release."""
    paper = Args(env_id=env_id)
    finger_spin = env_id == "FingerSpin"
    cpu = replace(paper, total_timesteps=3_000_000, num_envs=16, batch_size=16, num_minibatches=8, update_epochs=8,
                  gamma=0.95 if finger_spin else 0.99, clip_coef=0.2, clip_coef_later=0.2, ent_coef=0.0, max_grad_norm=0.0,
                  eval_every=100_000, num_eval_envs=32, refine_episodes=32, refine_num_envs=16, decoder_epochs=200,
                  decoder_batch_size=1024)
    release_tasks = {
        "FishSwim": dict(stage_ent_coefs=(0.01, 0.01, 0.01, 0.005)),
        "HopperStand": dict(stage_encoder_resets=("fresh", "fresh", "warm"),
                            obs_stats_accumulation=("legacy_batch_only", "cumulative"),
                            obs_stats_timing=("legacy_pre_update", "rollout_consistent")),
    }
    release = dict(gamma=0.95 if finger_spin else paper.gamma, kl_form="moments", refine_from="best", evals_per_stage=10,
                   mask_time_limit_terminations=True, normalize_advantages_over_all_steps=True, refit_validation="steps",
                   chain_loss_weight=1e-3,
                   stage_learning_rates=(1e-3, 3e-4, 1e-4), stage_betas=(5e-4, 1e-3), stage_encoder_resets=("fresh", "warm"))
    release = replace(paper, **{**release, **release_tasks.get(env_id, {})})  # a task's own settings win
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


def kl_to_prior(dist, form="analytic"):
    """The penalty of paper Eq. 3 that keeps the latents where the decoder was trained, per sample: `analytic` (the paper)
    KL(N(mu, sigma^2) || N(0, I)) = 0.5 sum_d (mu^2 + sigma^2 - 1 - 2 log sigma), or the released code's `moments`,
    mean_d mu^2 + mean_d sigma^2 (with coefficient c, the analytic pull on the means at beta = 2c / D, but sigma pulled to
    0, not 1)."""
    if form == "moments":
        return (dist.mean**2).mean(-1) + (dist.scale**2).mean(-1)
    return 0.5 * (dist.mean**2 + dist.scale**2 - 1 - 2 * dist.scale.log()).sum(-1)


def stage_settings(args, stage):
    """`args` as `stage` runs them: --learning-rate and --clip-coef in stage 0 and their *-later values after; a
    per-stage switch of the released runs (the end of Args, one value per stage, the last repeating) overrides."""
    def pick(values, default):
        return values[min(stage, len(values) - 1)] if values else default

    settings = copy.copy(args)
    settings.learning_rate = pick(args.stage_learning_rates, args.learning_rate if stage == 0 else args.learning_rate_later)
    settings.clip_coef = args.clip_coef if stage == 0 else args.clip_coef_later
    settings.ent_coef = pick(args.stage_ent_coefs, args.ent_coef)
    settings.max_grad_norm = pick(args.stage_max_grad_norms, args.max_grad_norm)
    settings.beta = pick(args.stage_betas, args.beta)
    # Stage 0 starts at the prior either way: `none` (the ablation of Sec. 4.3.2) drops only the restarts after it.
    settings.encoder_reset = pick(args.stage_encoder_resets, "prior" if stage == 0 else args.encoder_reset)
    settings.obs_stats_accumulation = pick(args.obs_stats_accumulation, None)
    settings.obs_stats_timing = pick(args.obs_stats_timing, None)
    return settings


def stage_iterations(args, steps_per_iteration):
    """The last iteration of each stage: --total-timesteps split by --stage-weights (the paper's 2 2 1 1 of 180M: 60M,
    60M, 30M, 30M), each stage in whole iterations."""
    stage_steps = [int(args.total_timesteps * w / sum(args.stage_weights)) for w in args.stage_weights]
    return list(np.cumsum([steps // steps_per_iteration for steps in stage_steps]))


def release_evaluations(stage_ends, evals_per_stage):
    """The iterations after which the release evaluates (`--evals-per-stage`): in each stage of n iterations, after its
    iterations 1, ..., n spread evenly, which with the evaluation at the stage's start make evals_per_stage."""
    iterations = set()
    for start, end in zip([0, *stage_ends[:-1]], stage_ends):
        iterations |= {start + int(x) for x in np.linspace(1, end - start, max(evals_per_stage - 1, 0))}
    return iterations


def remember_best(best, mean, agent, obs_rms):
    """Keeps the stage's best-evaluated encoder with its normalizer (--refine-from best, the release's restarts)."""
    if mean > best["return"]:
        best["return"] = mean
        best["agent"].load_state_dict(agent.state_dict())
        best["obs_rms"].load_state_dict(obs_rms.state_dict())


class Sample(NamedTuple):
    """What `act` returns: the sampled action, its log-probability, and the policy's mean (what evaluation runs)."""

    action: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor


class Agent(nn.Module):
    """Actor 4x32 and critic 5x256 SiLU MLPs on normalized observations, as the authors' released networks."""

    def __init__(self, obs_dim, action_dim):
        super().__init__()
        self.critic = mlp([obs_dim, 256, 256, 256, 256, 256, 1])
        self.actor = mlp([obs_dim, 32, 32, 32, 32, 2 * action_dim])

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    def get_dist(self, x):
        """Gaussian over the pre-tanh action u; the environment receives tanh(u). The tanh Jacobian cancels in
        the PPO ratio, so log-probabilities are of u."""
        mean, raw_scale = self.actor(x).chunk(2, dim=-1)
        return Normal(mean, (F.softplus(raw_scale) + 1e-3).clamp(max=10.0), validate_args=False)  # no per-step syncs

    def entropy(self, dist, tanh_correction=False):
        """The mean entropy of the Gaussian over u. `tanh_correction` (upstream FPO's PPO) adds a one-sample estimate
        of E[log|d tanh(u) / du|] = E[2 (log 2 - u - softplus(-2u))], giving the entropy of tanh(u)."""
        if not tanh_correction:
            return dist.entropy().sum(-1).mean()
        u = dist.rsample()
        return dist.entropy().sum(-1).mean() + (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1).mean()

    def act(self, x):
        """A sampled pre-tanh action u, its log-probability and the Gaussian's mean (evaluation's deterministic u)."""
        dist = self.get_dist(x)
        u = dist.sample()
        return Sample(action=u, log_prob=dist.log_prob(u).sum(-1), mean=dist.mean)


def ppo_update(agent, optimizer, segments, args):
    """`--update-epochs` passes over the iteration's segments in minibatches of `--batch-size`: the clipped surrogate,
    the masked value loss and the entropy bonus, on the latents z, plus the KL-to-prior penalty (Eq. 3). Returns each
    minibatch's statistics (0-d tensors, still on the device)."""
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

            dist = agent.get_dist(mb_obs[:, :-1])
            logratio = dist.log_prob(segments["actions"][idx]).sum(-1) - segments["logprobs"][idx]
            ratio = logratio.exp()
            clipped_ratio = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
            pg_loss = -torch.min(advantages * ratio, advantages * clipped_ratio).mean()
            v_loss = args.vf_coef * (mb_mask * (v_targets - values[:, :-1]) ** 2).mean()
            entropy = agent.entropy(dist, args.tanh_entropy_correction)
            latent_kl = kl_to_prior(dist, args.kl_form).mean()
            loss = pg_loss + v_loss - args.ent_coef * entropy + args.beta * latent_kl

            optimizer.zero_grad()
            loss.backward()
            if args.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            approx_kl = ((ratio - 1) - logratio).mean()
            clipfrac = ((ratio - 1).abs() > args.clip_coef).float().mean()
            explained_var = explained_variance(v_targets, values[:, :-1].detach(), mb_mask)
            stats.append({"losses/loss": loss, "losses/policy_loss": pg_loss, "losses/value_loss": v_loss,
                          "losses/entropy": entropy, "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac,
                          "losses/explained_variance": explained_var})
            stats[-1].update({"gorl/latent_kl": latent_kl, "gorl/latent_mean": dist.mean.mean(),
                              "gorl/latent_std": dist.scale.mean()})
    return stats


def eval_policy(agent, obs_rms, decoder):
    """The deterministic policy that evaluation runs: raw observation -> the encoder's mean latent, decoded, tanh."""
    return lambda x: torch.tanh(decoder(x, agent.get_dist(obs_rms(x)).mean))


def load_policy(checkpoint, device):
    """The evaluation policy of a saved model (--eval-checkpoint)."""
    obs_dim = checkpoint["loop"]["obs_dim"]
    action_dim = checkpoint["loop"]["action_dim"]
    obs_rms = RunningMeanStd(obs_dim).to(device)
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    agent = Agent(obs_dim, action_dim).to(device)
    agent.load_state_dict(checkpoint["agent"])
    decoder = Decoder(obs_dim, action_dim, checkpoint["args"]["decoder_hidden"]).to(device)
    decoder.load_state_dict(checkpoint["decoder"])
    return eval_policy(agent, obs_rms, decoder)


def reset_encoder(agent, mode, obs_dim, action_dim):
    """The encoder at a stage start (paper Sec. 3, stage-wise re-initialization). `prior`: a fresh actor whose last layer
    makes the latent policy exactly N(0, I) for any observation (mean 0, scale softplus(b) + 1e-3 = 1), critic kept;
    `prior-best` the same on the stage's best encoder; `fresh`: actor, critic (and normalizer) new; `warm` (the stage's
    best encoder) and `none` keep the encoder they are given."""
    if mode in ("none", "warm"):
        return agent
    new = Agent(obs_dim, action_dim).to(next(agent.parameters()).device)
    if mode == "fresh":
        return new
    agent.actor = new.actor
    with torch.no_grad():
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias[:action_dim] = 0.0
        agent.actor[-1].bias[action_dim:] = float(np.log(np.expm1(1.0 - 1e-3)))
    return agent


def restart_encoder(agent, obs_rms, optimizer, best, settings):
    """The encoder, its normalizer and its optimizer for the next stage (`settings.encoder_reset`, `reset_encoder`);
    the next stage's best encoder is still to be found."""
    best["return"] = -float("inf")
    if settings.encoder_reset in ("warm", "prior-best"):  # the stage's best encoder with its normalizer (the release)
        agent = copy.deepcopy(best["agent"])
        obs_rms = copy.deepcopy(best["obs_rms"])
    if settings.encoder_reset == "fresh":  # with actor and critic, the normalizer starts over (released FM code)
        obs_rms = RunningMeanStd(len(obs_rms.mean)).to(obs_rms.mean.device)
    agent = reset_encoder(agent, settings.encoder_reset, len(obs_rms.mean), agent.actor[-1].out_features // 2)
    if settings.encoder_reset != "none":  # a restarted encoder gets a fresh optimizer state
        optimizer = torch.optim.Adam(agent.parameters(), lr=settings.learning_rate, eps=1e-8)
    optimizer.param_groups[0]["lr"] = settings.learning_rate
    return agent, obs_rms, optimizer


SAMPLES_PER_ACTION = 8  # (noise, t) pairs per action in the decoder's loss, as the released code
VAL_ACTIONS = 65_536  # held-out actions in the refit's validation loss (and the chunk that bounds its memory)
REFINE_SEED_OFFSET = 200_000  # refinement envs of stage k are seeded seed + this + k: neither training nor evaluation seeds


class Decoder(nn.Module):
    """Diffusion decoder a = g(s, z) (paper Sec. 3.2): epsilon prediction with alpha_bar(t) = 1e-3 + 0.999 (1 - t) on
    t in {0.1, ..., 1}, decoded by deterministic DDIM (eta 0) from x_1 = z in 10 steps. A DDIM step from t to t - 0.1 is
    x' = r x + c eps_hat, the identity when eps_hat = (1 - r) / c * x; the network predicts the correction f to that,
    eps_hat = (1 - r) / c * x + f, so a step is x <- x + c f, and its zero last layer makes a fresh decoder exactly the
    identity (release "epsilon_delta"). f is the network output times 0.25. Observations are normalized with the
    statistics of its own training data, stored with it."""

    num_steps = 10

    def __init__(self, obs_dim, action_dim, hidden):
        super().__init__()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.net = mlp([obs_dim + action_dim + 8, hidden, hidden, hidden, hidden, action_dim])
        nn.init.zeros_(self.net[-1].weight)

    @staticmethod
    def embed(t):
        """t: [B, 1] -> time embedding [cos(t 2^k), sin(t 2^k)], k = 0..3."""
        tk = t * 2.0 ** torch.arange(4, device=t.device)
        return torch.cat([torch.cos(tk), torch.sin(tk)], dim=-1)

    def correction(self, s, x, temb):
        return 0.25 * self.net(torch.cat([s, x, temb], dim=-1))

    def ddim_coefficients(self, t):
        """r and c of the DDIM step from t to t - 0.1."""
        alpha_bar = 1e-3 + 0.999 * (1 - t)
        alpha_bar_next = 1e-3 + 0.999 * (1 - (t - 1.0 / self.num_steps))
        r = (alpha_bar_next / alpha_bar).sqrt()
        return r, (1 - alpha_bar_next).clamp(min=0).sqrt() - r * (1 - alpha_bar).sqrt()

    def forward(self, obs, z):
        """Decodes a batch: x = z at t = 1, then x <- x + c(t) f(s, x, t) at t = 1.0, 0.9, ..., 0.1."""
        s = (obs - self.obs_mean) / self.obs_std
        x = z
        t = 1.0 - torch.arange(self.num_steps, device=z.device)[:, None] / self.num_steps  # all 10 steps' constants at once
        temb = self.embed(t)
        c = self.ddim_coefficients(t)[1]
        for k in range(self.num_steps):
            x = x + c[k] * self.correction(s, x, temb[k].expand(len(x), -1))
        return x

    def loss(self, obs, action, noise, uniform):
        """Per sample: a step t in {0.1, ..., 1} from uniform ~ U(0, 1), x_t = sqrt(ab) a + sqrt(1 - ab) noise, and
        f regressed onto noise - (1 - r) / c * x_t, the correction that makes eps_hat the true noise."""
        s = (obs - self.obs_mean) / self.obs_std
        t = (uniform * self.num_steps).ceil().clamp(1, self.num_steps) / self.num_steps
        alpha_bar = 1e-3 + 0.999 * (1 - t)
        x_t = alpha_bar.sqrt() * action + (1 - alpha_bar).sqrt() * noise
        r, c = self.ddim_coefficients(t)
        return ((self.correction(s, x_t, self.embed(t)) - (noise - (1 - r) / c * x_t)) ** 2).mean(-1)


@torch.no_grad()
def collect_refinement_data(sample_z, decoder, env_id, backend, num_envs, num_episodes, seed, device):
    """Runs the stage's encoder (`sample_z`: raw obs -> sampled latent) through its decoder until `num_episodes` episodes
    ended. Returns (obs, pre-tanh action, z, episode id) of their valid steps, their returns, and the env steps taken."""
    envs = VecEnv(env_id, backend, num_envs, seed)
    next_obs = envs.reset()
    episode = np.arange(num_envs)  # the id of each env's running episode
    next_episode = num_envs
    transitions = []
    episode_ids = []
    valids = []
    ended_episodes = []
    returns = []
    shown = time.time()
    while len(returns) < num_episodes:
        if time.time() - shown > 15:  # a refit's collection can take minutes: say where it is
            print(f"  refit: {len(returns)} of {num_episodes} episodes collected", flush=True)
            shown = time.time()
        obs = torch.as_tensor(next_obs, device=device)
        z = sample_z(obs)
        action = decoder(obs, z)
        next_obs, _, terminated, truncated, valid, (ended_returns, _) = envs.step(torch.tanh(action).cpu().numpy())
        transitions.append((obs, action, z))
        episode_ids.append(episode.copy())
        valids.append(valid)
        done = terminated | truncated
        ended_episodes.extend(episode[done])
        returns.extend(ended_returns)
        episode[done] = next_episode + np.arange(done.sum())
        next_episode += int(done.sum())
    envs.close()
    kept = np.isin(np.stack(episode_ids), ended_episodes[:num_episodes])  # episodes ending together may overshoot
    keep = torch.as_tensor((np.stack(valids) & kept).reshape(-1), device=device)
    obs, action, z = (torch.stack(x).flatten(0, 1)[keep] for x in zip(*transitions))
    episode_id = torch.as_tensor(np.stack(episode_ids).reshape(-1), device=device)[keep]
    return (obs, action, z, episode_id), np.array(returns[:num_episodes]), len(transitions) * num_envs


def fit_decoder(data, args, device):
    """Trains a new decoder from scratch on the refinement data (paper Eq. 4) from fresh prior noise eps ~ N(0, I), never
    the encoder's z (`--refine-input latent` is the ablation of Sec. 4.3.1), SAMPLES_PER_ACTION samples per action, to
    the pre-tanh actions clipped to +-`--target-clip`. 10% of the episodes are held out; the decoder with the lowest
    validation loss (fixed noise), checked every epoch (or every 2% of --decoder-steps with replacement), is kept;
    `--refit-validation steps` validates as the release does. Returns (decoder, mean train loss since the last
    validation, best validation loss)."""
    obs, action, z, episode_id = data
    if args.target_clip > 0:
        action = action.clamp(-args.target_clip, args.target_clip)
    episodes = episode_id.unique()
    val_episodes = episodes[torch.randperm(len(episodes), device=device)[: max(1, len(episodes) // 10)]]
    is_val = torch.isin(episode_id, val_episodes)
    train_idx = (~is_val).nonzero().squeeze(1)
    val_idx = is_val.nonzero().squeeze(1)[:VAL_ACTIONS]
    steps_schedule = args.refit_validation == "steps"
    if steps_schedule:  # the release: 8 fixed batches of 8,192 held-out actions, drawn with replacement
        held_out = is_val.nonzero().squeeze(1)
        val_idx = held_out[torch.randint(len(held_out), (8 * 8192,), device=device)]
    if args.refit_checkpoint_by == "action-error":  # the release: 4,096 held-out actions, evenly spaced, fixed latents
        held_out = is_val.nonzero().squeeze(1)
        endpoints = held_out[torch.linspace(0, len(held_out) - 1, 4096, device=device).long()]
        endpoint_z = torch.randn(len(endpoints), action.shape[1], device=device)
    decoder = Decoder(obs.shape[1], action.shape[1], args.decoder_hidden).to(device)
    decoder.obs_mean.copy_(obs[train_idx].mean(0))
    if steps_schedule:  # the release's population std + 1e-8
        decoder.obs_std.copy_(obs[train_idx].std(0, unbiased=False) + 1e-8)
    else:
        decoder.obs_std.copy_(obs[train_idx].std(0).clamp(min=1e-6))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr)

    def batch(idx):
        a = action[idx].repeat_interleave(SAMPLES_PER_ACTION, 0)
        noise = torch.randn_like(a) if args.refine_input == "prior" else z[idx].repeat_interleave(SAMPLES_PER_ACTION, 0)
        return obs[idx].repeat_interleave(SAMPLES_PER_ACTION, 0), a, noise, torch.rand_like(a[:, :1])

    val_batch = batch(val_idx)  # drawn once: the validation loss uses fixed noise
    steps_per_epoch = math.ceil(len(train_idx) / args.decoder_batch_size)
    total_steps = args.decoder_steps or args.decoder_epochs * steps_per_epoch
    validate_every = max(1, total_steps // 50) if args.decoder_steps else steps_per_epoch
    if steps_schedule:
        validate_every = 100

    def chain_loss(idx):
        """The whole decode of the encoder's own z against its action (the release's diffusion `pairwise_loss`)."""
        return ((decoder(obs[idx], z[idx]) - action[idx]) ** 2).mean()

    def validation_loss():
        with torch.no_grad():
            if args.refit_checkpoint_by == "action-error":
                return float(((decoder(obs[endpoints], endpoint_z) - action[endpoints]) ** 2).mean())
            starts = range(0, len(val_batch[0]), VAL_ACTIONS)  # chunks bound the memory
            chunks = [decoder.loss(*(x[i : i + VAL_ACTIONS] for x in val_batch)) for i in starts]
            loss = float(torch.cat(chunks).mean())
            if args.chain_loss_weight > 0:
                loss += args.chain_loss_weight * float(chain_loss(val_idx))
            return loss

    best_val = validation_loss() if steps_schedule else float("inf")  # the release: the initial decoder is a candidate
    best_state = copy.deepcopy(decoder.state_dict())
    losses = []
    shown = time.time()
    for step in range(total_steps):
        if time.time() - shown > 15:  # and so can its fit
            print(f"  refit: {step} of {total_steps} Adam steps of the new decoder", flush=True)
            shown = time.time()
        if args.decoder_steps:  # with replacement
            idx = train_idx[torch.randint(len(train_idx), (args.decoder_batch_size,), device=device)]
        else:  # epochs: a new permutation of the training split every steps_per_epoch steps
            if step % steps_per_epoch == 0:
                perm = train_idx[torch.randperm(len(train_idx), device=device)]
            idx = perm[(step % steps_per_epoch) * args.decoder_batch_size :][: args.decoder_batch_size]
        loss = decoder.loss(*batch(idx)).mean()
        if args.chain_loss_weight > 0:  # gradients through all of the decoder's steps
            loss = loss + args.chain_loss_weight * chain_loss(idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        validate = (step + 1) % validate_every == 0 or step + 1 == total_steps or (steps_schedule and step == 0)
        if not validate:
            continue
        val_loss = validation_loss()
        train_loss = float(torch.stack(losses).mean())
        losses = []
        if not (np.isfinite(train_loss) and np.isfinite(val_loss)):
            print(f"error: non-finite decoder loss at refit step {step + 1} of {total_steps}; stopping", file=sys.stderr)
            sys.exit(1)
        if val_loss < best_val:
            best_val = val_loss
            best_state = copy.deepcopy(decoder.state_dict())
    decoder.load_state_dict(best_state)
    return decoder, train_loss, best_val


def first_decoder(args, obs_dim, action_dim, device):
    """Stage 0's decoder: a fresh one (the identity) or the last decoder of a model saved by this script on the same
    task (--decoder-checkpoint, Sec. 4.3.3)."""
    decoder = Decoder(obs_dim, action_dim, args.decoder_hidden).to(device)
    if args.decoder_checkpoint is not None:
        saved = load_checkpoint(args.decoder_checkpoint)
        if saved["args"]["env_id"] != args.env_id or saved["args"]["decoder_hidden"] != args.decoder_hidden:
            fail(f"--decoder-checkpoint {args.decoder_checkpoint!r} is no decoder of --env-id {args.env_id} "
                 f"--decoder-hidden {args.decoder_hidden}")
        decoder.load_state_dict(saved["decoder"])
    return decoder



def refine_decoder(sample_z, decoder, args, backend, device, writer, loop):
    """Phase 2 of Algorithm 1 (Eq. 4): the stage's encoder (`sample_z`: raw obs -> sampled z) runs `--refine-episodes`
    episodes through the stage's decoder on envs of their own, and a new decoder is fit on them from the fixed prior.
    These env steps are not in global_step; `loop` counts them and the refits' time. Returns the new decoder."""
    start = time.time()
    seed = args.seed + REFINE_SEED_OFFSET + loop["stage"]
    fit = f"{args.decoder_steps} Adam steps" if args.decoder_steps else f"{args.decoder_epochs} epochs"
    print(f"stage {loop['stage']} refit: {args.refine_episodes} episodes on {args.refine_num_envs} envs, then a new decoder "
          f"fit for {fit}", flush=True)
    data, returns, steps = collect_refinement_data(sample_z, decoder, args.env_id, backend, args.refine_num_envs,
                                                   args.refine_episodes, seed, device)
    loop["refine_steps"] += steps
    decoder, train_loss, val_loss = fit_decoder(data, args, device)
    log_scalars(writer, {"gorl/refine_return": returns.mean(), "gorl/refine_steps": loop["refine_steps"],
                         "decoder/train_loss": train_loss, "decoder/val_loss": val_loss}, loop["global_step"])
    print(f"stage {loop['stage']} refit: {len(data[0])} steps of {len(returns)} episodes (return {returns.mean():.1f}), "
          f"decoder loss train {train_loss:.4f} val {val_loss:.4f}")
    loop["refit_time"] += time.time() - start
    return decoder


def refit_seconds(args, obs_dim, action_dim, seconds_per_env_step, episode_steps):
    """What a refit takes before one has run (for the ETA): its env steps at the training rollout's pace, and its Adam
    steps at the fastest of 5 steps of a throwaway decoder on random data, after one to warm up (a busy machine's slow
    steps are not the rule), on the CPU's own forked RNG (the run's draws stay what they were)."""
    with torch.random.fork_rng(devices=[]):
        decoder = Decoder(obs_dim, action_dim, args.decoder_hidden)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr)
        rows = args.decoder_batch_size * SAMPLES_PER_ACTION
        batch = [torch.randn(rows, obs_dim), torch.randn(rows, action_dim), torch.randn(rows, action_dim), torch.rand(rows, 1)]
        times = []
        for _ in range(6):
            start = time.time()
            loss = decoder.loss(*batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.time() - start)
        seconds_per_adam_step = min(times[1:])
    data_steps = args.refine_episodes * episode_steps
    adam_steps = args.decoder_steps or args.decoder_epochs * math.ceil(0.9 * data_steps / args.decoder_batch_size)
    return data_steps * seconds_per_env_step + adam_steps * seconds_per_adam_step


def eval_after_refit(policy, args, backend, device, writer, loop):
    """The new decoder with the restarted encoder, before any update: what the refit alone keeps of the stage's return."""
    refit_return = evaluate(policy, args.env_id, backend, args.num_eval_envs, args.seed + EVAL_SEED_OFFSET, device)[0]
    writer.add_scalar("gorl/eval_after_refit", refit_return, loop["global_step"])
    print(f"stage {loop['stage']} starts: eval before the refit {loop['eval_return']:.1f}, after {refit_return:.1f}")
    return refit_return


def main(args):
    checkpoint, backend, device, writer, run_name = setup(args, load_policy)
    steps_per_iteration = args.batch_size * args.num_minibatches * args.unroll_length
    stage_ends = stage_iterations(args, steps_per_iteration)
    num_iterations = stage_ends[-1]
    evaluations = release_evaluations(stage_ends, args.evals_per_stage)  # empty: every --eval-every steps
    checkpoint_every = args.checkpoint_every or max(args.total_timesteps // 10, 1)
    print(f"{run_name}: backend {backend}, device {device}, {num_iterations} iterations of {steps_per_iteration} steps "
          f"({num_iterations * steps_per_iteration} of --total-timesteps {args.total_timesteps}: whole iterations)")
    # Per-step inference on a few envs is fastest on one thread; the updates' minibatches are 1.5-1.9x faster on two cores.
    rollout_threads = args.threads or 1
    update_threads = args.threads or torch.get_num_threads()

    envs = VecEnv(args.env_id, backend, args.num_envs, args.seed)
    next_obs = envs.reset()
    obs_dim = next_obs.shape[1]
    action_dim = envs.action_dim
    obs_rms = RunningMeanStd(obs_dim).to(device)
    settings = stage_settings(args, 0)
    agent = reset_encoder(Agent(obs_dim, action_dim).to(device), settings.encoder_reset, obs_dim, action_dim)
    optimizer = torch.optim.Adam(agent.parameters(), lr=settings.learning_rate, eps=1e-8)
    # Stage 0 decodes with the identity (a fresh decoder), or with a saved one (frozen-decoder study, Sec. 4.3.3).
    decoder = first_decoder(args, obs_dim, action_dim, device)
    best = {"return": -float("inf"), "agent": copy.deepcopy(agent), "obs_rms": copy.deepcopy(obs_rms)}

    # Rollout storage: U unrolls of T steps on N envs; obs has T + 1 entries so each segment carries its bootstrap obs.
    # `masks` is 0 where a step's next observation is not its successor (a truncation, EnvPool's reset step).
    U = args.batch_size * args.num_minibatches // args.num_envs
    T = args.unroll_length
    N = args.num_envs
    obs = torch.zeros((U, T + 1, N, obs_dim), device=device)
    latents = torch.zeros((U, T, N, action_dim), device=device)
    logprobs = torch.zeros((U, T, N), device=device)
    rewards = np.zeros((U, T, N), np.float32)
    terminations = np.zeros((U, T, N), np.float32)
    masks = np.zeros((U, T, N), np.float32)

    modules = {"agent": agent, "optimizer": optimizer, "obs_rms": obs_rms, "decoder": decoder,
               "best_agent": best["agent"], "best_obs_rms": best["obs_rms"]}
    loop = {"iteration": 0, "global_step": 0, "train_time": 0.0, "eval_time": 0.0, "refit_time": 0.0, "eval_step": 0,
            "eval_return": float("nan"), "train_return": float("nan"), "stage": 0, "refine_steps": 0}
    if checkpoint is None:
        mean = eval_and_log(eval_policy(agent, obs_rms, decoder), 0, args, backend, device, writer, run_name, loop)
        remember_best(best, mean, agent, obs_rms)
    else:
        loop.update(restore(checkpoint, modules))  # an older checkpoint may lack a counter: it starts at its default
        best["return"] = loop["best_return"]
    global_step = loop["global_step"]
    first_iteration = loop["iteration"] + 1  # of this process: the one whose pace warns of a run of days
    for iteration in range(first_iteration, num_iterations + 1):
        iteration_start = time.time()
        torch.set_num_threads(rollout_threads)
        settings = stage_settings(args, loop["stage"])
        for unroll in range(U):
            for t in range(T):
                obs[unroll, t] = torch.as_tensor(next_obs, device=device)
                with torch.no_grad():  # Phase 1: PPO's action is the latent z; the frozen decoder is part of the environment
                    sample = agent.act(obs_rms(obs[unroll, t]))
                    env_action = torch.tanh(decoder(obs[unroll, t], sample.action))
                latents[unroll, t] = sample.action
                logprobs[unroll, t] = sample.log_prob
                next_obs, reward, terminated, truncated, valid, ended = envs.step(env_action.cpu().numpy())
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
            loop["refit_estimate"] = refit_seconds(args, obs_dim, action_dim, rollout_time / steps_per_iteration,
                                                   envs.max_episode_steps)

        if settings.obs_stats_timing == "legacy_pre_update":  # upstream FPO: the batch is merged before the update on it
            obs_rms.update(obs[:, :T], settings.obs_stats_accumulation == "cumulative")
        # Segments, observations normalized with the statistics that acted on them (with legacy_pre_update, statistics
        # that include them, while the stored log-probs came from the old ones).
        segments = {"obs": to_segments(obs_rms(obs), device), "actions": to_segments(latents, device),
                    "logprobs": to_segments(logprobs, device), "rewards": to_segments(rewards, device),
                    "terminations": to_segments(terminations, device), "masks": to_segments(masks, device)}

        torch.set_num_threads(update_threads)  # also for the evaluation that follows
        stats = ppo_update(agent, optimizer, segments, settings)
        # The normalizer merges the new batch only after the update on it ("rollout-consistent", as the GoRL release's fix).
        if settings.obs_stats_timing == "rollout_consistent":
            obs_rms.update(obs[:, :T], settings.obs_stats_accumulation == "cumulative")

        log_scalars(writer, finite_means(stats, lambda i: f"at iteration {iteration} (epoch {i // args.num_minibatches + 1}, "
                                                          f"minibatch {i % args.num_minibatches + 1})"), global_step)
        loop["train_time"] += time.time() - iteration_start
        sps = int(global_step / loop["train_time"])
        log_scalars(writer, {"charts/SPS": sps, "perf/rollout_SPS": int(steps_per_iteration / rollout_time)}, global_step)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        log_scalars(writer, {"gorl/stage": loop["stage"], "gorl/beta": settings.beta, "charts/clip_coef": settings.clip_coef,
                             "charts/ent_coef": settings.ent_coef, "charts/max_grad_norm": settings.max_grad_norm},
                    global_step)
        due = iteration in evaluations if args.evals_per_stage else crossed(global_step, steps_per_iteration, args.eval_every)
        stage_end = iteration >= stage_ends[loop["stage"]]  # `>=`: a resumed run given more steps moves the stage ends
        if due or stage_end:  # GoRL also evaluates at every stage end
            policy = eval_policy(agent, obs_rms, decoder)
            mean = eval_and_log(policy, global_step, args, backend, device, writer, run_name, loop)
            remember_best(best, mean, agent, obs_rms)
        print(f"iter {iteration}/{num_iterations} global_step={global_step} SPS={sps} train_return={loop['train_return']:.1f} "
              f"eval_return={loop['eval_return']:.1f} (at step {loop['eval_step']}) "
              f"{eta(loop, iteration, num_iterations, len(stage_ends) - 1 - loop['stage'])}")
        loop.update(iteration=iteration, global_step=global_step, obs_dim=obs_dim, action_dim=action_dim)
        if stage_end and loop["stage"] < len(stage_ends) - 1:
            # Phase 2, decoder refinement: the stage's last (or best) encoder collects the data, a new decoder is fit.
            encoder = best if settings.refine_from == "best" else {"agent": agent, "obs_rms": obs_rms}
            writer.add_scalar("gorl/refine_encoder_eval", encoder.get("return", loop["eval_return"]), global_step)
            decoder = refine_decoder(lambda x: encoder["agent"].act(encoder["obs_rms"](x)).action, decoder, args, backend,
                                     device, writer, loop)
            # Stage-wise re-initialization: the next stage's encoder restarts against the new decoder.
            loop["stage"] += 1
            agent, obs_rms, optimizer = restart_encoder(agent, obs_rms, optimizer, best, stage_settings(args, loop["stage"]))
            modules.update(agent=agent, optimizer=optimizer, obs_rms=obs_rms, decoder=decoder)
            refit_return = eval_after_refit(eval_policy(agent, obs_rms, decoder), args, backend, device, writer, loop)
            if args.evals_per_stage:  # the release also evaluates a stage's start: its encoder is a candidate for best
                remember_best(best, refit_return, agent, obs_rms)
        loop["best_return"] = best["return"]
        if crossed(global_step, steps_per_iteration, checkpoint_every) or stage_end:
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
