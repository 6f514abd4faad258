"""GoRL with a PPO encoder and a diffusion decoder (paper Sec. 3, Algorithm 1, App. E), CleanRL style:
gorl_ppo_fm.py with only the decoder changed.

The policy is a latent Gaussian encoder z ~ pi(z|s) and a decoder g; the environment receives tanh(g(s, z)).
Training runs in stages (`--stage-weights`); each stage is Algorithm 1's two phases and a re-initialization:
  Phase 1, latent policy optimization: PPO on z with g frozen as part of the environment, plus the penalty
    `--beta` * `kl_to_prior`, KL(pi(z|s) || N(0, I)) (Eq. 3). Stage 0's g is the identity: PPO through tanh.
  Phase 2, decoder refinement: `collect_refinement_data` runs the stage's best encoder through g, and `fit_decoder`
    trains a new g from scratch, from the fixed prior N(0, I) to the collected actions (Eq. 4):
    epsilon-prediction diffusion; decoding is 10 DDIM steps from z.
  Stage-wise re-initialization: `reset_encoder` restarts the encoder at the prior N(0, I) (`--encoder-reset`).
The code between the `# ---- shared skeleton` and `# ---- GoRL ----` lines is the same in every script;
`diff ppo_gaussian.py gorl_ppo_diff.py` shows what GoRL adds to PPO.

    python gorl_ppo_diff.py --env-id HopperStand --beta 1e-3    # the paper's scale; the README has CPU-sized commands
"""
import copy
import difflib
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

# Idle OpenMP threads sleep after a short spin instead of the default long one, which makes two training processes on
# the same cores slow each other down about 10x (README: Performance). Set before PyTorch loads OpenMP.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
os.environ.setdefault("KMP_BLOCKTIME", "1")

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions import Normal
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
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
    """if toggled, render one episode per evaluation (env 0's seed) through dm_control, on either backend, to `videos/*.mp4`"""
    save_model: bool = False
    """if toggled, save the model (networks, normalizer, args) to `runs/{run_name}/{exp_name}.cleanrl_model`"""
    eval_checkpoint: Optional[str] = None
    """if set, load this saved model, run the deterministic evaluation on its task, print the return and exit"""
    checkpoint_every: Optional[int] = None
    """write `runs/{run_name}/checkpoint.pt` every this many env steps (default: a tenth of the run), at the end and after
    every refit"""
    resume: Optional[str] = None
    """if set, continue the run saved in this checkpoint, with its settings, RNGs, env states (dm_control backend) and
    log dir"""

    env_id: str = "HopperStand"
    """DMC task in the paper's CamelCase (`HopperStand`, `CheetahRun`, ...) or a Gymnasium id (`Hopper-v5`)"""
    env_backend: Literal["auto", "envpool", "dm_control"] = "auto"
    """`envpool` (C++ thread pool), `dm_control` (Python envs, via shimmy for DMC, in a Gymnasium vector env), or `auto`:
    envpool when it has the task"""
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
    learning_rate_later: Tuple[float, ...] = (3e-4, 1e-4)
    """the encoder's learning rate in stages 1, 2, ...: one value, or one per later stage (the last repeats)"""
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
    ent_coef_later: Tuple[float, ...] = ()
    """the entropy coefficient in stages 1, 2, ...: one value or one per later stage (the last repeats); none: --ent-coef"""
    tanh_entropy_correction: bool = False
    """add log(1 - tanh(u)^2) at one reparameterized sample u to the entropy bonus: the entropy of tanh(u), as upstream
    FPO's PPO (418c255, playground/src/flow_policy/ppo.py) that ran the paper's PPO row; the GoRL release has it off"""
    vf_coef: float = 0.25
    """coefficient of the value loss: vf_coef * mean(mask * (v_target - V)^2)"""
    max_grad_norm: float = 0.5
    """the maximum global norm for gradient clipping; 0 disables it"""
    max_grad_norm_later: Optional[float] = None
    """the gradient clipping norm in stages 1, 2, ...; default: --max-grad-norm"""
    reward_scale: float = 10.0
    """rewards are multiplied by this before GAE"""
    eval_every: int = 6_000_000
    """evaluate every this many environment steps (and at the start and the end)"""
    num_eval_envs: int = 128
    """the number of evaluation episodes, one per fresh environment"""
    obs_stats_accumulation: Tuple[Literal["cumulative", "legacy_batch_only"], ...] = ("cumulative",)
    """the normalizer's variance, one value or one per stage: `cumulative` (the release's fix) or `legacy_batch_only` (FPO)"""
    obs_stats_timing: Tuple[Literal["rollout_consistent", "legacy_pre_update"], ...] = ("rollout_consistent",)
    """one value or one per stage: merge a batch into the normalizer after (`rollout_consistent`) or before the update on it"""

    stage_weights: Tuple[float, ...] = (2, 2, 1, 1)
    """relative env-step budgets of the stages: 2 2 1 1 of 180M gives 60M/60M/30M/30M; one decoder refit between stages"""
    beta: Tuple[float, ...] = (1e-3,)
    """coefficient of the KL-to-prior penalty (paper Eq. 3): one value, or one per stage (the last repeats)"""
    kl_form: Literal["analytic", "release"] = "analytic"
    """the penalty: `analytic` KL(pi(z|s) || N(0, I)) (the paper) or `release`, mean mu^2 + mean sigma^2 (the released code)"""
    encoder_reset: Tuple[Literal["prior", "prior-best", "fresh", "warm", "none"], ...] = ("prior",)
    """the encoder at each stage start, one value or one per stage: `prior` (paper Sec. 3) or a release mode (reset_encoder)"""
    refine_episodes: int = 4096
    """full episodes collected by the stage's encoder to refit the decoder (not counted in global_step)"""
    refine_num_envs: int = 64
    """the number of parallel environments collecting the refinement episodes"""
    refine_from: Literal["best", "last"] = "best"
    """which encoder of the stage collects the refinement data: the best-evaluated one (the release) or the last"""
    refine_input: Literal["prior", "latent"] = "prior"
    """decoder inputs during the refit: fresh N(0, I) noise (the paper) or the encoder's z (ablation Sec. 4.3.1)"""
    decoder_epochs: int = 50
    """passes over the refinement training split per refit (paper v1); ignored when --decoder-steps is set"""
    decoder_steps: int = 0
    """if positive, Adam steps per refit on minibatches drawn with replacement instead of epochs (the release: 50000)"""
    target_clip: float = 3.0
    """refit targets (pre-tanh actions) are clipped to +-this; 0 turns clipping off"""
    decoder_batch_size: int = 8192
    """actions per decoder minibatch (each with 8 noise samples)"""
    decoder_lr: float = 3e-4
    """the learning rate of the decoder's Adam optimizer"""
    decoder_hidden: int = 64
    """the width of the decoder's 4 hidden layers"""
    decoder_checkpoint: Optional[str] = None
    """start stage 0 from the last decoder of a model saved by this script on the same task, instead of the identity"""


