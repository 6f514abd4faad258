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
The code between the `# ---- shared skeleton` and `# ---- GoRL ----` lines is the same in every script;
`diff sac_gaussian.py gorl_sac_diff.py` shows what GoRL adds to SAC.

    python gorl_sac_diff.py --env-id Hopper-v5    # the paper's setting; the README has CPU-sized commands
"""
import copy
import difflib
import logging
import os
import random
import subprocess
import sys
import time
import types
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

    env_id: str = "Hopper-v5"
    """DMC task in the paper's CamelCase (`HopperStand`, `CheetahRun`, ...) or a Gymnasium id (`Hopper-v5`)"""
    env_backend: Literal["auto", "envpool", "dm_control"] = "auto"
    """`envpool` (C++ thread pool), `dm_control` (Python envs, via shimmy for DMC, in a Gymnasium vector env), or `auto`:
    envpool when it has the task"""
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
    eval_every: int = 100_000
    """evaluate every this many environment steps (and at the start and the end)"""
    num_eval_envs: int = 10
    """the number of evaluation episodes, one per fresh environment"""

    stage_weights: Tuple[float, ...] = (2, 1, 1)
    """relative env-step budgets of the stages: 2 1 1 of 4M gives 2M/1M/1M (paper App. F.2); one decoder refit between
    stages"""
    beta: float = 1e-3
    """coefficient of the KL-to-prior penalty (paper Eq. 3): one value, or one per stage (the last repeats)"""
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


def kl_to_prior(dist, form="analytic"):
    """The penalty of paper Eq. 3 that keeps the latents where the decoder was trained, per sample. `analytic` (the
    paper): KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum_d (mu^2 + sigma^2 - 1 - 2 log sigma). `release` (the released
    code): mean_d mu^2 + mean_d sigma^2; with coefficient c it pulls each mean like the analytic KL with beta = 2c / D
    (D latent dimensions), but pulls sigma toward 0 instead of 1."""
    if form == "release":
        return (dist.mean**2).mean(-1) + (dist.scale**2).mean(-1)
    return 0.5 * (dist.mean**2 + dist.scale**2 - 1 - 2 * dist.scale.log()).sum(-1)


class SoftQNetwork(nn.Module):
    """Q(s, u) on the normalized observation and tanh(u), a 256x256 SiLU MLP. It takes the actor's unsquashed u and
    squashes it itself: SAC's Q(s, a = tanh(u)), and in GoRL a latent critic Q(s, z) with a bounded input (a plain
    Q(s, z) extrapolates linearly in |z|, and its actor chased z to 1e7 within 3k updates)."""

    def __init__(self, obs_dim, action_dim):
        super().__init__()
        self.net = mlp([obs_dim + action_dim, 256, 256, 1])

    def forward(self, x, u):
        return self.net(torch.cat([x, torch.tanh(u)], -1)).squeeze(-1)


LOG_STD_MAX, LOG_STD_MIN = 2, -5


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
        """Returns (u reparameterized, log-prob of tanh(u), deterministic u = mean). The entropy SAC regularizes is
        that of tanh(u), so saturating is penalized (in GoRL too, where u is the latent z fed to the decoder)."""
        dist = self.get_dist(x)
        u = dist.rsample()
        log_prob = (dist.log_prob(u) - torch.log(1 - torch.tanh(u).pow(2) + 1e-6)).sum(-1)  # change of variables through tanh
        return u, log_prob, dist.mean


def eval_policy(actor, obs_rms, decoder):
    """The deterministic policy that evaluation runs: raw observation -> the actor's mean latent, decoded, tanh."""
    return lambda x: torch.tanh(decoder(x, actor.get_action(obs_rms(x))[2]))


