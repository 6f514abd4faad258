"""GoRL with a SAC encoder and a diffusion decoder (paper App. F.2, Algorithm 1), CleanRL style.

sac_gaussian.py where SAC acts in latent space: the actor samples z ~ pi(z|s), the critics learn Q(s, z), and the
environment receives tanh(g(s, z)). Training runs in stages (`--stage-weights`); each stage is Algorithm 1's two
phases and a re-initialization:
  Phase 1, latent policy optimization: SAC on z with g frozen as part of the environment, plus the penalty
    `--beta` * `kl_to_prior`, KL(pi(z|s) || N(0, I)) in the actor loss (Eq. 3). Stage 0's g is the identity.
  Phase 2, decoder refinement: `collect_refinement_data` runs fresh episodes of the stage's actor through g (not the
    replay buffer), and `fit_decoder` trains a new diffusion g from the fixed prior N(0, I) (Eq. 4).
  Stage-wise re-initialization: actor, critics and replay buffer restart (`make_sac`), the actor at the prior
    (`actor_at_prior`), since a z stored under the old decoder means another action.
The code above the `# ---- plumbing` line is the whole algorithm; below it, the same plumbing in every script.
`diff sac_gaussian.py gorl_sac_diff.py` shows what GoRL adds to SAC.

    python gorl_sac_diff.py --env-id Hopper-v5    # the paper's setting; the README has CPU-sized commands
"""
import copy
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
import types
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

    env_id: str = "Hopper-v5"
    """DMC task in the paper's CamelCase (`HopperStand`, `CheetahRun`, ...) or a Gymnasium id (`Hopper-v5`)"""
    env_backend: Literal["auto", "envpool", "dm_control"] = "auto"
    """`envpool` (C++ thread pool), `dm_control` (Python envs; DMC through shimmy), or `auto`: envpool when it has the task"""
    total_timesteps: int = 4_000_000
    """total environment steps of training (evaluation steps are not counted)"""
    num_envs: int = 1
    """the number of parallel training environments"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient: target <- tau * online + (1 - tau) * target after every update"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_starts: int = 5_000
    """env steps of uniformly random actions before learning starts"""
    policy_lr: float = 3e-4
    """the learning rate of the policy network optimizer"""
    q_lr: float = 1e-3
    """the learning rate of the Q network optimizer (and of the entropy coefficient)"""
    utd_ratio: float = 20
    """update-to-data ratio: critic gradient steps per environment step (paper Table 5: 20; below 1 on a CPU budget)"""
    policy_frequency: int = 2
    """the actor (and alpha) is updated this many times every this many critic updates (delayed, as TD3 and CleanRL)"""
    alpha: float = 0.2
    """entropy regularization coefficient, when not --autotune"""
    autotune: bool = True
    """automatic tuning of the entropy coefficient (starting at 1, target entropy -action_dim)"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the update (on CUDA as CUDA graphs): `auto` on CUDA only, where kernel launches dominate an update;
    on the CPU its 256-wide matmuls do, and compiling costs a minute for nothing (docs/performance.md)"""
    eval_every: int = 100_000
    """evaluate every this many environment steps (and at the start and the end)"""
    num_eval_envs: int = 10
    """the number of evaluation episodes, one per fresh environment"""

    stage_weights: Tuple[float, ...] = (2, 1, 1)
    """relative env-step budgets of the stages: 2 1 1 of 4M gives 2M/1M/1M (paper App. F.2); a decoder refit between"""
    beta: float = 1e-3
    """coefficient of the KL-to-prior penalty in the actor loss (paper Eq. 3)"""
    refine_episodes: int = 100
    """full episodes collected by the stage's actor to refit the decoder (not counted in global_step)"""
    refine_num_envs: int = 10
    """the number of parallel environments collecting the refinement episodes"""
    refine_input: Literal["prior", "latent"] = "prior"
    """decoder inputs during the refit: fresh N(0, I) noise (the paper) or the encoder's z (ablation Sec. 4.3.1)"""
    decoder_epochs: int = 50
    """passes over the refinement training split per refit (paper v1); ignored when --decoder-steps is set"""
    decoder_steps: int = 0
    """if positive, Adam steps per refit on minibatches drawn with replacement instead of epochs (the release: 50000)"""
    target_clip: float = 3.0
    """refit targets (pre-tanh actions) are clipped to +-this; 0 turns clipping off"""
    decoder_batch_size: int = 1024
    """actions per decoder minibatch (each with 8 noise samples)"""
    decoder_lr: float = 3e-4
    """the learning rate of the decoder's Adam optimizer"""
    decoder_hidden: int = 64
    """the width of the decoder's 4 hidden layers"""
    refit_validation: Literal["epochs", "steps"] = "epochs"
    """`epochs`: validate the refit every epoch on the first 65,536 held-out actions (obs std unbiased, >= 1e-6); `steps`
    (the release): at step 0, 1 and every 100, on 8 fixed batches of 8,192 drawn with replacement (std + 1e-8)"""
    refit_checkpoint_by: Literal["loss", "action-error"] = "loss"
    """keep the refit's decoder with the lowest validation loss, or (`action-error`, the release's FM refits on FingerSpin
    and FishSwim) the lowest error of 4,096 held-out actions decoded from fixed N(0, I) latents"""
    chain_loss_weight: float = 0.0
    """add this times the error of the whole decode of the encoder's own z against its action to the refit's training
    and validation losses (the release's diffusion refits: 1e-3)"""

    def __post_init__(self):  # impossible settings end the run with one line (check_args, in the plumbing)
        check_args(self, positive="""total_timesteps num_envs buffer_size batch_size policy_lr q_lr utd_ratio
                   policy_frequency eval_every num_eval_envs""", non_negative="threads learning_starts alpha checkpoint_every",
                   unit="gamma tau")
        if self.total_timesteps < self.num_envs or self.total_timesteps <= self.learning_starts:
            fail(f"--total-timesteps {self.total_timesteps} leaves no learning: it must exceed --learning-starts "
                 f"({self.learning_starts}) and be at least --num-envs ({self.num_envs}): "
                 f"--total-timesteps {max(self.learning_starts + 1, self.num_envs)} is the smallest that works")
        check_args(self, positive="""stage_weights refine_episodes refine_num_envs decoder_epochs decoder_batch_size
                   decoder_lr decoder_hidden""", non_negative="beta decoder_steps target_clip chain_loss_weight")  # GoRL's own
        if not self.stage_weights or len(self.stage_weights) > 1 and self.refine_episodes < max(2, self.refine_num_envs):
            fail(f"--stage-weights takes values, --refine-episodes at least 2 and --refine-num-envs ({self.refine_num_envs})")
        if int(self.total_timesteps * min(self.stage_weights) / sum(self.stage_weights)) <= self.learning_starts:
            smallest = int((self.learning_starts + 1) * sum(self.stage_weights) / min(self.stage_weights)) - 2
            while int(smallest * min(self.stage_weights) / sum(self.stage_weights)) <= self.learning_starts:  # as main splits
                smallest += 1
            fail(f"each stage of --total-timesteps {self.total_timesteps} needs more than --learning-starts "
                 f"({self.learning_starts}) steps: --total-timesteps {smallest} is the smallest that works")


