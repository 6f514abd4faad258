"""Mechanisms each test names and fails without: the update direction of FPO and DPPO, DPPO's step weights and
cosine-schedule posterior, the rollout's segment layout and ratio 1 on the first minibatch, the shared skeleton,
and seeded runs repeating exactly.

The loop-level tests run a script's main in this process (runpy, so no new interpreter) and read what the loop
leaves in its globals (agent, b_obs, idx, advantages, ...) after a one-minibatch, one-epoch update: the loss
they check is the script's own, not a copy of it. InvertedPendulum-v5 (both backends) keeps runs cheap: its
untrained episodes last tens of steps, so evaluations are short and episode ends occur inside every rollout."""
import ast
import collections
import difflib
import os
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import run_main, BACKENDS, ROOT, load_script, only_run_dir, read_scalars

PPO_FAMILY = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py"]
ALL_SCRIPTS = PPO_FAMILY + ["sac_gaussian.py", "gorl_sac_diff.py"]
FAST_ENV = ["--env-id", "InvertedPendulum-v5", "--env-backend", "dm_control", "--num-eval-envs", "1", "--eval-every", "100000"]
ONE_UPDATE = ["--num-minibatches", "1", "--update-epochs", "1"]  # the logged/left-over minibatch is the first one
NO_REFIT = {"gorl_ppo_fm.py": ["--stage-weights", "1"], "gorl_ppo_diff.py": ["--stage-weights", "1"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Batches of 1-16 rows: one intra-op thread is faster, and on a shared 2-core machine two threads spin-wait
    # each other into milliseconds per tiny matmul.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_once(one_thread, tmp_path_factory):
    """One run per (script, args) for the whole module: several tests read the same run."""
    cache = {}

    def run(name, *args):
        if (name, args) not in cache:
            with pytest.MonkeyPatch.context() as mp:
                cache[name, args] = run_main(name, list(args), tmp_path_factory.mktemp(name.replace(".py", "")), mp)
        return cache[name, args]

    return run


# ---------------------------------------------------------------- 1. FPO and DPPO update direction
# After one Adam step on the script's own loss (ratio 1 before it), the advantage-weighted change of the policy's
# per-action objective is of the right sign: actions with positive advantage get a lower CFM loss (FPO) / higher
# step log-probs (DPPO), negative ones the opposite. At ratio 1 the surrogate's gradient is -mean(A grad ratio), and
# Adam's first step is about -lr sign(grad) per parameter (the critic has its own), so to first order the step changes
# sum(A * dL) by -lr * sum|grad| < 0. (Each half alone need not move: a shared network can lower all the losses.)
# A flipped log-ratio or surrogate flips the sign.
@pytest.mark.parametrize("average", [True, False], ids=["average-losses-before-exp", "per-sample-ratio"])
def test_fpo_update_lowers_the_cfm_loss_of_positive_advantage_actions(run_once, average):
    g = run_once("fpo.py", *FAST_ENV, *ONE_UPDATE, "--num-envs", "4", "--unroll-length", "8", "--batch-size", "8", "--total-timesteps", "64",
                 "--average-losses-before-exp" if average else "--no-average-losses-before-exp")
    idx, agent, segments = g["update"]["idx"], g["agent"], g["segments"]
    assert g["iteration"] == 1 and len(idx) == 8  # one update on all 8 segments
    with torch.no_grad():
        after = agent.cfm_loss(segments["obs"][idx][:, :-1], segments["actions"][idx], segments["cfm_eps"][idx],
                               segments["cfm_t"][idx])  # [B, T, S]
    change = after - segments["old_losses"][idx]
    advantages = g["update"]["advantages"]  # as the loss used them: [B, T], or [B, T, 1] with per-sample ratios
    change = change.mean(-1) if average else change
    assert (advantages > 0).any() and (advantages < 0).any()
    weighted = (advantages * change).sum().item()
    assert weighted < 0, f"advantage-weighted CFM-loss change {weighted} >= 0: the update moved the losses the wrong way"


def test_dppo_update_raises_the_step_logprobs_of_positive_advantage_actions(run_once):
    g = run_once("dppo.py", *FAST_ENV, *ONE_UPDATE, "--num-envs", "4", "--unroll-length", "8", "--batch-size", "8", "--total-timesteps", "64",
                 "--gamma-denoising", "0.5")
    idx, agent, segments = g["update"]["idx"], g["agent"], g["segments"]
    assert g["iteration"] == 1 and len(idx) == 8
    with torch.no_grad():
        after = agent.chain_logprobs(segments["obs"][idx][:, :-1], segments["actions"][idx])  # [B, T, K]
    change = after - segments["logprobs"][idx]
    advantages = g["update"]["advantages"]  # [B, T, K]: the transition's advantage times the step's weight, as in the loss
    assert (advantages > 0).any() and (advantages < 0).any()
    weighted = (advantages * change).sum().item()
    assert weighted > 0, f"advantage-weighted step-log-prob change {weighted} <= 0: the update moved the log-probs the wrong way"


# ---------------------------------------------------------------- 2. DPPO step weights and cosine schedule
def test_dppo_step_weights_give_the_action_step_weight_one(run_once):
    g = run_once("dppo.py", *FAST_ENV, *ONE_UPDATE, "--num-envs", "4", "--unroll-length", "8", "--batch-size", "8", "--total-timesteps", "64",
                 "--gamma-denoising", "0.5")
    K, agent = g["update"]["K"], g["agent"]
    # Columns are the chain's steps, noisiest first: column j is the step from x_{K-j} to x_{K-j-1}, column K-1 the
    # step that produces the action. Check that on the agent itself...
    obs = torch.randn(16, g["obs_dim"])
    with torch.no_grad():
        chain, logprobs, action = agent.act(obs)
        last = agent.step_dist(obs, chain[:, K - 1], torch.zeros(16, 1)).log_prob(chain[:, K]).clamp(-5.0, 2.0).mean(-1)
    torch.testing.assert_close(action, chain[:, K].clamp(-1.0, 1.0), msg=lambda m: f"the action is not the chain's last state: {m}")
    torch.testing.assert_close(logprobs[:, K - 1], last, msg=lambda m: f"log-prob column K-1 is not the step that produces the action: {m}")
    # ...then the weights: gamma^(K-1-j), so the action's step has weight 1 and the noisiest gamma^(K-1).
    expected = 0.5 ** torch.arange(K - 1, -1, -1, dtype=torch.float32)
    weights = g["update"]["step_weights"]
    torch.testing.assert_close(weights, expected, rtol=0, atol=0, msg=lambda m: f"step weights {weights.tolist()}: {m}")
    assert weights[-1] == 1.0
    # ...and the loss used them: the weighted advantages of a transition are its advantage times the weights.
    advantages = g["update"]["advantages"]
    base = advantages[..., -1:]
    nonzero = base.squeeze(-1) != 0
    assert nonzero.any()
    torch.testing.assert_close(advantages[nonzero] / base[nonzero], expected.expand(int(nonzero.sum()), K), msg=lambda m: f"weights applied in the loss: {m}")


def cosine_schedule(K, s=0.008):
    """DDPM-improved / DPPO cosine schedule, float64: alpha_bar(t) = f(t) / f(0), f(t) = cos((t / K + s) / (1 + s) pi / 2)^2,
    betas = 1 - alpha_bar(t + 1) / alpha_bar(t) clipped to [0, 0.999], and the discrete alphas_cumprod = cumprod(1 - betas)."""
    t = np.arange(K + 1, dtype=np.float64)
    f = np.cos((t / K + s) / (1 + s) * np.pi / 2) ** 2
    alphas_cumprod_continuous = f / f[0]
    betas = np.clip(1 - alphas_cumprod_continuous[1:] / alphas_cumprod_continuous[:-1], 0, 0.999)
    alpha_bar = np.cumprod(1 - betas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    return betas, alpha_bar, alpha_bar_prev


class Oracle(torch.nn.Module):
    """Stands in for the epsilon network: predicts exactly the noise it is given."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, inputs):
        return self.eps


@pytest.mark.parametrize("K", [10, 5])
def test_dppo_schedule_is_cosine_and_posterior_mean_is_q_of_the_true_noise(K):
    dppo = load_script("dppo.py")
    agent = dppo.Agent(3, 2, denoising_steps=K, min_std=1e-4)
    betas, alpha_bar, alpha_bar_prev = cosine_schedule(K)
    torch.testing.assert_close(agent.alpha_bar.double(), torch.as_tensor(alpha_bar), rtol=1e-6, atol=0, msg=lambda m: f"alpha_bar is not the cosine schedule's: {m}")
    coef1 = betas * np.sqrt(alpha_bar_prev) / (1 - alpha_bar)  # x_0's coefficient in the posterior mean
    coef2 = (1 - alpha_bar_prev) * np.sqrt(1 - betas) / (1 - alpha_bar)  # x_t's
    variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
    assert coef1[0] == pytest.approx(1.0) and coef2[0] == pytest.approx(0.0)  # the last step lands on x_0 itself
    torch.manual_seed(0)
    obs = torch.randn(64, 3)
    for t in range(K):
        x0 = torch.rand(64, 2, dtype=torch.float64) * 1.8 - 0.9  # inside [-1, 1], where the x_0 clamp does nothing
        eps = torch.randn(64, 2, dtype=torch.float64)
        x_t = np.sqrt(alpha_bar[t]) * x0 + np.sqrt(1 - alpha_bar[t]) * eps
        agent.actor = Oracle(eps.float())
        dist = agent.step_dist(obs, x_t.float(), torch.full((64, 1), float(t)))
        expected_mean = coef1[t] * x0 + coef2[t] * x_t
        torch.testing.assert_close(dist.mean.double(), expected_mean, rtol=1e-4, atol=1e-4, msg=lambda m: f"posterior mean at step {t}: {m}")
        expected_std = max(np.sqrt(variance[t]), 1e-4)  # floored at --min-std (the last step's variance is 0)
        torch.testing.assert_close(dist.stddev.double(), torch.full((64, 2), expected_std, dtype=torch.float64), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"posterior std at step {t}: {m}")


# ---------------------------------------------------------------- 3. rollout layout and ratio 1
class TickEnvs:
    """Stands in for gymnasium's SyncVectorEnv: env i's observation is [i, its step count]; a step's reward is
    100 i + the step count before it; every 5th step of an env is a truncation (the count goes on). Records the
    action each env received at each count."""

    instances = []

    def __init__(self, env_fns, autoreset_mode=None):
        self.n = len(env_fns)
        self.tick = np.zeros(self.n)
        self.received = {}
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.envs = [types.SimpleNamespace(spec=types.SimpleNamespace(max_episode_steps=1000))]
        self.unwrapped, self.metadata = self, {"autoreset_mode": autoreset_mode}  # what gym.make_vec sets and checks
        TickEnvs.instances.append(self)

    def observation(self):
        return np.stack([np.arange(self.n), self.tick], 1).astype(np.float32)

    def reset(self, seed=None):
        self.tick[:] = 0
        return self.observation(), {}

    def step(self, action):
        for i in range(self.n):
            self.received[i, int(self.tick[i])] = np.array(action[i])
        reward = 100.0 * np.arange(self.n) + self.tick
        self.tick += 1
        obs = self.observation()
        return obs, reward, np.zeros(self.n, dtype=bool), self.tick % 5 == 0, {"final_obs": obs.copy()}

    def close(self):
        pass


ENV_ACTION = {  # what each script sends the env for the stored action (stage 0: GoRL's decoder is the identity)
    "ppo_gaussian.py": lambda g, obs, a: torch.tanh(a),
    "gorl_ppo_fm.py": lambda g, obs, a: torch.tanh(g["decoder"](obs.flatten(0, 1), a.flatten(0, 1))).view_as(a),
    "gorl_ppo_diff.py": lambda g, obs, a: torch.tanh(g["decoder"](obs.flatten(0, 1), a.flatten(0, 1))).view_as(a),
    "fpo.py": lambda g, obs, a: torch.tanh(a),
    "dppo.py": lambda g, obs, a: a[..., -1, :].clamp(-1.0, 1.0),
}


@pytest.mark.parametrize("name", PPO_FAMILY)
def test_segments_are_consecutive_steps_of_one_env(tmp_path, monkeypatch, name):
    # b_obs[s, t + 1] must be the observation after b_obs[s, t] in the same env, and the reward, mask and action at
    # [s, t] those of that step. One iteration, so the normalizer is still the identity and b_obs is the raw obs.
    monkeypatch.setattr(gym.vector, "SyncVectorEnv", TickEnvs)
    monkeypatch.setattr(TickEnvs, "instances", [])
    T, N, U = 4, 2, 2
    g = run_main(name, ["--env-id", "InvertedPendulum-v5", "--env-backend", "dm_control", "--num-envs", str(N), "--unroll-length", str(T),
                        "--batch-size", "2", "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", str(U * N * T),
                        "--num-eval-envs", "1", "--eval-every", "100000", "--reward-scale", "10", *NO_REFIT.get(name, [])], tmp_path, monkeypatch)
    train_envs = TickEnvs.instances[0]  # created before the first evaluation's
    assert train_envs.n == N and g["iteration"] == 1
    b_obs = g["segments"]["obs"]
    assert b_obs.shape == (U * N, T + 1, 2)
    env, tick = b_obs[..., 0], b_obs[..., 1]
    assert (env == env[:, :1]).all(), f"a segment mixes envs: {env.tolist()}"
    assert (tick == tick[:, :1] + torch.arange(T + 1)).all(), f"a segment's steps are not consecutive: {tick.tolist()}"
    assert sorted(zip(env[:, 0].tolist(), tick[:, 0].tolist())) == sorted((n, u * T) for n in range(N) for u in range(U))
    torch.testing.assert_close(g["segments"]["rewards"], 10.0 * (100 * env[:, :-1] + tick[:, :-1]), rtol=0, atol=0)  # scale 10
    torch.testing.assert_close(g["segments"]["masks"], ((tick[:, :-1] + 1) % 5 != 0).float(), rtol=0, atol=0)  # truncations
    with torch.no_grad():
        sent = ENV_ACTION[name](g, b_obs[:, :-1], g["segments"]["actions"])
    received = torch.as_tensor(np.stack([[train_envs.received[int(e), int(k)] for e, k in zip(es, ks)] for es, ks in zip(env[:, :-1], tick[:, :-1])]))
    torch.testing.assert_close(sent.double(), received.double(), rtol=0, atol=1e-6)  # the env layer maps actions in float64


@pytest.mark.parametrize("name", ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py"])
def test_first_minibatch_after_a_rollout_has_ratio_one(tmp_path, monkeypatch, name):
    # One epoch of one minibatch: each iteration's logged approx-KL and clip fraction are those of the first
    # minibatch, computed from the stored log-probs through the whole storage/reshape/normalizer path. Three
    # iterations, so the normalizer has moved; GoRL runs two stages, so the last ones follow a refit and encoder reset.
    extra = ["--stage-weights", "1", "2", "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "1", "--decoder-batch-size", "256"]
    g = run_main(name, [*FAST_ENV, *ONE_UPDATE, "--num-envs", "2", "--unroll-length", "8", "--batch-size", "4",
                        "--total-timesteps", "96", *(extra if "gorl" in name else [])], tmp_path, monkeypatch)
    s = read_scalars(only_run_dir(tmp_path))
    assert len(s["losses/approx_kl"]) == 3
    assert all(abs(v) < 1e-6 for _, v in s["losses/approx_kl"]), s["losses/approx_kl"]
    assert all(v == 0 for _, v in s["losses/clipfrac"]), s["losses/clipfrac"]
    # approx-KL is second order in the log-ratio (a log-ratio of 2e-4 logs as 2e-9, float noise), so also read the
    # last iteration's log-ratio itself: float noise is ~4e-7.
    logratio = g["update"]["logratio"]
    assert logratio.abs().max() < 1e-5, f"first-minibatch log-ratio {logratio.abs().max().item()} at iteration {g['iteration']}"


# ---------------------------------------------------------------- 4. the shared skeleton
MAY_DIFFER = {  # name -> the scripts whose version is their own by design; all others holding the name must agree
    "Args": set(ALL_SCRIPTS),  # each script's own hyperparameters
    "main": set(ALL_SCRIPTS),  # each script's training loop
    "presets": set(ALL_SCRIPTS),  # each script's named settings
    "ppo_update": {"ppo_gaussian.py", "fpo.py", "dppo.py"},  # each policy's loss; GoRL's two PPO scripts must agree
    "Sample": {"fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"},  # what each policy's act returns
    "Agent": {"fpo.py", "dppo.py"},  # flow and diffusion policies; PPO and both GoRL PPOs share the Gaussian agent
    "Decoder": {"gorl_ppo_fm.py"},  # flow-matching decoder; the two diffusion decoders must agree
    "sac_update": {"gorl_sac_diff.py"},  # adds GoRL's KL-to-prior term to SAC's actor loss
    "kl_to_prior": {"gorl_sac_diff.py"},  # the analytic KL only; the PPO scripts also have the release's moments form
    # each script's evaluation policy and its loader for --eval-checkpoint; the two GoRL PPO scripts' must agree
    "eval_policy": {"ppo_gaussian.py", "fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"},
    "load_policy": {"ppo_gaussian.py", "fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"},
}
SKELETON = {  # names every script of the group must have, so the comparison below cannot pass vacuously
    "fail": ALL_SCRIPTS, "dmc_task_ids": ALL_SCRIPTS, "resolve_backend": ALL_SCRIPTS, "VecEnv": ALL_SCRIPTS, "RunningMeanStd": ALL_SCRIPTS,
    "layer_init": ALL_SCRIPTS, "mlp": ALL_SCRIPTS, "evaluate": ALL_SCRIPTS, "load_checkpoint": ALL_SCRIPTS, "setup": ALL_SCRIPTS,
    "compute_gae": PPO_FAMILY, "to_segments": PPO_FAMILY, "normalize_advantages": PPO_FAMILY, "explained_variance": PPO_FAMILY,
    "Agent": PPO_FAMILY, "check_args": ALL_SCRIPTS, "check_memory": ALL_SCRIPTS, "crossed": ALL_SCRIPTS, "restore": ALL_SCRIPTS,
    "log_scalars": ALL_SCRIPTS, "log_episodes": ALL_SCRIPTS, "finite_means": ALL_SCRIPTS, "save_checkpoint": ALL_SCRIPTS,
    "kl_to_prior": ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"], "fit_decoder": ["gorl_ppo_fm.py", "gorl_ppo_diff.py",
    "gorl_sac_diff.py"], "collect_refinement_data": ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"],
    "refine_decoder": ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"], "parse_args": ALL_SCRIPTS, "presets": ALL_SCRIPTS,
    "eval_after_refit": ["gorl_ppo_fm.py", "gorl_ppo_diff.py", "gorl_sac_diff.py"], "ppo_update": PPO_FAMILY,
}


def top_level_definitions(name):
    """{name: source} of a script's top-level functions and classes, decorators included."""
    with open(os.path.join(ROOT, name)) as f:
        source = f.read()
    lines = source.splitlines()
    return {node.name: "\n".join(lines[min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1 : node.end_lineno])
            for node in ast.parse(source).body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_shared_skeleton_is_byte_identical_across_scripts():
    definitions = {name: top_level_definitions(name) for name in ALL_SCRIPTS}
    for definition, scripts in SKELETON.items():
        missing = [s for s in scripts if definition not in definitions[s]]
        assert not missing, f"{definition} missing from {missing}"
    holders = collections.defaultdict(list)
    for script, defs in definitions.items():
        for definition in defs:
            holders[definition].append(script)
    drift = []
    for definition, scripts in holders.items():
        scripts = [s for s in scripts if s not in MAY_DIFFER.get(definition, ())]
        reference = scripts[0] if scripts else None
        for other in scripts[1:]:
            if definitions[other][definition] != definitions[reference][definition]:
                diff = difflib.unified_diff(definitions[reference][definition].splitlines(), definitions[other][definition].splitlines(),
                                            reference, other, lineterm="", n=0)
                drift.append(f"{definition}: {other} differs from {reference}\n" + "\n".join(list(diff)[:12]))
    assert not drift, "shared skeleton drifted:\n" + "\n".join(drift)


# ---------------------------------------------------------------- 5. same seed, same numbers
TINY = ["--env-id", "InvertedPendulum-v5", "--num-envs", "2", "--unroll-length", "8", "--batch-size", "2", "--num-minibatches", "8",
        "--update-epochs", "1", "--num-eval-envs", "2", "--eval-every", "100000", "--total-timesteps", "256", "--seed", "3"]
TINY_REFIT = ["--stage-weights", "1", "1", "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "1", "--decoder-batch-size", "256"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PPO_FAMILY)
def test_same_seed_gives_the_same_numbers(tmp_path, monkeypatch, name, backend):
    # Two 2-iteration runs with one seed, on the CPU, in one process: the second starts from whatever RNG state the
    # first left, so only the script's own seeding can make them agree. Every logged number but the timings must be
    # the same. GoRL's runs include a decoder refit.
    scalars = []
    for run in ["a", "b"]:
        (tmp_path / run).mkdir()
        run_main(name, [*TINY, "--env-backend", backend, "--no-cuda", *(TINY_REFIT if "gorl" in name else [])], tmp_path / run, monkeypatch)
        s = read_scalars(only_run_dir(tmp_path / run))
        scalars.append({tag: values for tag, values in s.items() if not (tag.startswith("perf/") or tag == "charts/SPS")})
    first, second = scalars
    assert "losses/policy_loss" in first and "losses/value_loss" in first and "eval/episodic_return" in first
    assert len(first["losses/policy_loss"]) == 2
    assert first.keys() == second.keys()
    different = {tag: (first[tag], second[tag]) for tag in first if first[tag] != second[tag]}
    assert not different, f"same seed, different numbers: {different}"
