"""Short learning checks on easy tasks (CPU-sized, a minute or two each); the longer CartpoleBalance check is `slow`.

InvertedPendulum-v5 separates learning from not learning clearly: the untrained deterministic policy (latent mean 0
through the identity decoder, or a Gaussian mean near 0) returns about 24, since the pole falls within a few dozen
steps, and 1000 is only reachable by balancing for the whole episode. With these settings every seed tried (1, 2,
3) reached 1000 within the first stage on this machine, so the thresholds have a wide margin on other float paths."""
import os

import pytest

from conftest import only_run_dir, read_scalars, run_script

# The README's main job: CPU-sized GoRL-FM, 100k steps of stage 0 (26 iterations of 3840 steps), one refit on 32
# episodes (10 epochs of 256-action minibatches: about 1,100 Adam steps), then 2 more iterations against the new decoder.
GORL_ARGS = ["--env-id", "InvertedPendulum-v5", "--num-envs", "16", "--batch-size", "16", "--num-minibatches", "8", "--update-epochs", "8",
             "--gamma", "0.99", "--clip-coef", "0.2", "--clip-coef-later", "0.2", "--max-grad-norm", "0", "--total-timesteps", "107520",
             "--stage-weights", "26", "2", "--eval-every", "100000", "--num-eval-envs", "16", "--refine-episodes", "32", "--refine-num-envs", "16",
             "--decoder-batch-size", "256", "--decoder-epochs", "10"]


# The two GoRL PPO scripts share their loop (test_gorl_ppo_scripts_differ_only_in_the_decoder): CI runs the FM check,
# the diffusion one is `slow` (seeds 1-3 of both pass; see the README).
@pytest.mark.parametrize("name", ["gorl_ppo_fm.py", pytest.param("gorl_ppo_diff.py", marks=pytest.mark.slow)])
def test_gorl_learns_and_its_refit_keeps_what_stage_0_learned(tmp_path, name):
    r = run_script(name, GORL_ARGS, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_scalars(only_run_dir(tmp_path))
    stage_end = s["gorl/eval_after_refit"][0][0]
    evals = dict(s["eval/episodic_return"])
    before = evals[stage_end]  # stage 0's last evaluation (encoder + identity decoder)
    after = s["gorl/eval_after_refit"][0][1]  # the new decoder with the encoder reset to N(0, I): decode(s, 0)
    assert evals[0] < 100, evals  # the untrained policy drops the pole
    # Stage 0 must have learned to balance, or the refit check says nothing.
    assert before > 900, s["eval/episodic_return"]
    # The refit maps the prior's mean to the encoder's typical action, so the policy must survive it: at most 10% lower.
    # A refit that breaks the policy (unconditioned decoder, z instead of fresh noise at test time, wrong direction
    # of time, the decoder's own normalizer missing) drops the pole within a few dozen steps and fails.
    assert after >= 0.9 * before, (before, after)
    assert s["eval/episodic_return"][-1][1] >= 0.9 * before, s["eval/episodic_return"]  # and stage 1 keeps it


PPO_ARGS = ["--env-id", "InvertedPendulum-v5", "--num-envs", "16", "--batch-size", "16", "--num-minibatches", "8", "--update-epochs", "8",
            "--learning-rate", "1e-3", "--clip-coef", "0.2", "--gamma", "0.99", "--total-timesteps", "99840", "--eval-every", "50000",
            "--num-eval-envs", "16"]


@pytest.mark.slow  # CI time: CI keeps the GoRL-FM check, whose stage 0 is latent PPO through an identity decoder
def test_ppo_gaussian_learns_inverted_pendulum(tmp_path):
    r = run_script("ppo_gaussian.py", PPO_ARGS, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = read_scalars(only_run_dir(tmp_path))["eval/episodic_return"]
    assert evals[0][1] < 100 and evals[-1][1] > 900, evals


# The README's PPO baseline command: CPU-sized PPO on CartpoleBalance, 400k steps (about 2 minutes here).
README_PPO_ARGS = ["--env-id", "CartpoleBalance", "--num-envs", "16", "--batch-size", "16", "--num-minibatches", "8", "--update-epochs", "8",
                   "--learning-rate", "1e-3", "--clip-coef", "0.2", "--gamma", "0.99", "--total-timesteps", "400000", "--eval-every", "100000",
                   "--num-eval-envs", "16"]


@pytest.mark.slow
def test_ppo_gaussian_learns_cartpole_balance(tmp_path):
    r = run_script("ppo_gaussian.py", README_PPO_ARGS, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = read_scalars(only_run_dir(tmp_path))["eval/episodic_return"]
    # Reference points on CartpoleBalance (1000-step episodes, reward <= 1 per step), measured with the env layer:
    # uniformly random actions return 349 +- 69 (32 episodes, max 507) and the constant action 0 returns
    # 756 +- 22 (max 774), because the pole starts upright and falls slowly. 900 is only reachable by actually
    # balancing (seeds 1, 2, 3 here: 994.7, 998.7, 925.3 after 400k steps).
    assert evals[-1][1] > 900, evals


# A refit on a task where a partial loss shows: CheetahRun's stage 0 (250k steps of CPU-sized GoRL-FM) ends at a
# return of about 140 (seeds 1 and 2: 145.6, 142.3), far from any ceiling, and the refit (the README's 32 episodes, 200 epochs)
# must keep at least 70% of it with the restarted encoder. With `--refine-episodes 2 --refine-num-envs 2` (one
# training episode, one held out) the decoder learns one trajectory's actions and the policy falls far below that.
CHEETAH_ARGS = ["cpu", "--env-id", "CheetahRun", "--total-timesteps", "253440", "--stage-weights", "65", "1",
                "--eval-every", "1000000"]  # the `cpu` preset's settings and refit, with a 250k-step stage 0


@pytest.mark.slow  # two CheetahRun runs of about 3 minutes each
@pytest.mark.parametrize("seed", ["1", "2"])
def test_a_refit_on_cheetah_run_keeps_at_least_70_percent_of_the_stage(tmp_path, seed):
    r = run_script("gorl_ppo_fm.py", [*CHEETAH_ARGS, "--seed", seed, *REFIT_OVERRIDE], tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_scalars(only_run_dir(tmp_path))
    stage_end, after = s["gorl/eval_after_refit"][0]
    before = dict(s["eval/episodic_return"])[stage_end]
    assert before > 100, s["eval/episodic_return"]  # stage 0 learned to run, so a loss can show
    assert after >= 0.7 * before, (before, after)


REFIT_OVERRIDE = []  # `pytest -m slow` with GORL_TEST_REFIT_EPISODES=2 shows the check failing on a one-episode refit
if os.environ.get("GORL_TEST_REFIT_EPISODES"):
    REFIT_OVERRIDE = ["--refine-episodes", os.environ["GORL_TEST_REFIT_EPISODES"], "--refine-num-envs", "2"]