def presets(env_id):
    """The named settings: `python gorl_sac_diff.py [paper|cpu] --env-id HalfCheetah-v5` (any flag overrides them).
    paper: Args' defaults, the paper's GoRL-SAC (App. F.2): 4M steps in stages of 2M/1M/1M, 20 updates per env step.
    cpu: a budget two CPU cores run in under an hour: 400k steps in the same 2:1:1 stages on 8 envs with a quarter update
      per env step, 5,000 random steps first in each stage, 40 evaluations of 10 episodes, and refits on 32 episodes
      fit for 200 epochs."""
    paper = Args(env_id=env_id)
    cpu = replace(paper, total_timesteps=400_000, num_envs=8, utd_ratio=0.25, eval_every=10_000, refine_episodes=32,
                  refine_num_envs=16, decoder_epochs=200)
    return {"paper": paper, "cpu": cpu}


# ---- the algorithm: the networks, the observation normalizer and the losses ----
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


def kl_to_prior(dist):
    """The penalty of paper Eq. 3 that keeps the latents where the decoder was trained, per sample:
    KL(N(mu, sigma^2) || N(0, I)) = 0.5 sum_d (mu^2 + sigma^2 - 1 - 2 log sigma)."""
    return 0.5 * (dist.mean**2 + dist.scale**2 - 1 - 2 * dist.scale.log()).sum(-1)