def load_policy(checkpoint, device):
    """The evaluation policy of a saved model (--eval-checkpoint)."""
    obs_rms = RunningMeanStd(checkpoint["obs_dim"]).to(device)
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    actor = Actor(checkpoint["obs_dim"], checkpoint["action_dim"]).to(device)
    actor.load_state_dict(checkpoint["actor"])
    decoder = Decoder(checkpoint["obs_dim"], checkpoint["action_dim"], checkpoint["args"]["decoder_hidden"]).to(device)
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
    """A fresh actor, two critics and their targets, their optimizers and the entropy coefficient."""
    actor, qf1, qf2 = (
        Actor(obs_dim, action_dim).to(device),
        SoftQNetwork(obs_dim, action_dim).to(device),
        SoftQNetwork(obs_dim, action_dim).to(device),
    )
    log_alpha = torch.tensor(
        0.0 if args.autotune else float(np.log(max(args.alpha, 1e-30))), device=device, requires_grad=args.autotune
    )
    return types.SimpleNamespace(
        actor=actor,
        qf1=qf1,
        qf2=qf2,
        qf1_target=copy.deepcopy(qf1),
        qf2_target=copy.deepcopy(qf2),
        log_alpha=log_alpha,
        target_entropy=-float(action_dim),
        q_optimizer=torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr),
        actor_optimizer=torch.optim.Adam(actor.parameters(), lr=args.policy_lr),
        a_optimizer=torch.optim.Adam([log_alpha], lr=args.q_lr),
    )


class ReplayBuffer:
    """Transitions in preallocated device tensors, the oldest overwritten first. Observations are stored raw and
    normalized when sampled, with the current statistics."""

    def __init__(self, size, obs_dim, action_dim, device):
        self.obs, self.next_obs = torch.zeros((size, obs_dim), device=device), torch.zeros((size, obs_dim), device=device)
        self.actions = torch.zeros((size, action_dim), device=device)
        self.rewards, self.dones = torch.zeros(size, device=device), torch.zeros(size, device=device)
        self.pos, self.size = 0, 0

    def add(self, obs, action, reward, next_obs, terminated, valid):
        """Adds one vector step. Only valid steps are kept (not EnvPool's reset steps). `next_obs` must be the
        observation each episode ended in (VecEnv.final_obs), and done = terminated: a time limit is not a
        terminal state, so its target still bootstraps from that final observation."""
        keep = torch.as_tensor(valid, device=obs.device)
        idx = (self.pos + torch.arange(int(valid.sum()), device=obs.device)) % len(self.obs)
        self.obs[idx], self.actions[idx] = obs[keep], action[keep]
        self.next_obs[idx] = torch.as_tensor(next_obs, device=obs.device)[keep]
        self.rewards[idx] = torch.as_tensor(reward, device=obs.device)[keep]
        self.dones[idx] = torch.as_tensor(terminated, dtype=torch.float32, device=obs.device)[keep]
        self.pos, self.size = (self.pos + len(idx)) % len(self.obs), min(self.size + len(idx), len(self.obs))

    def sample(self, batch_size):
        idx = torch.randint(self.size, (batch_size,), device=self.obs.device)
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.dones[idx]

    def state_dict(self):
        """The filled part, for a checkpoint (a full buffer of 1M Hopper transitions is about 110 MB)."""
        return {
            "pos": self.pos,
            "size": self.size,
            **{k: getattr(self, k)[: self.size] for k in ("obs", "next_obs", "actions", "rewards", "dones")},
        }

    def load_state_dict(self, state):
        for k in ("obs", "next_obs", "actions", "rewards", "dones"):
            getattr(self, k)[: state["size"]] = state[k]
        self.pos, self.size = state["pos"], state["size"]


def soft_update(target, online, tau):
    """Polyak averaging target <- tau * online + (1 - tau) * target, in place."""
    with torch.no_grad():
        for target_param, param in zip(target.parameters(), online.parameters()):
            target_param.lerp_(param, tau)