# ---- shared skeleton: identical in every script; skip on a first read ----
def fail(message):
    """Bad input ends the run with one line on stderr and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def dmc_task_ids():
    """The paper's CamelCase names built from dm_control's own task list: ('ball_in_cup', 'catch') -> 'BallInCupCatch'."""
    from dm_control import suite

    return {"".join(w.capitalize() for w in f"{d}_{t}".split("_")): (d, t) for d, t in suite.ALL_TASKS}


def resolve_backend(env_id, backend):
    """Checks the task exists and returns the backend that will run it (envpool when `auto` and it has the task)."""
    dmc = dmc_task_ids()
    if env_id not in dmc and env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(dmc) + list(gym.registry), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "use a DMC task (CheetahRun) or a Gymnasium id (Hopper-v5)"
        fail(f"unknown --env-id {env_id!r}; {hint}")
    try:
        import envpool  # noqa: F401
    except ImportError:
        envpool = None
    has_task = envpool is not None and VecEnv.envpool_id(env_id) is not None
    if backend == "envpool" and envpool is None:
        fail(f"--env-backend envpool: envpool is not installed ({envpool_hint()})")
    if backend == "envpool" and not has_task:
        fail(f"--env-backend envpool: envpool has no task {env_id!r}; use --env-backend dm_control")
    if backend == "auto":  # one line, so a slow dm_control run is never a silent surprise
        backend = "envpool" if has_task else "dm_control"
        why = (f"it has the task ({VecEnv.envpool_id(env_id)})" if has_task else
               f"envpool has no task {env_id!r}" if envpool is not None else f"envpool is not installed ({envpool_hint()})")
        print(f"backend auto -> {backend}: {why}")
    if backend == "dm_control" and env_id not in dmc and gym.spec(env_id).max_episode_steps is None:
        fail(f"--env-id {env_id!r} has no time limit (max_episode_steps) in Gymnasium, so its episodes may never end")
    if backend == "dm_control" and dmc.get(env_id) == ("quadruped", "escape") and os.environ.get("MUJOCO_GL") == "disable":
        fail("QuadrupedEscape on dm_control uploads its terrain to an OpenGL context at every reset: set MUJOCO_GL=egl "
             "(or osmesa), or use envpool")
    return backend


def envpool_hint():
    """How to get EnvPool (requirements.txt pins the version; its wheels cover these platforms)."""
    return ("pip install envpool==1.2.5: wheels for CPython 3.11-3.14 on Linux x86_64 and aarch64, macOS arm64 and "
            "Windows x86_64; elsewhere only dm_control runs")


def render_backend(capture_video):
    """The MUJOCO_GL value for this run: `disable` (or the user's choice) without video; with --capture-video the first
    of the user's choice, EGL and OSMesa that renders a frame. Each is tried in a subprocess, since PyOpenGL binds its
    platform at the first import and cannot switch in this process after a failure."""
    if not capture_video:
        return os.environ.get("MUJOCO_GL", "disable")
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        fail("--capture-video writes mp4 through imageio-ffmpeg: pip install imageio==2.38.1 imageio-ffmpeg==0.6.0")
    probe = "import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco/>'); mujoco.Renderer(m, 8, 8).render()"
    choices = [gl for gl in [os.environ.get("MUJOCO_GL"), "egl", "osmesa"] if gl not in (None, "disable")]
    for gl in dict.fromkeys(choices):
        probe_run = subprocess.run(
            [sys.executable, "-c", probe], env=dict(os.environ, MUJOCO_GL=gl), capture_output=True, timeout=120
        )
        if probe_run.returncode == 0:
            return gl
    fail(f"--capture-video: no OpenGL backend renders here (tried MUJOCO_GL={', '.join(dict.fromkeys(choices))}); "
         "install EGL (libegl1) or OSMesa (libosmesa6)")


def memory_available():
    """Bytes this process can still allocate, or None where not measurable (no /proc: macOS, Windows):
    MemAvailable, capped by a cgroup's limit minus its usage (v2, else v1). GORL_MEMORY_LIMIT_BYTES, when set,
    replaces the measurement (tests fake a small machine with it)."""
    if os.environ.get("GORL_MEMORY_LIMIT_BYTES"):
        return int(os.environ["GORL_MEMORY_LIMIT_BYTES"])
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit_file, usage_file in [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   (v1 + "limit_in_bytes", v1 + "usage_in_bytes")]:
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit, usage = f.read().strip(), int(g.read())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 reports "no limit" as a huge number, v2 as "max"
            available = min(available, int(limit) - usage)
        break
    return available


def resident_bytes():
    """This process's resident memory (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def check_resources(args, backend):
    """Refuses with one line a run whose environments cannot fit in memory, and says when dm_control will be slow.

    An env's memory is mostly MuJoCo's per-env model and data arena (HopperStand: 12.5 MB on either backend; DogRun
    76 MB on dm_control, 106 MB on EnvPool), so it is measured: the resident memory a few envs of this task and
    backend add. The peak holds the training envs plus the larger of the evaluation and GoRL refinement envs."""
    available = memory_available()
    others = max(args.num_eval_envs, getattr(args, "refine_num_envs", 0))
    # Building a few DMC envs takes seconds, so small runs skip the probe when 256 MiB per env (over twice the largest
    # measured, DogRun on EnvPool) fits anyway.
    if args.num_envs <= 64 and (available is None or (args.num_envs + others) * 2**28 <= 0.9 * available):
        return
    probes, probe_steps = 8, 10  # fewer envs overstate: a pool's own fixed cost (EnvPool: ~40 MB) is shared by fewer
    warm = VecEnv(args.env_id, backend, 1, args.seed)  # one-time costs (imports, EnvPool's thread pool, assets)
    warm.reset()
    before = resident_bytes()
    sample = VecEnv(args.env_id, backend, probes, args.seed)
    sample.reset()
    start = time.time()
    for _ in range(probe_steps):
        sample.step(np.zeros((probes, sample.action_dim)))
    steps_per_second = probes * probe_steps / max(time.time() - start, 1e-9)
    per_env = None if before is None else max(resident_bytes() - before, 0) / probes
    sample.close()
    warm.close()
    need = None if per_env is None else per_env * (args.num_envs + others)
    # a tenth for the rollout storage, the networks and the allocator's slack
    if need is None or available is None or need <= 0.9 * available:
        if backend == "dm_control" and args.num_envs > 64:
            hours = args.total_timesteps / steps_per_second / 3600
            print(f"note: dm_control steps its {args.num_envs} envs one after another in this process: about "
                  f"{steps_per_second:,.0f} env steps/s measured here, so --total-timesteps {args.total_timesteps:,} takes "
                  f"about {hours:,.1f} h of env stepping alone; EnvPool steps them on a C++ thread pool: {envpool_hint()}")
        return
    fits = int(0.9 * available / per_env) - others
    if hasattr(args, "num_minibatches"):  # every env contributes whole segments: a divisor of the iteration's segments
        segments = args.batch_size * args.num_minibatches
        fits = max([n for n in range(1, min(fits, segments) + 1) if segments % n == 0], default=0)
        layout = (f"; an iteration keeps its {segments} segments of {args.unroll_length} steps, as {segments // max(fits, 1)} "
                  f"unrolls of {fits} envs instead of {segments // args.num_envs} of {args.num_envs}")
    else:
        layout = ""
    suggestion = (f"--num-envs {fits} fits{layout}" if fits > 0 else
                  f"even one training env does not fit beside {others} evaluation/refinement envs: lower --num-eval-envs")
    fail(f"{args.num_envs} training + {others} evaluation/refinement envs of {args.env_id} on {backend} need about "
         f"{need / 2**30:.1f} GiB ({per_env / 2**20:.1f} MiB each, measured), more than the {available / 2**30:.1f} GiB "
         f"available; {suggestion}")


class VecEnv:
    """`num_envs` copies of one task behind one small interface, for either backend.

    Observations come out as flat float32 arrays (dict entries concatenated in sorted key order, the same
    entries and sizes on both backends); actions go in as [-1, 1] (the policy's tanh) and are mapped to the env's
    bounds where those are finite and sensible (identity on unbounded actuators such as LQR's +-1e10). Every
    episode ends within `max_episode_steps` steps (1000 for every DMC task on both backends; for a Gymnasium id
    the limit of the env that runs it: Gymnasium's registered one, or EnvPool's). `step` also returns `valid`:
    False on EnvPool's reset step, the step after an episode end whose action is ignored and whose reward belongs
    to no episode, so it must not be trained on (README: Tasks). After a step, `final_obs` is the returned obs except
    where an episode just ended: there it is the observation the episode ended in (what an off-policy target
    bootstraps from at a time limit), not the next episode's first one.
    """

    dmc_observation_keys = {}  # (domain, task) -> dm_control's observation entries, read once per process

    def __init__(self, env_id, backend, num_envs, seed, render=False):
        dmc = dmc_task_ids()
        self.backend, self.num_envs, self.seed, self.obs_keys = backend, num_envs, seed, None
        if backend == "envpool":
            import envpool

            self.envs = envpool.make(self.envpool_id(env_id), env_type="gymnasium", num_envs=num_envs, seed=seed)
            action_space, self.max_episode_steps = self.envs.action_space, self.envs.spec.config.max_episode_steps
            if env_id in dmc:
                # EnvPool pads some tasks with the all-zero entries of a sibling task (HumanoidStand: `position`,
                # FingerSpin: `target_position`, `dist_to_target`; FishUpright: `target`; Dog*: `ball_state`,
                # `target_position`); only dm_control's own entries are kept, so both backends observe the same.
                if dmc[env_id] not in VecEnv.dmc_observation_keys:
                    from dm_control import suite

                    env = suite.load(*dmc[env_id])
                    VecEnv.dmc_observation_keys[dmc[env_id]] = sorted(env.observation_spec())
                    env.close()
                self.obs_keys = VecEnv.dmc_observation_keys[dmc[env_id]]
        else:
            name, kwargs = env_id, {}
            if env_id in dmc:
                import shimmy

                gym.register_envs(shimmy)
                # dm_control's LQR tasks never end; EnvPool cuts every DMC task at 1000 steps, and so does this TimeLimit.
                name, kwargs = "dm_control/{}-{}-v0".format(*dmc[env_id]), {"max_episode_steps": 1000}
            self.max_episode_steps = kwargs.get("max_episode_steps", gym.spec(name).max_episode_steps)

            def thunk(i):
                def make():
                    return gym.make(name, render_mode="rgb_array" if render and i == 0 else None, **kwargs)

                return make

            # SAME_STEP autoreset: the step that ends an episode already returns the next episode's first observation.
            self.envs = gym.vector.SyncVectorEnv(
                [thunk(i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
            )
            action_space = self.envs.single_action_space
            if env_id in dmc:  # dm_control's own entries, for an EnvPool VecEnv of the same task in this process
                VecEnv.dmc_observation_keys[dmc[env_id]] = sorted(self.envs.single_observation_space.keys())
        if not isinstance(action_space, gym.spaces.Box):
            fail(f"--env-id {env_id!r} has {type(action_space).__name__} actions; these scripts need continuous (Box) actions")
        self.action_dim = int(np.prod(action_space.shape))
        # [-1, 1] is mapped onto [action_low, action_high] only in the dims whose bounds are finite and sensible;
        # the others (unbounded actuators: LQR's +-1e10) get the policy's action as is.
        low, high = action_space.low.astype(np.float64), action_space.high.astype(np.float64)
        self.action_bounded = (np.abs(low) < 1e6) & (np.abs(high) < 1e6) & (low < high)
        self.action_low, self.action_high = np.where(self.action_bounded, low, -1.0), np.where(self.action_bounded, high, 1.0)
        self.action_identity = bool(np.all(self.action_low == -1.0) and np.all(self.action_high == 1.0))
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, dtype=np.int64)
        self.step_time = 0.0  # seconds spent inside the backend's step, for the perf/ shares

    @staticmethod
    def envpool_id(env_id):
        """EnvPool's id for one of our tasks, or None when it has none (or is not installed). DMC tasks are
        `{id}-v1` matched case-insensitively: dm_control's domain humanoid_CMU is our HumanoidCmu, EnvPool's HumanoidCMU."""
        try:
            import envpool
        except ImportError:
            return None
        if env_id not in dmc_task_ids():
            return env_id if env_id in envpool.list_all_envs() else None
        matches = [i for i in envpool.list_all_envs() if i.lower() == f"{env_id}-v1".lower()]
        return matches[0] if len(matches) == 1 else None

    @staticmethod
    def flatten(obs, keys=None):
        """Dict entries `keys` (default: all, sorted) concatenated into one float32 row per env."""
        if isinstance(obs, dict):
            obs = np.concatenate(
                [np.asarray(obs[k]).reshape(len(np.asarray(obs[k])), -1) for k in (sorted(obs) if keys is None else keys)],
                axis=1,
            )
        return np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)

    def reset(self):
        if self.backend == "envpool":
            obs, _ = self.envs.reset()
        else:
            obs, _ = self.envs.reset(seed=[self.seed + i for i in range(self.num_envs)])
        self.episode_return[:], self.episode_length[:] = 0, 0
        return self.flatten(obs, self.obs_keys)

    def step(self, action):
        """Returns obs, reward, terminated, truncated, valid and the returns and lengths of episodes that just ended."""
        start = time.time()
        obs, reward, terminated, truncated, info = self.envs.step(self.scale_action(action))
        self.step_time += time.time() - start
        # EnvPool reports truncated = (elapsed_step >= its max_episode_steps) and terminated = done & ~truncated, so
        # a termination on the time-limit step comes out as a truncation only (it cannot report both); Gymnasium's
        # TimeLimit reports both flags there, and the loops' `learnable` masks keep such a step a termination. DMC tasks never
        # terminate: both backends truncate them at step 1000.
        valid = info["elapsed_step"] > 0 if self.backend == "envpool" else np.ones(self.num_envs, dtype=bool)
        reward = np.asarray(reward, dtype=np.float32) * valid
        done = np.logical_or(terminated, truncated)
        self.episode_return += reward
        self.episode_length += valid
        ended = (self.episode_return[done].copy(), self.episode_length[done].copy())
        self.episode_return[done], self.episode_length[done] = 0, 0
        # EnvPool returns the final observation itself (its reset comes one step later); SAME_STEP autoreset
        # returns the next episode's first observation and puts the final one in info.
        obs = self.final_obs = self.flatten(obs, self.obs_keys)
        if self.backend != "envpool" and done.any():
            self.final_obs = obs.copy()
            for i in np.flatnonzero(done):
                last = info["final_obs"][i]
                self.final_obs[i] = self.flatten(
                    {k: np.asarray(v)[None] for k, v in last.items()} if isinstance(last, dict) else np.asarray(last)[None]
                )[0]
        return obs, reward, np.asarray(terminated), np.asarray(truncated), valid, ended

    def scale_action(self, action):
        """Maps the policy's [-1, 1] onto the actuator bounds (identity in the unbounded dims), in float64 and
        clipped, so rounding never leaves the bounds (Quadruped's are +-0.8 and [-1, 1.1] in places)."""
        action = np.asarray(action, dtype=np.float64)
        if self.action_identity:  # every DMC task: bounds [-1, 1], nothing to map
            return action
        scaled = np.clip(
            self.action_low + 0.5 * (action + 1.0) * (self.action_high - self.action_low), self.action_low, self.action_high
        )
        return np.where(self.action_bounded, scaled, action)

    # Model entries that DMC tasks rewrite when an episode starts (Reacher's and Swimmer's targets, Finger's).
    episode_model_fields = "body_pos body_quat geom_pos geom_quat geom_size geom_rgba site_pos site_quat".split()

    def get_state(self):
        """What the envs need to go on exactly where they are, as tensors and plain values; None on EnvPool, which
        cannot export its envs (a resumed EnvPool run starts new episodes). Per env: MuJoCo's integration state, the
        model entries above, the env's RNG, its step counters, and the running episode's return and length."""
        if self.backend == "envpool":
            return None
        import mujoco

        states = []
        for env in self.envs.envs:
            time_limit, inner, model, data = self.parts(env)
            physics = np.empty(mujoco.mj_stateSize(model, mujoco.mjtState.mjSTATE_INTEGRATION))
            mujoco.mj_getState(model, data, physics, mujoco.mjtState.mjSTATE_INTEGRATION)
            rng = inner.np_random  # dm_control's RandomState through shimmy, a Generator for Gymnasium's envs
            rng = rng.bit_generator.state if isinstance(rng, np.random.Generator) else mt19937_state(rng.get_state())
            dmc_env = getattr(inner, "_env", None)
            states.append({"physics": torch.from_numpy(physics), "rng": rng, "elapsed": time_limit._elapsed_steps,
                           "dmc_steps": (dmc_env._step_count, dmc_env._reset_next_step) if dmc_env is not None else None,
                           "model": {k: torch.from_numpy(getattr(model, k).copy()) for k in self.episode_model_fields}})
        return {
            "envs": states,
            "episode_return": torch.from_numpy(self.episode_return),
            "episode_length": torch.from_numpy(self.episode_length),
        }

    def set_state(self, state):
        """Restores `get_state()`'s result on envs of the same task and number (nothing on EnvPool)."""
        if state is None or self.backend == "envpool":
            return
        import mujoco

        for env, saved in zip(self.envs.envs, state["envs"]):
            time_limit, inner, model, data = self.parts(env)
            for k, v in saved["model"].items():
                getattr(model, k)[:] = v.numpy()
            mujoco.mj_setState(model, data, saved["physics"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
            mujoco.mj_forward(model, data)  # the derived quantities a step starts from (dm_control steps mj_step2 first)
            if isinstance(inner.np_random, np.random.Generator):
                inner.np_random.bit_generator.state = saved["rng"]
            else:
                inner.np_random.set_state(mt19937_state(saved["rng"]))
            time_limit._elapsed_steps = saved["elapsed"]
            if saved["dmc_steps"] is not None:
                inner._env._step_count, inner._env._reset_next_step = saved["dmc_steps"]
        self.episode_return[:], self.episode_length[:] = state["episode_return"].numpy(), state["episode_length"].numpy()

    @staticmethod
    def parts(env):
        """A Gymnasium env's TimeLimit wrapper, its innermost env and the MuJoCo model and data that env steps."""
        time_limit = env
        while not isinstance(time_limit, gym.wrappers.TimeLimit):
            time_limit = time_limit.env
        inner = env.unwrapped
        if hasattr(inner, "_env"):  # shimmy around a dm_control Environment
            return time_limit, inner, inner._env.physics.model.ptr, inner._env.physics.data.ptr
        return time_limit, inner, inner.model, inner.data

    def render(self):
        """Env 0's current frame (dm_control backend made with render=True)."""
        return self.envs.envs[0].render()

    def close(self):
        self.envs.close()


class RunningMeanStd(nn.Module):
    """Observation normalizer: running mean and (population) variance, merged batch by batch (Chan et al.'s
    parallel Welford update), so merging k batches equals one pass over all of them. Buffers, so a checkpoint
    carries them. float64 keeps the merge exact over hundreds of millions of samples."""

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
        """`accumulate=False` is upstream FPO's normalizer (418c255, playground/src/flow_policy/math_utils.py,
        `RunningStats.update`; the GoRL release's `legacy_batch_only`): the sum of squares keeps only this batch's
        sum((x - old mean)(x - new mean)) while the count accumulates, so the std shrinks like 1/sqrt(batches)."""
        x = x.reshape(-1, self.mean.shape[-1]).double()
        batch_mean, batch_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
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
    rewards, terminated, mask: [B, T]; values: [B, T + 1], the last one V(final next-obs).

    Within a segment the next observation of step t is the observation of step t + 1, except at an episode
    end, and exactly those steps (truncation, EnvPool reset) have mask 0: their advantage and value error are
    zeroed and the recursion does not cross them. Termination cuts the bootstrap as usual.
    The value targets are vs = V + GAE(lambda). The policy advantage is *not* the GAE sum: Brax takes the one-step
    return on the targets, r_t + gamma * (1 - term_t) * vs_{t+1} - V_t (vs after the last step = the bootstrap
    value), which weighs the next step's GAE by 1 instead of lambda. Returns (advantages, value targets), [B, T]."""
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


def normalize_advantages(advantages, mask):
    """Zero mean and unit std over the steps with mask 1; the masked steps stay 0."""
    n = mask.sum().clamp(min=2)
    mean = advantages.sum() / n
    std = (((advantages - mean) * mask) ** 2).sum().div(n - 1).sqrt()
    return (advantages - mean) / (std + 1e-8) * mask


def explained_variance(targets, values, mask):
    """1 - Var(targets - values) / Var(targets) over the steps with mask 1 (CleanRL's losses/explained_variance)."""
    n = mask.sum().clamp(min=2)
    target_var = (((targets - (targets * mask).sum() / n) * mask) ** 2).sum() / n
    return 1 - (((targets - values) * mask) ** 2).sum() / n / target_var.clamp(min=1e-8)


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


EVAL_SEED_OFFSET = 100_000  # evaluation envs are seeded seed + this: episodes the training envs never see


@torch.no_grad()
def evaluate(policy, env_id, backend, num_envs, seed, device, video_path=None):
    """One full episode on each of `num_envs` fresh environments, always the same seeds, so evaluations are
    comparable across a run and a reloaded checkpoint gives the same return. `policy` maps raw observations
    to actions in [-1, 1]. Episodes end within the task's time limit, and so does this loop. Returns (mean, std)
    of the episode returns. With `video_path`, one more episode with env 0's seed is rendered through dm_control
    (EnvPool does not render), whatever the backend, and written there as mp4; on dm_control it is env 0's episode."""
    envs = VecEnv(env_id, backend, num_envs, seed)
    obs = envs.reset()
    returns, done = np.zeros(num_envs), np.zeros(num_envs, dtype=bool)
    for _ in range(envs.max_episode_steps):
        action = policy(torch.as_tensor(obs, device=device)).cpu().numpy()
        obs, reward, terminated, truncated, valid, _ = envs.step(action)
        returns += reward * ~done
        done |= terminated | truncated
        if done.all():
            break
    envs.close()
    if video_path is not None:
        import imageio.v2 as imageio

        env = VecEnv(env_id, "dm_control", 1, seed, render=True)
        obs, frames = env.reset(), [env.render()]
        for _ in range(env.max_episode_steps):
            obs, _, terminated, truncated, _, _ = env.step(policy(torch.as_tensor(obs, device=device)).cpu().numpy())
            if terminated[0] or truncated[0]:  # the env has already reset: its frame is the next episode's start
                break
            frames.append(env.render())
        fps = env.envs.envs[0].metadata.get("render_fps") or 30
        env.close()  # frees the GL context now: at interpreter exit dm_control's EGL cleanup raises
        os.makedirs(os.path.dirname(video_path) or ".", exist_ok=True)
        imageio.mimwrite(video_path, frames, fps=fps, macro_block_size=1)
    return float(returns.mean()), float(returns.std())


def mt19937_state(state):
    """NumPy's legacy RNG state tuple with its key array as a tensor, and back (checkpoints hold tensors, not arrays)."""
    name, key, pos, has_gauss, gauss = state
    key = key.numpy().astype(np.uint32) if isinstance(key, torch.Tensor) else torch.from_numpy(key.astype(np.int64))
    return name, key, pos, has_gauss, gauss


def rng_state():
    """Every generator the run draws from: Python's, NumPy's, and PyTorch's on the CPU and each GPU."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": mt19937_state(np.random.get_state()), "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(mt19937_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, checkpoint):
    """Writes a temporary file and renames it over `path`: a kill during the write leaves the previous checkpoint."""
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path):
    """Loads a checkpoint written by this script, without running any code from it (weights_only: tensors and
    plain values only), refusing a truncated file or one written by another script."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, truncated or foreign file: unpickling errors have no common type
        fail(f"cannot read checkpoint {path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    script = os.path.basename(__file__)
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != script:
        writer = checkpoint.get("script") if isinstance(checkpoint, dict) else "something else"
        fail(f"checkpoint {path!r} was written by {writer}, not by {script}")
    return checkpoint


def resumed_args(args, checkpoint):
    """The checkpoint's settings, for --resume. A flag given on the command line that changes the run (another
    task, another batch layout) is refused; only the ones below may be given anew (the others keep the saved values)."""
    may_differ = "resume checkpoint_every cuda track wandb_project_name wandb_entity capture_video save_model".split()
    defaults, saved = vars(Args()), checkpoint["args"]
    for name, value in vars(args).items():
        if name not in may_differ and value != defaults[name] and value != saved[name]:
            fail(f"--resume: checkpoint {args.resume!r} is a run with --{name.replace('_', '-')} {saved[name]}, not {value}")
    return Args(**{**saved, **{name: getattr(args, name) for name in may_differ if getattr(args, name) != defaults[name]}})


def make_checkpoint(args, backend, run_name, envs, next_obs, modules, loop):
    """Everything a run needs to go on: the state_dict of every network, optimizer and normalizer in `modules`,
    the loop's counters `loop` (plain values), the envs' state (dm_control) and observation, and every RNG."""
    checkpoint = {"script": os.path.basename(__file__), "args": vars(args), "backend": backend, "run_name": run_name}
    checkpoint.update(obs_dim=next_obs.shape[1], action_dim=envs.action_dim, envs=envs.get_state(), loop=loop)
    checkpoint.update(next_obs=torch.from_numpy(next_obs))
    return {**checkpoint, "rng": rng_state(), **{name: module.state_dict() for name, module in modules.items()}}


def restore_checkpoint(checkpoint, envs, next_obs, modules):
    """Loads `make_checkpoint`'s result into `modules` and the envs, sets every RNG, and returns the loop's counters
    and the next observation (on EnvPool, the one of the new episodes `next_obs`)."""
    for name, module in modules.items():
        module.load_state_dict(checkpoint[name])
    envs.set_state(checkpoint["envs"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["loop"], next_obs if checkpoint["envs"] is None else checkpoint["next_obs"].numpy()


def evaluate_checkpoint(path, capture_video, device, load_policy):
    """--eval-checkpoint: the deterministic evaluation of a saved model on its own task and seeds, printed.
    `load_policy(checkpoint, device)` rebuilds the script's networks and returns their evaluation policy."""
    checkpoint = load_checkpoint(path)
    saved = Args(**checkpoint["args"])
    backend = resolve_backend(saved.env_id, checkpoint["backend"])
    video_path = (
        f"videos/{os.path.basename(os.path.dirname(os.path.abspath(path)))}/eval_checkpoint.mp4" if capture_video else None
    )
    policy = load_policy(checkpoint, device)
    mean, std = evaluate(policy, saved.env_id, backend, saved.num_eval_envs, saved.seed + EVAL_SEED_OFFSET, device, video_path)
    print(f"eval/episodic_return={mean:.4f} eval/episodic_return_std={std:.4f} "
          f"({saved.num_eval_envs} episodes, {saved.env_id}, {backend})")
    if video_path is not None:
        print(f"video saved to {video_path}")


def crossed(global_step, steps, every):
    """True when the last `steps` env steps passed a multiple of `every` (evaluation and checkpoint points)."""
    return global_step // every > (global_step - steps) // every


def log_scalars(writer, scalars, global_step):
    for name, value in scalars.items():
        writer.add_scalar(name, value, global_step)


def log_episodes(writer, ended, global_step, train_return):
    """Logs the episodes that just ended, `ended` = (returns, lengths), and returns the latest training return."""
    if len(ended[0]) == 0:
        return train_return
    log_scalars(writer, {"charts/episodic_return": ended[0].mean(), "charts/episodic_length": ended[1].mean()}, global_step)
    return float(ended[0].mean())


def finite_means(stats, where):
    """The means of the update's scalars, `stats` a list of {name: 0-d tensor}, in one device-to-host copy. A loss
    that went non-finite stops the run with one line (exit code 1); `where(i)` says where the i-th entry was computed."""
    names = list(stats[0])
    with torch.no_grad():
        values = torch.stack([torch.stack([entry[name] for name in names]) for entry in stats]).cpu()
    bad = ~torch.isfinite(values[:, [name.endswith("loss") for name in names]]).all(1)
    if bad.any():
        print(f"error: non-finite loss {where(int(bad.nonzero()[0]))}; stopping", file=sys.stderr)
        sys.exit(1)
    return dict(zip(names, values.mean(0).tolist()))


def log_timing(writer, global_step, steps, train_time, envs, rollout_time, iteration_time):
    """charts/SPS, and where the iteration's time went: stepping the envs, the rest of the rollout (inference,
    copies), the update. Takes (and resets) the envs' stepping time. Returns the SPS."""
    sps = int(global_step / train_time)
    shares = {"env": envs.step_time, "inference": rollout_time - envs.step_time, "update": iteration_time - rollout_time}
    log_scalars(writer, {"charts/SPS": sps, "perf/rollout_SPS": int(steps / rollout_time)}, global_step)
    log_scalars(writer, {f"perf/{name}_share": seconds / iteration_time for name, seconds in shares.items()}, global_step)
    envs.step_time = 0.0
    return sps


def check_args(args):
    """Refuses impossible settings with one line before anything expensive starts. Each script has some of these
    names; a GoRL script checks its baseline's settings and its own with the same code."""
    positive = """total_timesteps num_envs unroll_length batch_size num_minibatches update_epochs eval_every num_eval_envs
        checkpoint_every learning_rate learning_rate_later clip_coef clip_coef_later reward_scale flow_steps samples_per_action
        denoising_steps min_std buffer_size policy_frequency policy_lr q_lr utd_ratio stage_weights refine_episodes
        refine_num_envs decoder_batch_size decoder_lr decoder_hidden""".split()
    non_negative = """threads ent_coef ent_coef_later vf_coef max_grad_norm max_grad_norm_later alpha learning_starts beta
        decoder_steps target_clip""".split()
    per_stage = ["beta", "encoder_reset", "obs_stats_accumulation", "obs_stats_timing"]  # one value, or one per stage
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        values = [v for v in (value if isinstance(value, tuple) else [value]) if v is not None]
        got = " ".join(map(str, values)) or "nothing"
        if name in positive + non_negative and isinstance(value, tuple) and not value and name != "ent_coef_later":
            fail(f"{flag} takes one or more values, got nothing")
        if name in positive and not all(v > 0 for v in values):
            fail(f"{flag} must be positive, got {got}")
        if name in non_negative and not all(v >= 0 for v in values):
            fail(f"{flag} must be non-negative, got {got}")
        if name in ["gamma", "tau", "gamma_denoising"] and not 0 < value <= 1:
            fail(f"{flag} must be in (0, 1], got {value}")
        if name in per_stage and isinstance(value, tuple) and not 1 <= len(value) <= len(args.stage_weights):
            fail(f"{flag} takes one value or one per stage ({len(args.stage_weights)} stages), got {got}")
    if not 0 <= getattr(args, "gae_lambda", 0) <= 1:
        fail(f"--gae-lambda must be in [0, 1], got {args.gae_lambda}")
    if hasattr(args, "unroll_length"):  # PPO and its variants: whole segments per env, at least one iteration
        segments, steps = args.batch_size * args.num_minibatches, args.batch_size * args.num_minibatches * args.unroll_length
        if segments % args.num_envs != 0:
            fail(f"--batch-size * --num-minibatches ({segments} segments per iteration) must be a multiple of --num-envs "
                 f"({args.num_envs}), so every env contributes whole segments")
        if args.total_timesteps < steps:
            fail(f"--total-timesteps {args.total_timesteps} is smaller than one iteration ({args.num_minibatches} "
                 f"minibatches * {args.batch_size} segments * {args.unroll_length} steps = {steps})")
    elif args.total_timesteps < args.num_envs or args.total_timesteps <= args.learning_starts:  # SAC
        fail(f"--total-timesteps {args.total_timesteps} leaves no learning: it must exceed --learning-starts "
             f"({args.learning_starts}) and be at least --num-envs ({args.num_envs})")
    if hasattr(args, "stage_weights"):  # GoRL: a refit needs episodes, and every stage its own training
        if args.decoder_steps == 0 and args.decoder_epochs <= 0:
            fail(f"--decoder-epochs must be positive (or --decoder-steps set), got {args.decoder_epochs}")
        if len(args.stage_weights) > 1 and args.refine_episodes < max(2, args.refine_num_envs):
            fail(f"--refine-episodes {args.refine_episodes} is smaller than the refit batch: at least one episode per "
                 f"refinement env (--refine-num-envs {args.refine_num_envs}) and 2 in all (one is held out)")
        need, why = (steps, "one iteration") if hasattr(args, "unroll_length") else (args.learning_starts + 1, "SAC restarts")
        smallest = min(int(args.total_timesteps * w / sum(args.stage_weights)) for w in args.stage_weights)
        if smallest < need:
            fail(f"--total-timesteps {args.total_timesteps} split by --stage-weights {' '.join(map(str, args.stage_weights))} "
                 f"gives a stage of {smallest} steps; each needs at least {need} ({why})")


# ---- GoRL ----
def per_stage(values, stage):
    """A per-stage flag's value in `stage`: one value for every stage, or one per stage with the last repeating."""
    return values[min(stage, len(values) - 1)]


def kl_to_prior(dist, form="analytic"):
    """The penalty of paper Eq. 3 that keeps the latents where the decoder was trained, per sample. `analytic` (the
    paper): KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum_d (mu^2 + sigma^2 - 1 - 2 log sigma). `release` (the released
    code): mean_d mu^2 + mean_d sigma^2; with coefficient c it pulls each mean like the analytic KL with beta = 2c / D
    (D latent dimensions), but pulls sigma toward 0 instead of 1."""
    if form == "release":
        return (dist.mean**2).mean(-1) + (dist.scale**2).mean(-1)
    return 0.5 * (dist.mean**2 + dist.scale**2 - 1 - 2 * dist.scale.log()).sum(-1)


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
        return Normal(
            mean, (F.softplus(raw_scale) + 1e-3).clamp(max=10.0), validate_args=False
        )  # no per-step checks (and syncs)

    def entropy(self, dist, tanh_correction=False):
        """The mean entropy of the Gaussian over u. `tanh_correction` (upstream FPO's PPO) adds a one-sample estimate
        of E[log|d tanh(u) / du|] = E[2 (log 2 - u - softplus(-2u))], giving the entropy of tanh(u)."""
        if not tanh_correction:
            return dist.entropy().sum(-1).mean()
        u = dist.rsample()
        return dist.entropy().sum(-1).mean() + (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1).mean()

    def act(self, x, deterministic=False):
        """Returns (u, log-prob of u, environment action in [-1, 1])."""
        dist = self.get_dist(x)
        u = dist.mean if deterministic else dist.sample()
        return u, dist.log_prob(u).sum(-1), torch.tanh(u)


def eval_policy(agent, obs_rms, decoder):
    """The deterministic policy that evaluation runs: raw observation -> the encoder's mean latent, decoded, tanh."""
    return lambda x: torch.tanh(decoder(x, agent.act(obs_rms(x), deterministic=True)[0]))


def load_policy(checkpoint, device):
    """The evaluation policy of a saved model (--eval-checkpoint)."""
    obs_rms = RunningMeanStd(checkpoint["obs_dim"]).to(device)
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    agent = Agent(checkpoint["obs_dim"], checkpoint["action_dim"]).to(device)
    agent.load_state_dict(checkpoint["agent"])
    decoder = Decoder(checkpoint["obs_dim"], checkpoint["action_dim"], checkpoint["args"]["decoder_hidden"]).to(device)
    decoder.load_state_dict(checkpoint["decoder"])
    return eval_policy(agent, obs_rms, decoder)


def reset_encoder(agent, mode, obs_dim, action_dim):
    """The encoder at a stage start (paper Sec. 3, stage-wise re-initialization). `prior`: a freshly initialized
    actor whose last layer makes the latent policy exactly N(0, I) for any observation (mean 0; scale
    softplus(b) + 1e-3 = 1), critic kept (`prior-best` is the same; the loop passes the stage's best encoder). `fresh`:
    actor and critic re-initialized. `warm` and `none` return the encoder they are given (the loop passes the stage's
    best one for `warm`). The loop resets the normalizer for `fresh`."""
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
        alpha_bar, alpha_bar_next = 1e-3 + 0.999 * (1 - t), 1e-3 + 0.999 * (1 - (t - 1.0 / self.num_steps))
        r = (alpha_bar_next / alpha_bar).sqrt()
        return r, (1 - alpha_bar_next).clamp(min=0).sqrt() - r * (1 - alpha_bar).sqrt()

    def forward(self, obs, z):
        """Decodes a batch: x = z at t = 1, then x <- x + c(t) f(s, x, t) at t = 1.0, 0.9, ..., 0.1."""
        s, x = (obs - self.obs_mean) / self.obs_std, z
        t = 1.0 - torch.arange(self.num_steps, device=z.device)[:, None] / self.num_steps  # all 10 steps' constants at once
        temb, c = self.embed(t), self.ddim_coefficients(t)[1]
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
    """Runs the stage's encoder through the stage's decoder until `num_episodes` episodes have ended; `sample_z` maps
    raw observations to sampled latents (not the mean). Returns (obs, pre-tanh action, z, episode id) of the valid
    steps of ended episodes, the ended episodes' returns, and the env steps taken."""
    envs = VecEnv(env_id, backend, num_envs, seed)
    next_obs = envs.reset()
    episode, next_episode = np.arange(num_envs), num_envs
    transitions, episode_ids, valids, ended_episodes, returns = [], [], [], [], []
    while len(returns) < num_episodes:
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
    keep = torch.as_tensor((np.stack(valids) & np.isin(np.stack(episode_ids), ended_episodes)).reshape(-1), device=device)
    obs, action, z = (torch.stack(x).flatten(0, 1)[keep] for x in zip(*transitions))
    episode_id = torch.as_tensor(np.stack(episode_ids).reshape(-1), device=device)[keep]
    return (obs, action, z, episode_id), np.array(returns), len(transitions) * num_envs


def fit_decoder(data, args, device):
    """Trains a new decoder from scratch on the refinement data (paper Eq. 4). Its inputs are fresh prior noise
    eps ~ N(0, I) for every sample, never the encoder's z (`--refine-input latent` is the ablation of Sec. 4.3.1).
    SAMPLES_PER_ACTION (noise, t) samples per action; targets are the pre-tanh actions clipped to +-`--target-clip`.
    10% of the episodes are held out, and the decoder with the lowest validation loss (fixed noise) is kept.
    `--decoder-epochs` passes over the training split, or `--decoder-steps` Adam steps on minibatches drawn with
    replacement (the release's 50,000), validating once per epoch or every 2% of the steps.
    Returns (decoder, mean train loss since the last validation, best validation loss)."""
    obs, action, z, episode_id = data
    if args.target_clip > 0:
        action = action.clamp(-args.target_clip, args.target_clip)
    episodes = episode_id.unique()
    val_episodes = episodes[torch.randperm(len(episodes), device=device)[: max(1, len(episodes) // 10)]]
    is_val = torch.isin(episode_id, val_episodes)
    train_idx, val_idx = (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)[:VAL_ACTIONS]
    decoder = Decoder(obs.shape[1], action.shape[1], args.decoder_hidden).to(device)
    decoder.obs_mean.copy_(obs[train_idx].mean(0))
    decoder.obs_std.copy_(obs[train_idx].std(0).clamp(min=1e-6))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr)

    def batch(idx):
        a = action[idx].repeat_interleave(SAMPLES_PER_ACTION, 0)
        noise = torch.randn_like(a) if args.refine_input == "prior" else z[idx].repeat_interleave(SAMPLES_PER_ACTION, 0)
        return obs[idx].repeat_interleave(SAMPLES_PER_ACTION, 0), a, noise, torch.rand_like(a[:, :1])

    val_batch = batch(val_idx)  # drawn once: the validation loss uses fixed noise
    steps_per_epoch = -(-len(train_idx) // args.decoder_batch_size)
    total_steps = args.decoder_steps or args.decoder_epochs * steps_per_epoch
    validate_every = max(1, total_steps // 50) if args.decoder_steps else steps_per_epoch
    best_val, best_state, losses = float("inf"), None, []
    for step in range(total_steps):
        if args.decoder_steps:  # with replacement
            idx = train_idx[torch.randint(len(train_idx), (args.decoder_batch_size,), device=device)]
        else:  # epochs: a new permutation of the training split every steps_per_epoch steps
            if step % steps_per_epoch == 0:
                perm = train_idx[torch.randperm(len(train_idx), device=device)]
            idx = perm[(step % steps_per_epoch) * args.decoder_batch_size :][: args.decoder_batch_size]
        loss = decoder.loss(*batch(idx)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if (step + 1) % validate_every and step + 1 < total_steps:
            continue
        with torch.no_grad():
            starts = range(0, len(val_batch[0]), VAL_ACTIONS)  # chunks bound the memory
            chunks = [decoder.loss(*(x[i : i + VAL_ACTIONS] for x in val_batch)) for i in starts]
            val_loss = float(torch.cat(chunks).mean())
        train_loss, losses = float(torch.stack(losses).mean()), []
        if not (np.isfinite(train_loss) and np.isfinite(val_loss)):
            print(f"error: non-finite decoder loss at refit step {step + 1} of {total_steps}; stopping", file=sys.stderr)
            sys.exit(1)
        if val_loss < best_val:
            best_val, best_state = val_loss, copy.deepcopy(decoder.state_dict())
    decoder.load_state_dict(best_state)
    return decoder, train_loss, best_val


def load_decoder(path, args):
    """The last decoder of a model saved by this script on the same task (--decoder-checkpoint, Sec. 4.3.3)."""
    saved = load_checkpoint(path)
    if saved["args"]["env_id"] != args.env_id:
        fail(f"--decoder-checkpoint {path!r} was trained on {saved['args']['env_id']}, not {args.env_id}")
    if saved["args"]["decoder_hidden"] != args.decoder_hidden:
        fail(f"--decoder-checkpoint {path!r} has --decoder-hidden {saved['args']['decoder_hidden']}; pass the same")
    return saved["decoder"]


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = load_checkpoint(args.resume) if args.resume is not None else None
    args = resumed_args(args, checkpoint) if checkpoint is not None else args
    os.environ["MUJOCO_GL"] = render_backend(args.capture_video)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dm_control's model-compiler deprecation warnings
    torch.set_flush_denormal(True)  # on the CPU, denormal floats in Adam's state slow every update down over time
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # Per-step inference on a few envs is fastest on one thread; the updates' minibatches are 1.5-1.9x faster on two cores.
    rollout_threads, update_threads = (args.threads, args.threads) if args.threads > 0 else (1, torch.get_num_threads())
    if args.eval_checkpoint is not None:
        evaluate_checkpoint(args.eval_checkpoint, args.capture_video, device, load_policy)
        sys.exit(0)

    check_args(args)
    backend = resolve_backend(args.env_id, args.env_backend if checkpoint is None else checkpoint["backend"])
    check_resources(args, backend)
    steps_per_iteration = args.batch_size * args.num_minibatches * args.unroll_length
    stage_steps = [int(args.total_timesteps * w / sum(args.stage_weights)) for w in args.stage_weights]
    stage_iterations = [steps // steps_per_iteration for steps in stage_steps]
    num_iterations, stage_ends = sum(stage_iterations), list(np.cumsum(stage_iterations))
    run_name = checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    checkpoint_every = args.checkpoint_every or max(args.total_timesteps // 10, 1)
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)
    # A resumed run writes on in the same directory; tensorboard drops what the killed run logged after its checkpoint.
    writer = SummaryWriter(f"runs/{run_name}", purge_step=checkpoint["loop"]["global_step"] + 1 if checkpoint else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    writer.add_text("backend", backend)
    print(f"{run_name}: backend {backend}, device {device}, {num_iterations} iterations of {steps_per_iteration} steps "
          f"in stages of {stage_iterations}")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    envs = VecEnv(args.env_id, backend, args.num_envs, args.seed)
    next_obs = envs.reset()
    obs_dim, action_dim = next_obs.shape[1], envs.action_dim
    obs_rms = RunningMeanStd(obs_dim).to(device)
    agent = reset_encoder(Agent(obs_dim, action_dim).to(device), args.encoder_reset[0], obs_dim, action_dim)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-8)
    # Stage 0 decodes with the identity (a fresh decoder), or with a saved one (frozen-decoder study, Sec. 4.3.3).
    decoder = Decoder(obs_dim, action_dim, args.decoder_hidden).to(device)
    if args.decoder_checkpoint is not None:
        decoder.load_state_dict(load_decoder(args.decoder_checkpoint, args))
    decoders, stage, refine_steps = [copy.deepcopy(decoder.state_dict())], 0, 0
    # The stage's best-evaluated encoder, for --refine-from best and --encoder-reset warm / prior-best
    best = {"return": -float("inf"), "agent": copy.deepcopy(agent), "obs_rms": copy.deepcopy(obs_rms)}

    def eval_and_log(global_step):
        video_path = f"videos/{run_name}/step_{global_step}.mp4" if args.capture_video else None
        seed = args.seed + EVAL_SEED_OFFSET
        policy = eval_policy(agent, obs_rms, decoder)
        mean, std = evaluate(policy, args.env_id, backend, args.num_eval_envs, seed, device, video_path)
        log_scalars(writer, {"eval/episodic_return": mean, "eval/episodic_return_std": std}, global_step)
        if mean > best["return"]:
            best["return"] = mean
            best["agent"].load_state_dict(agent.state_dict())
            best["obs_rms"].load_state_dict(obs_rms.state_dict())
        return mean

    # Rollout storage: U unrolls of T steps on N envs; obs has T + 1 entries so each segment carries its bootstrap obs.
    # `learnable` is 0 where a step's next observation is not its successor (a truncation, EnvPool's reset step).
    U, T, N = args.batch_size * args.num_minibatches // args.num_envs, args.unroll_length, args.num_envs
    obs = torch.zeros((U, T + 1, N, obs_dim), device=device)
    actions = torch.zeros((U, T, N, action_dim), device=device)
    logprobs = torch.zeros((U, T, N), device=device)
    rewards, terminations, learnable = (np.zeros((U, T, N), np.float32) for _ in range(3))

    modules = {"agent": agent, "optimizer": optimizer, "obs_rms": obs_rms, "decoder": decoder}
    modules.update(best_agent=best["agent"], best_obs_rms=best["obs_rms"])
    iteration, global_step, train_time, eval_return, train_return = 0, 0, 0.0, float("nan"), float("nan")
    if checkpoint is None:
        eval_return = eval_and_log(0)
    else:
        loop, next_obs = restore_checkpoint(checkpoint, envs, next_obs, modules)
        iteration, global_step, train_time, eval_return, train_return = (
            loop[k] for k in ("iteration", "global_step", "train_time", "eval_return", "train_return"))
        stage, refine_steps, decoders, best["return"] = (loop[k] for k in ("stage", "refine_steps", "decoders", "best_return"))
    for iteration in range(iteration + 1, num_iterations + 1):
        iteration_start = time.time()
        torch.set_num_threads(rollout_threads)
        clip_coef, beta = args.clip_coef if stage == 0 else args.clip_coef_later, per_stage(args.beta, stage)
        ent_coef = args.ent_coef if stage == 0 or not args.ent_coef_later else per_stage(args.ent_coef_later, stage - 1)
        max_grad_norm = args.max_grad_norm if stage == 0 or args.max_grad_norm_later is None else args.max_grad_norm_later
        obs_stats_accumulation = per_stage(args.obs_stats_accumulation, stage)
        obs_stats_timing = per_stage(args.obs_stats_timing, stage)
        for unroll in range(U):
            for t in range(T):
                obs[unroll, t] = torch.as_tensor(next_obs, device=device)
                with torch.no_grad():  # Phase 1: PPO's action is the latent z; the frozen decoder is part of the environment
                    actions[unroll, t], logprobs[unroll, t], _ = agent.act(obs_rms(obs[unroll, t]))
                    env_action = torch.tanh(decoder(obs[unroll, t], actions[unroll, t]))
                next_obs, reward, terminated, truncated, valid, ended = envs.step(env_action.cpu().numpy())
                rewards[unroll, t], terminations[unroll, t] = reward * args.reward_scale, terminated
                learnable[unroll, t] = valid & ~(truncated & ~terminated)  # a termination on the time-limit step stays one
                train_return = log_episodes(writer, ended, global_step + (unroll * T + t + 1) * N, train_return)
            obs[unroll, T] = torch.as_tensor(next_obs, device=device)
        global_step += steps_per_iteration
        rollout_time = time.time() - iteration_start

        if obs_stats_timing == "legacy_pre_update":  # upstream FPO: the batch is merged before the update on it
            obs_rms.update(obs[:, :T], obs_stats_accumulation == "cumulative")
        # Segments, observations normalized with the statistics that acted on them (with legacy_pre_update, statistics
        # that include them, while the stored log-probs came from the old ones).
        b_obs, b_actions, b_logprobs, b_rewards, b_terminations, b_learnable = (
            to_segments(x, device) for x in (obs_rms(obs), actions, logprobs, rewards, terminations, learnable))

        stats = []
        torch.set_num_threads(update_threads)  # also for the evaluation that follows
        for epoch in range(args.update_epochs):
            perm = torch.randperm(U * N, device=device)
            for start in range(0, U * N, args.batch_size):
                idx = perm[start : start + args.batch_size]
                mb_obs, mb_learnable = b_obs[idx], b_learnable[idx]
                values = agent.get_value(mb_obs)
                with torch.no_grad():  # GAE from the *current* critic in every minibatch, under stop-gradient (Brax PPO)
                    advantages, v_targets = compute_gae(b_rewards[idx], values, b_terminations[idx], mb_learnable, args.gamma,
                                                        args.gae_lambda)
                    advantages = normalize_advantages(advantages, mb_learnable)

                dist = agent.get_dist(mb_obs[:, :-1])
                logratio = dist.log_prob(b_actions[idx]).sum(-1) - b_logprobs[idx]
                ratio = logratio.exp()
                clipped_ratio = ratio.clamp(1 - clip_coef, 1 + clip_coef)
                pg_loss = -torch.min(advantages * ratio, advantages * clipped_ratio).mean()
                v_loss = args.vf_coef * (mb_learnable * (v_targets - values[:, :-1]) ** 2).mean()
                entropy = agent.entropy(dist, args.tanh_entropy_correction)
                latent_kl = kl_to_prior(dist, args.kl_form).mean()
                loss = pg_loss + v_loss - ent_coef * entropy + beta * latent_kl

                optimizer.zero_grad()
                loss.backward()
                if max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(agent.parameters(), max_grad_norm)
                optimizer.step()
                approx_kl, clipfrac = ((ratio - 1) - logratio).mean(), ((ratio - 1).abs() > clip_coef).float().mean()
                explained_var = explained_variance(v_targets, values[:, :-1].detach(), mb_learnable)
                stats.append({"losses/loss": loss, "losses/policy_loss": pg_loss, "losses/value_loss": v_loss,
                              "losses/entropy": entropy, "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac,
                              "losses/explained_variance": explained_var})
                stats[-1].update({"gorl/latent_kl": latent_kl, "gorl/latent_mean": dist.mean.mean(),
                                  "gorl/latent_std": dist.scale.mean()})
        # The normalizer merges the new batch only after the update on it ("rollout-consistent", as the GoRL release's fix).
        if obs_stats_timing == "rollout_consistent":
            obs_rms.update(obs[:, :T], obs_stats_accumulation == "cumulative")

        log_scalars(writer, finite_means(stats, lambda i: f"at iteration {iteration} (epoch {i // args.num_minibatches + 1}, "
                                                          f"minibatch {i % args.num_minibatches + 1})"), global_step)
        iteration_time = time.time() - iteration_start
        train_time += iteration_time
        sps = log_timing(writer, global_step, steps_per_iteration, train_time, envs, rollout_time, iteration_time)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        log_scalars(writer, {"gorl/stage": stage, "gorl/beta": beta, "charts/clip_coef": clip_coef}, global_step)
        log_scalars(writer, {"charts/ent_coef": ent_coef, "charts/max_grad_norm": max_grad_norm}, global_step)
        if crossed(global_step, steps_per_iteration, args.eval_every) or iteration in stage_ends:
            eval_return = eval_and_log(global_step)  # GoRL also evaluates at every stage end
        if iteration in stage_ends[:-1]:
            # Phase 2, decoder refinement (Algorithm 1, Eq. 4): the stage's encoder collects data through the stage's
            # decoder, and a new decoder is fit from the fixed prior. These env steps are not in global_step.
            refine_start = time.time()
            from_best = args.refine_from == "best"
            encoder, encoder_rms = (best["agent"], best["obs_rms"]) if from_best else (agent, obs_rms)
            sample_z, seed = (lambda x: encoder.act(encoder_rms(x))[0]), args.seed + REFINE_SEED_OFFSET + stage
            data, refine_returns, steps = collect_refinement_data(sample_z, decoder, args.env_id, backend,
                                                                  args.refine_num_envs, args.refine_episodes, seed, device)
            refine_steps += steps
            decoder, decoder_train_loss, decoder_val_loss = fit_decoder(data, args, device)
            decoders.append(copy.deepcopy(decoder.state_dict()))
            log_scalars(writer, {"gorl/refine_return": refine_returns.mean(), "gorl/refine_steps": refine_steps,
                                 "gorl/refine_encoder_eval": best["return"] if from_best else eval_return,
                                 "decoder/train_loss": decoder_train_loss, "decoder/val_loss": decoder_val_loss}, global_step)
            # Stage-wise re-initialization: the next stage's encoder restarts against the new decoder.
            stage += 1
            encoder_reset = per_stage(args.encoder_reset, stage)
            if encoder_reset in ("warm", "prior-best"):  # the stage's best encoder with its normalizer (the release)
                agent, obs_rms = copy.deepcopy(best["agent"]), copy.deepcopy(best["obs_rms"])
            if encoder_reset == "fresh":  # with actor and critic, the normalizer starts over (released FM code)
                obs_rms = RunningMeanStd(obs_dim).to(device)
            agent = reset_encoder(agent, encoder_reset, obs_dim, action_dim)
            if encoder_reset != "none":  # a restarted encoder gets a fresh optimizer state
                optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-8)
            optimizer.param_groups[0]["lr"] = per_stage(args.learning_rate_later, stage - 1)
            modules.update(agent=agent, optimizer=optimizer, obs_rms=obs_rms, decoder=decoder)
            best["return"] = -float("inf")
            # The new decoder with the restarted encoder, before any PPO update: what the refit alone gives.
            policy, seed = eval_policy(agent, obs_rms, decoder), args.seed + EVAL_SEED_OFFSET
            refit_return = evaluate(policy, args.env_id, backend, args.num_eval_envs, seed, device)[0]
            writer.add_scalar("gorl/eval_after_refit", refit_return, global_step)
            print(f"stage {stage}: refit on {len(data[0])} steps of {len(refine_returns)} episodes "
                  f"(return {refine_returns.mean():.1f}), decoder loss train {decoder_train_loss:.4f} "
                  f"val {decoder_val_loss:.4f}, eval before {eval_return:.1f} after {refit_return:.1f} "
                  f"({time.time() - refine_start:.0f}s)")
        eta = (num_iterations - iteration) * train_time / iteration
        print(f"iter {iteration}/{num_iterations} global_step={global_step} SPS={sps} train_return={train_return:.1f} "
              f"eval_return={eval_return:.1f} ETA={eta / 60:.1f}min")
        if crossed(global_step, steps_per_iteration, checkpoint_every) or iteration in stage_ends:
            loop = {"iteration": iteration, "global_step": global_step, "train_time": train_time, "eval_return": eval_return,
                    "train_return": train_return, "stage": stage, "refine_steps": refine_steps, "decoders": decoders,
                    "best_return": best["return"]}
            save_checkpoint(checkpoint_path, make_checkpoint(args, backend, run_name, envs, next_obs, modules, loop))

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        save_checkpoint(model_path, make_checkpoint(args, backend, run_name, envs, next_obs, modules, loop))
        print(f"model saved to {model_path}")
    envs.close()
    writer.close()