class SoftQNetwork(nn.Module):
    """SAC's two critics Q1, Q2 as one batched network: two 256x256 SiLU MLPs, initialized as two separate ones, whose
    layers' weights are stacked, so each layer is one batched matmul for both (LeanRL's batched critics). Q(s, u) on the
    normalized observation and tanh(u): the critics squash the actor's u themselves, SAC's Q(s, a = tanh(u)), and in
    GoRL a latent critic Q(s, z) with a bounded input (a plain Q(s, z) extrapolates linearly in |z|, and its actor
    chased z to 1e7 within 3k updates). Returns [2, batch]: Q1 and Q2."""

    def __init__(self, obs_dim, action_dim):
        super().__init__()
        nets = [mlp([obs_dim + action_dim, 256, 256, 1]) for _ in range(2)]
        self.weights = nn.ParameterList(nn.Parameter(torch.stack([net[i].weight.T for net in nets])) for i in (0, 2, 4))
        self.biases = nn.ParameterList(nn.Parameter(torch.stack([net[i].bias[None] for net in nets])) for i in (0, 2, 4))

    def forward(self, x, u):
        h = torch.cat([x, torch.tanh(u)], -1).expand(2, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w) if i == 2 else F.silu(torch.baddbmm(b, h, w))
        return h.squeeze(-1)


LOG_STD_MAX = 2
LOG_STD_MIN = -5


class Sample(NamedTuple):
    """What `get_action` returns: the reparameterized u, the log-probability of tanh(u), and the Gaussian's mean."""

    action: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor


class Actor(nn.Module):
    """A Gaussian over u with log-std squashed into [LOG_STD_MIN, LOG_STD_MAX] (CleanRL), 256x256 SiLU MLP."""

    def __init__(self, obs_dim, action_dim):
        super().__init__()
        self.net = mlp([obs_dim, 256, 256, 2 * action_dim])

    def get_dist(self, x):
        mean, log_std = self.net(x).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return Normal(mean, log_std.exp(), validate_args=False)  # no per-step checks (and syncs)

    def get_action(self, x):
        """A Sample: u reparameterized, the log-prob of tanh(u), deterministic u = mean. The entropy SAC regularizes is
        that of tanh(u), so saturating is penalized (in GoRL too, where u is the latent z fed to the decoder)."""
        dist = self.get_dist(x)
        u = dist.rsample()
        log_prob = (dist.log_prob(u) - torch.log(1 - torch.tanh(u).pow(2) + 1e-6)).sum(-1)  # change of variables through tanh
        return Sample(action=u, log_prob=log_prob, mean=dist.mean)


def eval_policy(actor, obs_rms, decoder):
    """The deterministic policy that evaluation runs: raw observation -> the actor's mean latent, decoded, tanh."""
    return lambda x: torch.tanh(decoder(x, actor.get_action(obs_rms(x)).mean))


def load_policy(checkpoint, device):
    """The evaluation policy of a saved model (--eval-checkpoint)."""
    obs_dim = checkpoint["loop"]["obs_dim"]
    action_dim = checkpoint["loop"]["action_dim"]
    obs_rms = RunningMeanStd(obs_dim).to(device)
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    actor = Actor(obs_dim, action_dim).to(device)
    actor.load_state_dict(checkpoint["actor"])
    decoder = Decoder(obs_dim, action_dim, checkpoint["args"]["decoder_hidden"]).to(device)
    decoder.load_state_dict(checkpoint["decoder"])
    return eval_policy(actor, obs_rms, decoder)


def actor_at_prior(actor):
    """Sets the actor's latent policy to exactly N(0, I) for any observation, as the PPO scripts' `prior` reset (paper
    Sec. 3): last layer zero, mean bias 0, and the log-std bias at atanh(3/7), where the squashed log-std is 0."""
    action_dim = actor.net[-1].out_features // 2
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias[:action_dim] = 0.0
        actor.net[-1].bias[action_dim:] = float(np.arctanh(2 * (0 - LOG_STD_MIN) / (LOG_STD_MAX - LOG_STD_MIN) - 1))
    return actor


def make_sac(obs_dim, action_dim, args, device):
    """A fresh actor, the two critics and their targets, their optimizers and the entropy coefficient."""
    actor = Actor(obs_dim, action_dim).to(device)
    qf = SoftQNetwork(obs_dim, action_dim).to(device)
    log_alpha = torch.tensor(0.0 if args.autotune else float(np.log(max(args.alpha, 1e-30))), device=device,
                             requires_grad=args.autotune)
    # Fused Adam: one kernel per step where the device has it (CPU and CUDA), else one foreach kernel per operation
    adam = {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}
    return types.SimpleNamespace(
        actor=actor, qf=qf, qf_target=copy.deepcopy(qf), log_alpha=log_alpha, target_entropy=-float(action_dim),
        q_optimizer=torch.optim.Adam(qf.parameters(), lr=args.q_lr, **adam),
        actor_optimizer=torch.optim.Adam(actor.parameters(), lr=args.policy_lr, **adam),
        a_optimizer=torch.optim.Adam([log_alpha], lr=args.q_lr, **adam))


class ReplayBuffer:
    """Transitions as rows [obs, action, reward, next obs, done] of one preallocated device tensor, the oldest
    overwritten first: one upload per add, one gather per sample. Observations are stored raw and normalized when
    sampled, with the current statistics."""

    def __init__(self, size, obs_dim, action_dim, device):
        self.data = torch.zeros((size, 2 * obs_dim + action_dim + 2), device=device)
        self.fields = [obs_dim, action_dim, 1, obs_dim, 1]
        self.pos = 0
        self.size = 0

    def add(self, obs, actions, rewards, next_obs, dones):
        """Adds transitions given as numpy arrays, in one upload; returns their rows. `next_obs` must be the observation
        each episode ended in (VecEnv.final_obs), and done = terminated: a time limit is not a terminal state, so its
        target still bootstraps from that final observation."""
        rows = np.concatenate([obs, actions, rewards[:, None], next_obs, dones[:, None]], 1, dtype=np.float32)
        rows = torch.as_tensor(rows, device=self.data.device)
        self.data[(self.pos + torch.arange(len(rows), device=rows.device)) % len(self.data)] = rows
        self.pos = (self.pos + len(rows)) % len(self.data)
        self.size = min(self.size + len(rows), len(self.data))
        return rows

    def sample(self, batch_size):
        batch = self.data[torch.randint(self.size, (batch_size,), device=self.data.device)]
        obs, actions, rewards, next_obs, dones = batch.split(self.fields, 1)
        return obs, actions, rewards[:, 0], next_obs, dones[:, 0]

    def state_dict(self):
        """The filled rows only, copied out of the storage (a full buffer of 1M Hopper transitions is about 110 MB)."""
        return {"pos": self.pos, "size": self.size, "data": self.data[: self.size].clone()}

    def load_state_dict(self, state):
        self.data[: state["size"]] = state["data"]
        self.pos = state["pos"] if state["size"] == len(self.data) else state["size"]  # a longer resumed run: a larger buffer
        self.size = state["size"]


