"""The environment layer of the shared skeleton (dmc_task_ids, resolve_backend, VecEnv, evaluate): every DMC task on
every backend that has it, unbounded actuators, time limits, termination vs truncation, Gymnasium ids on EnvPool."""
import ast
import os
import types

import gymnasium as gym
import numpy as np
import pytest
import torch
from dm_control import suite

from conftest import BACKENDS, ROOT, has_envpool, load_script

pg = load_script("ppo_gaussian.py")
DMC_TASKS = sorted(pg.dmc_task_ids())
PPO_FAMILY = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py"]
needs_envpool = pytest.mark.skipif(not has_envpool(), reason="envpool not installed")


def spaces(envs):
    """(action space, observation space) of one env of a VecEnv, whichever the backend."""
    if envs.backend == "envpool":
        return envs.envs.action_space, envs.envs.observation_space
    return envs.envs.single_action_space, envs.envs.single_observation_space


def layout(envs):
    """{entry: size} of the flat observation, in the order VecEnv concatenates the entries (dm_control's, sorted)."""
    if envs.backend == "envpool" and isinstance(spaces(envs)[1], gym.spaces.Dict):
        return {k: int(np.prod(spaces(envs)[1][k].shape)) for k in envs.keys}
    inner = envs.envs.envs[0].env  # under FlattenObservation
    space = inner.observation_space
    return {k: int(np.prod(space[k].shape)) for k in space.keys()} if isinstance(space, gym.spaces.Dict) else {"obs": space.shape[0]}


class RecordStep:
    """Stands between a VecEnv and its backend's vector env, recording the actions the VecEnv sends."""

    def __init__(self, inner):
        self.inner, self.sent = inner, []

    def step(self, action):
        self.sent.append(np.array(action, copy=True))
        return self.inner.step(action)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def sent_actions(envs, actions):
    """What the backend receives for each policy action in `actions` [n, action_dim] (one env, stepped n times)."""
    envs.envs = RecordStep(envs.envs)
    envs.reset()
    for a in actions:
        envs.step(a[None])
    sent, envs.envs = np.concatenate(envs.envs.sent), envs.envs.inner
    return sent


# ---------------------------------------------------------------- every DMC task
def test_every_dmc_task_is_on_envpool_under_auto():
    assert len(DMC_TASKS) == len(suite.ALL_TASKS)
    if has_envpool():
        assert {t: pg.resolve_backend(t, "auto") for t in DMC_TASKS} == {t: "envpool" for t in DMC_TASKS}


# CI steps the paper's six tasks and one of each special case (EnvPool's padded observations, unbounded LQR actuators,
# Quadruped's bounds, EnvPool's HumanoidCMU ids, a DMC task with terminations-free 1000-step episodes); `pytest -m slow`
# steps all 51 tasks of dm_control.suite.ALL_TASKS.
CI_TASKS = {"CheetahRun", "FingerSpin", "FingerTurnHard", "FishSwim", "HopperStand", "WalkerWalk", "HumanoidStand", "LqrLqr21",
            "QuadrupedWalk", "HumanoidCmuStand", "CartpoleBalance", "FishUpright"}