def sac_update(sac, obs, actions, rewards, next_obs, dones, args, update):
    """One critic step on a batch (normalized observations), the delayed actor and alpha steps every
    `policy_frequency` updates, then the target update. Returns (critic stats, actor stats or None)."""
    with torch.no_grad():
        next_actions, next_log_pi, _ = sac.actor.get_action(next_obs)
        min_qf_next = (
            torch.min(sac.qf1_target(next_obs, next_actions), sac.qf2_target(next_obs, next_actions))
            - sac.log_alpha.exp() * next_log_pi
        )
        next_q_value = rewards + (1 - dones) * args.gamma * min_qf_next  # done = terminated: a time limit bootstraps
    qf1_a_values, qf2_a_values = sac.qf1(obs, actions), sac.qf2(obs, actions)
    qf1_loss, qf2_loss = F.mse_loss(qf1_a_values, next_q_value), F.mse_loss(qf2_a_values, next_q_value)
    qf_loss = qf1_loss + qf2_loss
    sac.q_optimizer.zero_grad()
    qf_loss.backward()
    sac.q_optimizer.step()
    q_stats = {"losses/qf1_values": qf1_a_values.mean(), "losses/qf2_values": qf2_a_values.mean(), "losses/qf1_loss": qf1_loss,
               "losses/qf2_loss": qf2_loss, "losses/qf_loss": qf_loss / 2}
    pi_stats = None

    if update % args.policy_frequency == 0:
        for _ in range(args.policy_frequency):
            pi, log_pi, _ = sac.actor.get_action(obs)
            alpha = sac.log_alpha.exp().detach()
            latent_kl = kl_to_prior(sac.actor.get_dist(obs)).mean()
            actor_loss = (alpha * log_pi - torch.min(sac.qf1(obs, pi), sac.qf2(obs, pi))).mean() + args.beta * latent_kl
            sac.actor_optimizer.zero_grad()
            actor_loss.backward()
            sac.actor_optimizer.step()
            # alpha rises when the policy's entropy -log_pi is below the target, and falls when above it
            alpha_loss = (-sac.log_alpha.exp() * (log_pi.detach() + sac.target_entropy)).mean()
            if args.autotune:
                sac.a_optimizer.zero_grad()
                alpha_loss.backward()
                sac.a_optimizer.step()
            pi_stats = {
                "losses/actor_loss": actor_loss,
                "losses/alpha": alpha,
                "losses/alpha_loss": alpha_loss,
                "losses/entropy": -log_pi.mean(),
            }
            pi_stats["gorl/latent_kl"] = latent_kl
    soft_update(sac.qf1_target, sac.qf1, args.tau)
    soft_update(sac.qf2_target, sac.qf2, args.tau)
    detach = lambda stats: None if stats is None else {name: value.detach() for name, value in stats.items()}  # noqa: E731
    return detach(q_stats), detach(pi_stats)


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
    N = args.num_envs
    stage_steps = [int(args.total_timesteps * w / sum(args.stage_weights)) // N * N for w in args.stage_weights]
    num_steps, stage_ends = sum(stage_steps) // N, list(np.cumsum(stage_steps) // N)
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
    print(f"{run_name}: backend {backend}, device {device}, {num_steps} steps of {args.num_envs} envs, "
          f"{args.utd_ratio * args.num_envs:g} updates per step, stages of {stage_steps} steps")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    envs = VecEnv(args.env_id, backend, args.num_envs, args.seed)
    next_obs = envs.reset()
    obs_dim, action_dim = next_obs.shape[1], envs.action_dim
    obs_rms = RunningMeanStd(obs_dim).to(device)
    sac = make_sac(obs_dim, action_dim, args, device)
    # Stage 0 decodes with the identity (a fresh decoder); no RL gradient ever reaches a decoder.
    decoder = Decoder(obs_dim, action_dim, args.decoder_hidden).to(device).requires_grad_(False)
    decoders, stage, stage_start, refine_steps = [copy.deepcopy(decoder.state_dict())], 0, 0, 0

    def eval_and_log(global_step):
        video_path = f"videos/{run_name}/step_{global_step}.mp4" if args.capture_video else None
        seed = args.seed + EVAL_SEED_OFFSET
        policy = eval_policy(sac.actor, obs_rms, decoder)
        mean, std = evaluate(policy, args.env_id, backend, args.num_eval_envs, seed, device, video_path)
        log_scalars(writer, {"eval/episodic_return": mean, "eval/episodic_return_std": std}, global_step)
        return mean

    buffer_size, N = min(args.buffer_size, args.total_timesteps), args.num_envs
    rb = ReplayBuffer(buffer_size, obs_dim, action_dim, device)

    def run_modules():
        """The networks, optimizers, normalizer and replay buffer a checkpoint holds (SAC's log-alpha is in `loop`)."""
        return {"actor": sac.actor, "qf1": sac.qf1, "qf2": sac.qf2, "qf1_target": sac.qf1_target, "qf2_target": sac.qf2_target,
                "q_optimizer": sac.q_optimizer, "actor_optimizer": sac.actor_optimizer, "a_optimizer": sac.a_optimizer,
                "obs_rms": obs_rms, "rb": rb, "decoder": decoder}

    step, global_step, updates, train_time, eval_return, train_return = 0, 0, 0, 0.0, float("nan"), float("nan")
    next_eval, next_checkpoint, q_stats, pi_stats = args.eval_every, checkpoint_every, [], []
    if checkpoint is None:
        eval_return = eval_and_log(0)
    else:
        loop, next_obs = restore_checkpoint(checkpoint, envs, next_obs, run_modules())
        step, global_step, updates, train_time, eval_return, train_return, next_eval, next_checkpoint = (loop[k] for k in (
            "step", "global_step", "updates", "train_time", "eval_return", "train_return", "next_eval", "next_checkpoint"))
        with torch.no_grad():
            sac.log_alpha.copy_(loop["log_alpha"])
        stage, stage_start, refine_steps, decoders = (loop[k] for k in ("stage", "stage_start", "refine_steps", "decoders"))
    torch.set_num_threads(update_threads)  # the updates dominate; one env step between them
    step_start = time.time()
    for step in range(step + 1, num_steps + 1):
        obs = torch.as_tensor(next_obs, device=device)
        if global_step - stage_start < args.learning_starts:  # every stage starts with an empty buffer
            action = torch.randn((N, action_dim), device=device)  # random latents: the prior N(0, I)
        else:
            with torch.no_grad():
                action = sac.actor.get_action(obs_rms(obs))[0]
        with torch.no_grad():  # Phase 1: SAC's action is the latent z; the frozen decoder is part of the environment
            env_action = torch.tanh(decoder(obs, action))
        next_obs, reward, terminated, truncated, valid, ended = envs.step(env_action.cpu().numpy())
        global_step += N
        train_return = log_episodes(writer, ended, global_step, train_return)

        rb.add(obs, action, reward, envs.final_obs, terminated, valid)
        if valid.any():
            obs_rms.update(obs[torch.as_tensor(valid, device=device)])

        if global_step - stage_start >= args.learning_starts:
            # utd_ratio * N updates on average (a fractional ratio rounds per step)
            num_updates = int(global_step * args.utd_ratio) - int((global_step - N) * args.utd_ratio)
            for _ in range(num_updates):
                b_obs, b_actions, b_rewards, b_next_obs, b_dones = rb.sample(args.batch_size)
                q, pi = sac_update(sac, obs_rms(b_obs), b_actions, b_rewards, obs_rms(b_next_obs), b_dones, args, updates)
                updates += 1
                q_stats.append(q)
                pi_stats += [pi] if pi is not None else []

        log_point = crossed(global_step, N, 1000) or step in stage_ends  # log every 1000 env steps
        if log_point:
            train_time += time.time() - step_start
            for stats in (q_stats, pi_stats):
                if stats:
                    where = f"in the {len(q_stats)} updates before global_step {global_step}"
                    log_scalars(writer, finite_means(stats, lambda i: where), global_step)
            q_stats, pi_stats = [], []
            writer.add_scalar("charts/SPS", int(global_step / train_time), global_step)
            writer.add_scalar("gorl/stage", stage, global_step)
            if global_step >= next_eval or step in stage_ends:  # GoRL also evaluates at every stage end
                eval_return = eval_and_log(global_step)
                next_eval = (global_step // args.eval_every + 1) * args.eval_every
                eta = (num_steps - step) * train_time / step
                print(f"global_step={global_step} SPS={int(global_step / train_time)} updates={updates} "
                      f"train_return={train_return:.1f} eval_return={eval_return:.1f} ETA={eta / 60:.1f}min")
            step_start = time.time()
        if step in stage_ends[:-1]:
            # Phase 2, decoder refinement (App. F.2, Eq. 4): fresh rollouts of the stage's actor through the stage's
            # decoder, not the replay buffer, fit a new decoder from the fixed prior. Refit steps are not in global_step.
            refine_start = time.time()
            sample_z, seed = (lambda x: sac.actor.get_action(obs_rms(x))[0]), args.seed + REFINE_SEED_OFFSET + stage
            data, refine_returns, steps = collect_refinement_data(sample_z, decoder, args.env_id, backend,
                                                                  args.refine_num_envs, args.refine_episodes, seed, device)
            refine_steps += steps
            decoder, decoder_train_loss, decoder_val_loss = fit_decoder(data, args, device)
            decoder.requires_grad_(False)
            decoders.append(copy.deepcopy(decoder.state_dict()))
            log_scalars(writer, {"gorl/refine_return": refine_returns.mean(), "gorl/refine_steps": refine_steps,
                                 "decoder/train_loss": decoder_train_loss, "decoder/val_loss": decoder_val_loss}, global_step)
            # Stage-wise re-initialization: actor, critics and buffer restart, since a z stored under the old
            # decoder now means a different action.
            stage, stage_start = stage + 1, global_step
            sac, rb = make_sac(obs_dim, action_dim, args, device), ReplayBuffer(buffer_size, obs_dim, action_dim, device)
            actor_at_prior(sac.actor)  # the restarted latent policy is the prior, so z = 0 is its mean
            # The new decoder with the restarted actor, before any SAC update: what the refit alone gives.
            policy, seed = eval_policy(sac.actor, obs_rms, decoder), args.seed + EVAL_SEED_OFFSET
            refit_return = evaluate(policy, args.env_id, backend, args.num_eval_envs, seed, device)[0]
            writer.add_scalar("gorl/eval_after_refit", refit_return, global_step)
            print(f"stage {stage}: refit on {len(data[0])} steps of {len(refine_returns)} episodes "
                  f"(return {refine_returns.mean():.1f}), decoder loss train {decoder_train_loss:.4f} "
                  f"val {decoder_val_loss:.4f}, eval before {eval_return:.1f} after {refit_return:.1f} "
                  f"({time.time() - refine_start:.0f}s)")
            step_start = time.time()  # the refit is not training time
        if log_point and (global_step >= next_checkpoint or step in stage_ends):
            next_checkpoint = (global_step // checkpoint_every + 1) * checkpoint_every
            loop = {"step": step, "global_step": global_step, "updates": updates, "train_time": train_time,
                    "eval_return": eval_return, "train_return": train_return, "next_eval": next_eval,
                    "next_checkpoint": next_checkpoint, "log_alpha": sac.log_alpha.detach().clone(),
                    "stage": stage, "stage_start": stage_start, "refine_steps": refine_steps, "decoders": decoders}
            save_checkpoint(checkpoint_path, make_checkpoint(args, backend, run_name, envs, next_obs, run_modules(), loop))
            step_start = time.time()  # writing the checkpoint is not training time

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        save_checkpoint(model_path, make_checkpoint(args, backend, run_name, envs, next_obs, run_modules(), loop))
        print(f"model saved to {model_path}")
    envs.close()
    writer.close()