def sac_update(sac, obs, actions, rewards, next_obs, dones, args, actor):
    """One step on a batch (normalized observations): a critic step and the target update, or with `actor` an actor
    step and an alpha step (the loop makes `policy_frequency` of those every `policy_frequency` critic steps, delayed as
    TD3 and CleanRL). No loop and no host sync inside, so --compile compiles each kind of step whole. Returns its losses."""
    if not actor:
        with torch.no_grad():
            next_sample = sac.actor.get_action(next_obs)
            min_qf_next = (sac.qf_target(next_obs, next_sample.action).min(0).values
                           - sac.log_alpha.exp() * next_sample.log_prob)
            next_q_value = rewards + (1 - dones) * args.gamma * min_qf_next  # done = terminated: a time limit bootstraps
        qf_a_values = sac.qf(obs, actions)  # [2, batch]
        qf_loss = ((qf_a_values - next_q_value) ** 2).mean(1)  # each critic's MSE
        sac.q_optimizer.zero_grad()
        qf_loss.sum().backward()
        sac.q_optimizer.step()
        with torch.no_grad():  # Polyak averaging, target <- tau * online + (1 - tau) * target, in one kernel
            torch._foreach_lerp_(list(sac.qf_target.parameters()), list(sac.qf.parameters()), args.tau)
        stats = {"losses/qf1_values": qf_a_values[0].mean(), "losses/qf2_values": qf_a_values[1].mean(),
                 "losses/qf1_loss": qf_loss[0], "losses/qf2_loss": qf_loss[1], "losses/qf_loss": qf_loss.mean()}
        return {name: value.detach() for name, value in stats.items()}
    sample = sac.actor.get_action(obs)
    alpha = sac.log_alpha.exp().detach()
    latent_kl = kl_to_prior(sac.actor.get_dist(obs)).mean()
    actor_loss = (alpha * sample.log_prob - sac.qf(obs, sample.action).min(0).values).mean() + args.beta * latent_kl
    sac.actor_optimizer.zero_grad()
    actor_loss.backward()
    sac.actor_optimizer.step()
    # alpha rises when the policy's entropy -log_prob is below the target, and falls when above it
    alpha_loss = (-sac.log_alpha.exp() * (sample.log_prob.detach() + sac.target_entropy)).mean()
    if args.autotune:
        sac.a_optimizer.zero_grad()
        alpha_loss.backward()
        sac.a_optimizer.step()
    stats = {"losses/actor_loss": actor_loss, "losses/alpha": alpha, "losses/alpha_loss": alpha_loss,
             "losses/entropy": -sample.log_prob.mean()}
    stats["gorl/latent_kl"] = latent_kl
    return {name: value.detach() for name, value in stats.items()}


def compile_update(update, device):
    """--compile: `update` through torch.compile (on CUDA captured as CUDA graphs, mode="reduce-overhead"), saying how
    long its first calls took to compile; where torch.compile cannot build code (a probe on a tiny function), one line,
    and `update` runs as it is."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2, device=device))
    except Exception as e:  # no C++ compiler, an unsupported platform: compilation errors have no common type
        print(f"note: --compile: torch.compile does not work here ({type(e).__name__}); the update runs eagerly")
        return update
    compiled = torch.compile(update, mode="reduce-overhead" if device.type == "cuda" else None)
    calls = []

    def timed(*args):  # its first two calls, a critic step and an actor step, compile
        start = time.time()
        out = compiled(*args)
        if len(calls) < 2:
            calls.append(time.time() - start)
            if len(calls) == 2:
                print(f"compiled the update in {sum(calls):.0f} s (once; --compile off runs it eagerly)")
        return out

    return timed


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


def eval_after_refit(policy, args, backend, device, writer, loop):
    """The new decoder with the restarted encoder, before any update: what the refit alone keeps of the stage's return."""
    refit_return = evaluate(policy, args.env_id, backend, args.num_eval_envs, args.seed + EVAL_SEED_OFFSET, device)[0]
    writer.add_scalar("gorl/eval_after_refit", refit_return, loop["global_step"])
    print(f"stage {loop['stage']} starts: eval before the refit {loop['eval_return']:.1f}, after {refit_return:.1f}")
    return refit_return