@pytest.mark.parametrize("env_id", [t if t in CI_TASKS else pytest.param(t, marks=pytest.mark.slow) for t in DMC_TASKS])
def test_every_dmc_task_steps_to_its_time_limit(env_id):
    """Each task on each backend that has it: actions in [-1, 1] map into the env's (finite) bounds, the flat
    observation has the same entries and sizes on both backends, and the episode is truncated at step 1000
    (not before, never terminated). dm_control's QuadrupedEscape draws its terrain with OpenGL at every reset, so
    without a GL backend (MUJOCO_GL=disable, the scripts' default without --capture-video) it runs on EnvPool only."""
    layouts = {}
    for backend in ["dm_control"] + (["envpool"] if has_envpool() else []):
        no_gl = backend == "dm_control" and env_id == "QuadrupedEscape" and os.environ.get("MUJOCO_GL") == "disable"
        assert pg.resolve_backend(env_id, backend) == backend
        envs = pg.VecEnv(env_id, backend, 1, seed=0)
        action_space, _ = spaces(envs)
        layouts[backend] = layout(envs)
        assert envs.max_episode_steps == 1000
        if no_gl:
            envs.close()
            continue
        rng = np.random.default_rng(0)
        actions = rng.uniform(-1, 1, (1000, 1, envs.action_dim)).astype(np.float32)
        inputs = np.concatenate([-np.ones((1, envs.action_dim)), np.ones((1, envs.action_dim)), np.zeros((1, envs.action_dim)),
                                 actions[:16, 0]])
        mapped = sent_actions(envs, inputs)
        low, high = action_space.low.astype(np.float64), action_space.high.astype(np.float64)
        bounded = (np.abs(low) < 1e6) & (np.abs(high) < 1e6)
        np.testing.assert_allclose(mapped, np.where(bounded, low + 0.5 * (inputs + 1) * (high - low), inputs), atol=1e-12)
        assert envs.identity == np.array_equal(mapped, inputs), backend  # the fast path exactly where it maps nothing
        assert np.isfinite(mapped).all() and (mapped >= action_space.low).all() and (mapped <= action_space.high).all(), (backend, mapped)
        obs = envs.reset()
        assert obs.shape == (1, sum(layouts[backend].values())) and np.isfinite(obs).all()
        for t in range(1, 1001):
            obs, reward, terminated, truncated, valid, (returns, lengths) = envs.step(actions[t - 1])
            assert valid.all() and not terminated.any() and (t == 1000 or not truncated.any()), (backend, t)
        assert truncated.all() and list(lengths) == [1000] and np.isfinite(obs).all() and np.isfinite(returns).all(), backend
        envs.close()
    assert len({tuple(d.items()) for d in layouts.values()}) == 1, layouts


# ---------------------------------------------------------------- HumanoidCMU on EnvPool
@needs_envpool
def test_humanoid_cmu_resolves_to_envpool(capsys):
    for task, pool_id in [("HumanoidCmuStand", "HumanoidCMUStand-v1"), ("HumanoidCmuRun", "HumanoidCMURun-v1"),
                          ("CheetahRun", "CheetahRun-v1"), ("Hopper-v5", "Hopper-v5")]:
        assert pg.resolve_backend(task, "auto") == "envpool"
        assert capsys.readouterr().out == f"backend auto -> envpool: EnvPool has the task ({pool_id})\n"
    pg.VecEnv("HumanoidCmuRun", "envpool", 1, seed=0).close()


# ---------------------------------------------------------------- unbounded actuators, capped evaluation
@pytest.mark.parametrize("backend", BACKENDS)
def test_lqr_actions_pass_through_and_evaluation_ends(backend):
    envs = pg.VecEnv("LqrLqr21", backend, 1, seed=0)
    action_space, _ = spaces(envs)
    assert (action_space.high >= 1e9).all()  # LQR's actuators are +-1e10
    a = np.random.default_rng(0).uniform(-1, 1, (5, envs.action_dim)).astype(np.float32)
    np.testing.assert_array_equal(sent_actions(envs, a), a)  # identity, not [-1, 1] -> [-1e10, 1e10]
    envs.close()
    calls = []

    def policy(x):
        calls.append(len(x))
        return torch.zeros(len(x), 1)

    mean, std = pg.evaluate(policy, "LqrLqr21", backend, 2, 0, "cpu")
    assert len(calls) == 1000 and np.isfinite([mean, std]).all()


