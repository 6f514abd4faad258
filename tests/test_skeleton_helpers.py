"""The skeleton's small helpers that keep the main loops short: masked advantage normalization and explained
variance, the non-finite stop, the evaluation/checkpoint schedule, and the argument checks every script shares."""
import math

import pytest
import torch
import tyro

from conftest import load_script

SCRIPTS = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"]
pg = load_script("ppo_gaussian.py")


def test_advantages_are_normalized_over_the_unmasked_steps_only():
    torch.manual_seed(0)
    advantages, mask = torch.randn(6, 5) * 3 + 2, (torch.rand(6, 5) > 0.3).float()
    out = pg.normalize_advantages(advantages * mask, mask)
    valid = out[mask.bool()]
    assert (out[~mask.bool()] == 0).all()
    assert abs(valid.mean().item()) < 1e-6 and abs(valid.std().item() - 1) < 1e-5  # unbiased std over the valid steps
    kept = advantages[mask.bool()]
    torch.testing.assert_close(valid, (kept - kept.mean()) / (kept.std() + 1e-8))


def test_explained_variance_ignores_masked_steps():
    torch.manual_seed(0)
    targets, mask = torch.randn(4, 8), torch.ones(4, 8)
    mask[:, -2:] = 0
    assert pg.explained_variance(targets, targets, mask).item() == pytest.approx(1.0)
    garbage = targets.clone()
    garbage[:, -2:] = 1e6  # only where the mask is 0
    assert pg.explained_variance(targets, garbage, mask).item() == pytest.approx(1.0)
    mean = (targets * mask).sum() / mask.sum()
    assert pg.explained_variance(targets, torch.full_like(targets, mean.item()), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_finite_means_averages_and_stops_on_a_non_finite_loss(capsys):
    stats = [{"losses/loss": torch.tensor(1.0), "losses/entropy": torch.tensor(2.0)},
             {"losses/loss": torch.tensor(3.0), "losses/entropy": torch.tensor(float("nan"))}]  # not a loss: averaged
    means = pg.finite_means(stats, lambda i: f"at entry {i}")
    assert means["losses/loss"] == 2.0 and math.isnan(means["losses/entropy"])
    stats[1]["losses/loss"] = torch.tensor(float("inf"))
    with pytest.raises(SystemExit) as e:
        pg.finite_means(stats, lambda i: f"at entry {i}")
    assert e.value.code == 1 and "non-finite loss at entry 1" in capsys.readouterr().err


def test_crossed_marks_each_multiple_once():
    steps = 384
    hits = [step for step in range(steps, 10 * steps + 1, steps) if pg.crossed(step, steps, 1000)]
    assert hits == [1152, 2304, 3072]  # the iterations that pass 1000, 2000, 3000


POSITIVE = set("""total_timesteps num_envs unroll_length batch_size num_minibatches update_epochs eval_every num_eval_envs
    learning_rate learning_rate_later clip_coef clip_coef_later reward_scale flow_steps samples_per_action
    denoising_steps min_std buffer_size policy_frequency policy_lr q_lr utd_ratio stage_weights refine_episodes refine_num_envs
    decoder_batch_size decoder_lr decoder_hidden decoder_epochs""".split())
NON_NEGATIVE = set("""checkpoint_every threads ent_coef ent_coef_later vf_coef max_grad_norm max_grad_norm_later alpha learning_starts beta
    decoder_steps target_clip chain_loss_weight evals_per_stage""".split())
UNIT = {"gamma", "tau", "gamma_denoising", "gae_lambda"}  # checked as intervals
FREE = {"seed"}  # any integer


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_setting_a_script_has_is_checked(name, capsys):
    """Each script's own flags, through the shared `check_args`: a zero (must be positive) or a negative value (must be
    non-negative) of every numeric flag exits 2 with one line naming the flag. A new numeric flag must be listed here."""
    m = load_script(name)
    fields = vars(tyro.cli(m.Args, args=[]))
    numeric = {f for f, v in fields.items() if not isinstance(v, bool) and (isinstance(v, (int, float)) or f == "checkpoint_every"
               or (isinstance(v, tuple) and f in POSITIVE | NON_NEGATIVE))}
    assert numeric <= POSITIVE | NON_NEGATIVE | UNIT | FREE, f"unclassified numeric flags: {numeric - POSITIVE - NON_NEGATIVE - UNIT - FREE}"
    for field in sorted(numeric - UNIT - FREE):
        bad_value = 0 if field in POSITIVE else -1
        if field == "decoder_epochs":
            fields_bad = {**fields, field: 0, "decoder_steps": 0}
        else:
            fields_bad = {**fields, field: (bad_value,) if isinstance(fields[field], tuple) else bad_value}
        with pytest.raises(SystemExit) as e:
            m.check_args(m.Args(**fields_bad))
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--{field.replace('_', '-')} " in err and len(err.strip().splitlines()) == 1, (field, err)
    for field in UNIT & set(fields):
        with pytest.raises(SystemExit):
            m.check_args(m.Args(**{**fields, field: 1.5}))
    m.check_args(tyro.cli(m.Args, args=[]))  # the defaults pass