def main(args):
    checkpoint, backend, device, writer, run_name = setup(args, load_policy)
    N = args.num_envs
    stage_steps = [int(args.total_timesteps * w / sum(args.stage_weights)) // N * N for w in args.stage_weights]
    stage_ends = list(np.cumsum(stage_steps) // N)  # the last step of each stage
    num_steps = sum(stage_steps) // N
    checkpoint_every = args.checkpoint_every or max(args.total_timesteps // 10, 1)
    print(f"{run_name}: backend {backend}, device {device}, {num_steps} steps of {args.num_envs} envs, "
          f"{args.utd_ratio * args.num_envs:g} updates per step ({num_steps * N} of --total-timesteps {args.total_timesteps})")
    torch.set_num_threads(args.threads or torch.get_num_threads())  # the updates dominate; one env step between them

    envs = VecEnv(args.env_id, backend, args.num_envs, args.seed)
    next_obs = envs.reset()
    obs_dim = next_obs.shape[1]
    action_dim = envs.action_dim
    obs_rms = RunningMeanStd(obs_dim).to(device)
    sac = make_sac(obs_dim, action_dim, args, device)
    compiled = args.compile == "on" or args.compile == "auto" and device.type == "cuda"
    update = compile_update(sac_update, device) if compiled else sac_update
    # Stage 0 decodes with the identity (a fresh decoder); no RL gradient ever reaches a decoder.
    decoder = Decoder(obs_dim, action_dim, args.decoder_hidden).to(device).requires_grad_(False)

    buffer_size = min(args.buffer_size, args.total_timesteps)
    rb = ReplayBuffer(buffer_size, obs_dim, action_dim, device)

    def run_modules():
        """The networks, optimizers, normalizer and replay buffer a checkpoint holds (SAC's log-alpha is in `loop`)."""
        return {"actor": sac.actor, "qf": sac.qf, "qf_target": sac.qf_target, "q_optimizer": sac.q_optimizer,
                "actor_optimizer": sac.actor_optimizer, "a_optimizer": sac.a_optimizer,
                "obs_rms": obs_rms, "rb": rb, "decoder": decoder}

    loop = {"step": 0, "global_step": 0, "updates": 0, "train_time": 0.0, "eval_time": 0.0, "eval_return": float("nan"),
            "eval_step": 0, "train_return": float("nan"), "next_eval": args.eval_every, "next_checkpoint": checkpoint_every,
            "obs_dim": obs_dim, "action_dim": action_dim, "stage": 0, "stage_start": 0, "refine_steps": 0, "refit_time": 0.0}
    if checkpoint is None:
        eval_and_log(eval_policy(sac.actor, obs_rms, decoder), 0, args, backend, device, writer, run_name, loop)
    else:
        loop.update(restore(checkpoint, run_modules()))  # an older checkpoint may lack a counter: it starts at its default
        with torch.no_grad():
            sac.log_alpha.copy_(loop["log_alpha"])
    global_step = loop["global_step"]
    q_stats = []
    pi_stats = []
    step_start = time.time()
    for step in range(loop["step"] + 1, num_steps + 1):
        obs_host = next_obs
        obs = torch.as_tensor(obs_host, device=device)
        if global_step - loop["stage_start"] < args.learning_starts:  # every stage starts with an empty buffer
            action = torch.randn((N, action_dim), device=device)  # random latents: the prior N(0, I)
        else:
            with torch.no_grad():
                action = sac.actor.get_action(obs_rms(obs)).action
        with torch.no_grad():  # Phase 1: SAC's action is the latent z; the frozen decoder is part of the environment
            env_action = torch.tanh(decoder(obs, action))
        action, env_action = torch.stack([action, env_action]).cpu().numpy()  # the step's one copy to the host
        next_obs, reward, terminated, truncated, valid, ended = envs.step(env_action)
        global_step += N
        loop["train_return"] = log_episodes(writer, ended, global_step, loop["train_return"])

        if valid.any():  # EnvPool's reset steps are not stored
            rows = rb.add(obs_host[valid], action[valid], reward[valid], envs.final_obs[valid], terminated[valid])
            obs_rms.update(rows[:, :obs_dim])

        if global_step - loop["stage_start"] >= args.learning_starts:
            # utd_ratio * N updates on average (a fractional ratio rounds per step)
            num_updates = int(global_step * args.utd_ratio) - int((global_step - N) * args.utd_ratio)
            for _ in range(num_updates):
                b_obs, b_actions, b_rewards, b_next_obs, b_dones = rb.sample(args.batch_size)
                batch = (obs_rms(b_obs), b_actions, b_rewards, obs_rms(b_next_obs), b_dones)
                q_stats.append(update(sac, *batch, args, False))
                if loop["updates"] % args.policy_frequency == 0:  # the delayed actor steps
                    pi_stats += [update(sac, *batch, args, True) for _ in range(args.policy_frequency)]
                loop["updates"] += 1

        loop.update(step=step, global_step=global_step)
        stage_end = step >= stage_ends[loop["stage"]]  # `>=`: a resumed run given more steps moves the stage ends
        log_point = crossed(global_step, N, 1000) or stage_end  # log every 1000 env steps
        if log_point:
            if args.learning_starts + 1000 <= global_step < args.learning_starts + 2000:  # a run of days says so now
                warn_if_long(args, (time.time() - step_start) / 1000)
            loop["train_time"] += time.time() - step_start
            sps = int(global_step / loop["train_time"])
            for stats in (q_stats, pi_stats):
                if stats:
                    where = f"in the {len(q_stats)} updates before global_step {global_step}"
                    log_scalars(writer, finite_means(stats, lambda i: where), global_step)
            q_stats = []
            pi_stats = []
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("gorl/stage", loop["stage"], global_step)
            if global_step >= loop["next_eval"] or stage_end:  # GoRL also evaluates at every stage end
                policy = eval_policy(sac.actor, obs_rms, decoder)
                eval_and_log(policy, global_step, args, backend, device, writer, run_name, loop)
                loop["next_eval"] = (global_step // args.eval_every + 1) * args.eval_every
                print(f"global_step={global_step} SPS={sps} updates={loop['updates']} train_return={loop['train_return']:.1f} "
                      f"eval_return={loop['eval_return']:.1f} (at step {loop['eval_step']}) "
                      f"{eta(loop, step, num_steps, len(stage_ends) - 1 - loop['stage'])}")
            step_start = time.time()
        if stage_end and loop["stage"] < len(stage_ends) - 1:
            # Phase 2, decoder refinement (App. F.2, Eq. 4): fresh rollouts of the stage's actor through the stage's
            # decoder, not the replay buffer, fit a new decoder from the fixed prior. Refit steps are not in global_step.
            decoder = refine_decoder(lambda x: sac.actor.get_action(obs_rms(x)).action, decoder, args, backend, device,
                                     writer, loop)
            decoder.requires_grad_(False)
            # Stage-wise re-initialization: actor, critics and buffer restart, since a z stored under the old
            # decoder now means a different action.
            loop["stage"] += 1
            loop["stage_start"] = global_step
            sac = make_sac(obs_dim, action_dim, args, device)
            rb = ReplayBuffer(buffer_size, obs_dim, action_dim, device)
            actor_at_prior(sac.actor)  # the restarted latent policy is the prior, so z = 0 is its mean
            eval_after_refit(eval_policy(sac.actor, obs_rms, decoder), args, backend, device, writer, loop)
            step_start = time.time()  # the refit is not training time
        if log_point and (global_step >= loop["next_checkpoint"] or stage_end):
            loop["next_checkpoint"] = (global_step // checkpoint_every + 1) * checkpoint_every
            loop["log_alpha"] = sac.log_alpha.detach().clone()
            writer.flush()  # the logs up to the checkpoint are on disk before it: a resumed run purges only later ones
            save_checkpoint(args, backend, run_name, run_modules(), loop)
            step_start = time.time()  # writing the checkpoint is not training time

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