def test_evaluation_stops_at_the_time_limit_even_if_episodes_do_not(monkeypatch):
    """A task whose episodes outlast VecEnv.max_episode_steps (LQR with the limit patched to 50) still evaluates in 50 steps."""
    init = pg.VecEnv.__init__

    def short_limit(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.max_episode_steps = 50

    monkeypatch.setattr(pg.VecEnv, "__init__", short_limit)
    calls = []
    pg.evaluate(lambda x: calls.append(1) or torch.zeros(len(x), 1), "LqrLqr21", "dm_control", 1, 0, "cpu")
    assert len(calls) == 50


def test_gymnasium_time_limit_comes_from_the_env_that_runs_it(capsys):
    for backend in ["dm_control"] + (["envpool"] if has_envpool() else []):
        envs = pg.VecEnv("Hopper-v5", backend, 1, seed=0)
        assert envs.max_episode_steps == gym.spec("Hopper-v5").max_episode_steps == 1000
        envs.close()
    if has_envpool():  # Gymnasium 1.x keeps Hopper-v3 as a stub without a limit; EnvPool's port has one
        assert gym.spec("Hopper-v3").max_episode_steps is None and pg.resolve_backend("Hopper-v3", "auto") == "envpool"
        envs = pg.VecEnv("Hopper-v3", "envpool", 1, seed=0)
        assert envs.max_episode_steps == 1000
        envs.close()
    gym.register("EndlessPendulum-v0", entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv", max_episode_steps=None)
    try:
        with pytest.raises(SystemExit) as e:
            pg.resolve_backend("EndlessPendulum-v0", "auto")
    finally:
        del gym.registry["EndlessPendulum-v0"]
    assert e.value.code == 2 and "has no time limit" in capsys.readouterr().err


# ---------------------------------------------------------------- item 3: termination on the time-limit step
def mask_expressions():
    """{script: mask(valid, terminated, truncated, release)}: the two statements each PPO-family main loop runs to set
    `masks[unroll, t]` (the truncation it masks, then the mask), compiled from the script and run on the given flags."""
    out = {}
    for name in PPO_FAMILY:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        found = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(ast.unparse(t) in ("truncation", "masks[unroll, t]")
                                                                                for t in n.targets)]
        assert [ast.unparse(n.targets[0]) for n in found] == ["truncation", "masks[unroll, t]"], name
        statements = ast.Module([found[0], ast.Assign([ast.Name("mask", ast.Store())], found[1].value)], [])
        code = compile(ast.fix_missing_locations(statements), name, "exec")

        def mask(valid, terminated, truncated, release=False, code=code):
            namespace = {"valid": valid, "terminated": terminated, "truncated": truncated,
                         "args": types.SimpleNamespace(mask_time_limit_terminations=release)}
            exec(code, {}, namespace)
            return namespace["mask"]

        out[name] = mask
    return out


def test_termination_on_the_time_limit_step_stays_a_termination():
    """Gymnasium's TimeLimit reports both flags when Hopper falls on the last allowed step: every PPO-family loop
    must keep that step (mask 1, so GAE sees the termination), mask a pure truncation and EnvPool's reset step."""
    envs = pg.VecEnv("Hopper-v5", "dm_control", 1, seed=0)
    envs.reset()
    zero = np.zeros((1, 3), np.float32)
    for fall in range(1, 1001):  # zero actions: the hopper falls after a few dozen steps
        if envs.step(zero)[2].any():
            break
    envs.close()
    envs = pg.VecEnv("Hopper-v5", "dm_control", 1, seed=0)
    time_limit = envs.envs.envs[0]
    while not isinstance(time_limit, gym.wrappers.TimeLimit):
        time_limit = time_limit.env
    time_limit._max_episode_steps = fall  # the TimeLimit wrapper now ends the episode on the falling step
    envs.reset()
    for t in range(fall):
        _, _, terminated, truncated, valid, _ = envs.step(zero)
    envs.close()
    assert terminated.all() and truncated.all() and valid.all()
    cases = {  # (valid, terminated, truncated) -> mask
        (True, True, True): 1.0, (True, False, True): 0.0, (True, True, False): 1.0, (True, False, False): 1.0,
        (False, False, False): 0.0, (False, True, True): 0.0,
    }
    for name, mask in mask_expressions().items():
        assert float(mask(valid, terminated, truncated)[0]) == 1.0, name
        assert float(mask(valid, terminated, truncated, release=True)[0]) == 0.0, name  # --mask-time-limit-terminations
        for (v, te, tr), want in cases.items():
            assert float(mask(np.array([v]), np.array([te]), np.array([tr]))[0]) == want, (name, v, te, tr)
            # The release masks every truncation, the time-limit step's termination too; the rest is the same.
            want = 0.0 if tr else want
            assert float(mask(np.array([v]), np.array([te]), np.array([tr]), release=True)[0]) == want, (name, v, te, tr)


@needs_envpool
def test_envpool_reports_a_termination_on_the_time_limit_step_as_a_truncation():
    """What the comment at VecEnv.step says: EnvPool cannot report both flags (it has terminated = done & ~truncated)."""
    import envpool

    def first_end(max_episode_steps=1000):
        env = envpool.make("Hopper-v5", env_type="gymnasium", num_envs=1, seed=0, max_episode_steps=max_episode_steps)
        env.reset()
        for t in range(1, 1001):
            _, _, terminated, truncated, _ = env.step(np.zeros((1, 3)))
            if terminated[0] or truncated[0]:
                return t, bool(terminated[0]), bool(truncated[0])

    fall, terminated, truncated = first_end()
    assert terminated and not truncated and fall < 1000
    assert first_end(fall) == (fall, False, True)


# ---------------------------------------------------------------- item 4: Gymnasium ids on EnvPool
@needs_envpool
@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"])
def test_envpool_port_of_gymnasium_task_is_the_same_task(env_id):
    """Under `auto` a Gymnasium id runs on EnvPool, so EnvPool's port must be Gymnasium's task. The initial state
    of EnvPool's env is copied into Gymnasium's (the observation holds qpos[1:] and qvel; x is unobserved and
    changes neither dynamics nor reward), then both get the same actions through VecEnv: observations, rewards
    and end flags agree to rounding over 40 steps or the episode, whichever is shorter (afterwards rounding
    differences grow chaotically: on HalfCheetah from 1e-15 at step 1 to 1e-3 by step ~60). The reset
    distributions agree in mean and spread over 256 resets."""
    assert pg.resolve_backend(env_id, "auto") == "envpool"
    ep, dm = pg.VecEnv(env_id, "envpool", 1, seed=0), pg.VecEnv(env_id, "dm_control", 1, seed=0)
    assert ep.max_episode_steps == dm.max_episode_steps == ep.envs.spec.config.max_episode_steps
    (ep_actions, ep_obs), (dm_actions, dm_obs) = spaces(ep), spaces(dm)
    np.testing.assert_array_equal(ep_actions.low, dm_actions.low)
    np.testing.assert_array_equal(ep_actions.high, dm_actions.high)
    assert ep_obs.shape == dm_obs.shape
    for seed in range(3):
        raw, _ = ep.envs.reset()  # float64, before VecEnv's float32 flattening
        dm.reset()
        sim = dm.envs.envs[0].unwrapped
        nq = sim.model.nq
        sim.set_state(np.concatenate([sim.init_qpos[:1], raw[0][: nq - 1]]), raw[0][nq - 1 :])
        rng = np.random.default_rng(seed)
        for t in range(1, 41):
            action = rng.uniform(-1, 1, (1, ep.action_dim)).astype(np.float32)
            a, b = ep.step(action), dm.step(action)
            # final_obs: Gymnasium's autoreset already returned the next episode's first observation at an episode end
            np.testing.assert_allclose(ep.final_obs, dm.final_obs, rtol=0, atol=1e-4, err_msg=f"observation, seed {seed} step {t}")
            np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-4, err_msg=f"reward, seed {seed} step {t}")
            for i, flag in [(2, "terminated"), (3, "truncated"), (4, "valid")]:
                np.testing.assert_array_equal(a[i], b[i], err_msg=f"{flag}, seed {seed} step {t}")
            if a[2].any() or a[3].any():
                break
    ep.close(), dm.close()
    n = 256
    ep_first = pg.VecEnv(env_id, "envpool", n, seed=1).reset().astype(np.float64)
    env = gym.make(env_id)
    dm_first = np.stack([env.reset(seed=1000 + i)[0] for i in range(n)])
    env.close()
    standard_error = np.sqrt(ep_first.var(0) / n + dm_first.var(0) / n)
    assert (np.abs(ep_first.mean(0) - dm_first.mean(0)) < 5 * standard_error).all()
    ratio = ep_first.std(0) / dm_first.std(0)
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio
