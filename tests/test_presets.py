"""Named presets: `python SCRIPT [paper|cpu|release] --flag ...`. The first word picks the defaults, any flag overrides
them, `--help` says what the preset sets, the card's command is the paper's run, `cpu` is the README's CPU-sized
command, and `release` is each task's released run (docs/reproducing.md)."""
import sys

import pytest

from conftest import load_script, run_script

SCRIPTS = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"]
MODULES = {name: load_script(name) for name in SCRIPTS}


def parse(name, argv, monkeypatch):
    """The settings the script's own command line gives `argv` (its `parse_args`, as `python name argv` runs it)."""
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return vars(MODULES[name].parse_args())


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_preset_is_the_paper_and_every_flag_overrides_a_preset(name, monkeypatch):
    m = MODULES[name]
    assert parse(name, ["--env-id", "CheetahRun"], monkeypatch) == vars(m.Args(env_id="CheetahRun"))
    assert parse(name, ["paper", "--env-id", "CheetahRun"], monkeypatch) == vars(m.Args(env_id="CheetahRun"))
    cpu = parse(name, ["cpu", "--env-id", "CheetahRun"], monkeypatch)
    assert cpu == vars(m.presets("CheetahRun")["cpu"]) and cpu["total_timesteps"] < m.Args().total_timesteps
    assert parse(name, ["cpu", "--env-id", "CheetahRun", "--seed", "7"], monkeypatch) == {**cpu, "seed": 7}


def test_the_cards_command_is_the_papers_run(monkeypatch):
    args = parse("gorl_ppo_fm.py", ["--env-id", "HopperStand", "--beta", "1e-3"], monkeypatch)
    assert args["total_timesteps"] == 180_000_000 and args["num_envs"] == 2048 and args["stage_weights"] == (2, 2, 1, 1)
    assert args["beta"] == 1e-3 and args["kl_form"] == "analytic" and args["encoder_reset"] == "prior"
    assert args["refine_from"] == "last"  # the paper collects the refit data with the stage's latest encoder


def test_cpu_preset_is_the_readmes_former_cpu_command(monkeypatch):
    """The `cpu` preset at the former README command's budget and stages holds every setting that command gave."""
    former = ["--env-id", "CheetahRun", "--num-envs", "16", "--batch-size", "16", "--num-minibatches", "8", "--update-epochs", "8",
              "--gamma", "0.99", "--clip-coef", "0.2", "--clip-coef-later", "0.2", "--max-grad-norm", "0", "--ent-coef", "0",
              "--total-timesteps", "1000000", "--stage-weights", "2", "1", "1", "--eval-every", "250000", "--num-eval-envs", "32",
              "--refine-episodes", "32", "--refine-num-envs", "16", "--decoder-batch-size", "1024", "--decoder-epochs", "200"]
    budget = ["--total-timesteps", "1000000", "--stage-weights", "2", "1", "1", "--eval-every", "250000"]
    for name in ["gorl_ppo_fm.py", "gorl_ppo_diff.py"]:
        assert parse(name, ["cpu", "--env-id", "CheetahRun", *budget], monkeypatch) == parse(name, former, monkeypatch)
    ppo = ["--env-id", "CheetahRun", "--num-envs", "16", "--batch-size", "16", "--num-minibatches", "8", "--update-epochs", "8",
           "--learning-rate", "1e-3", "--clip-coef", "0.2", "--gamma", "0.99", "--ent-coef", "0", "--total-timesteps", "1000000",
           "--eval-every", "250000", "--num-eval-envs", "32"]
    assert parse("ppo_gaussian.py", ["cpu", "--env-id", "CheetahRun", *budget[:2], *budget[-2:]], monkeypatch) == parse(
        "ppo_gaussian.py", ppo, monkeypatch)
    assert parse("gorl_ppo_fm.py", ["cpu", "--env-id", "FingerSpin"], monkeypatch)["gamma"] == 0.95  # the released runs'


def per_stage(name, task, monkeypatch, stages=4):
    """What each stage of the task's `release` run uses, as the loop reads it (`stage_settings`)."""
    m = MODULES[name]
    args = m.Args(**parse(name, ["release", "--env-id", task], monkeypatch))
    keys = ["learning_rate", "clip_coef", "ent_coef", "max_grad_norm", "beta", "encoder_reset", "obs_stats_accumulation"]
    return [tuple(getattr(m.stage_settings(args, stage), key) for key in keys) for stage in range(stages)], args


def test_release_preset_is_each_tasks_released_run(monkeypatch):
    """Spot checks against the released configs (docs/reproducing.md's differences table): per stage, lr, clip, entropy,
    gradient clipping, KL coefficient, encoder restart, normalizer."""
    stages, args = per_stage("gorl_ppo_fm.py", "WalkerWalk", monkeypatch)
    assert stages == [(1e-3, 0.15, 0.01, 0.5, 5e-4, "fresh", "cumulative"), (1e-3, 0.3, 0.01, 1.0, 3e-3, "prior-best", "cumulative"),
                      (1e-3, 0.3, 0.01, 1.0, 3e-3, "prior-best", "cumulative"), (3e-4, 0.3, 0.01, 1.0, 3e-3, "prior-best", "cumulative")]
    assert (args.kl_form, args.refine_from, args.decoder_steps, args.decoder_hidden, args.target_clip) == ("moments", "best", 50_000,
                                                                                                           128, 3.0)
    stages, args = per_stage("gorl_ppo_fm.py", "HopperStand", monkeypatch)
    assert (args.decoder_hidden, args.target_clip, stages[3][3], stages[3][4]) == (64, 0.0, 0.5, 1e-3)
    stages, args = per_stage("gorl_ppo_diff.py", "HopperStand", monkeypatch)
    assert stages == [(1e-3, 0.15, 0.01, 0.5, 5e-4, "fresh", "legacy_batch_only"), (3e-4, 0.15, 0.01, 0.5, 1e-3, "fresh", "cumulative"),
                      (1e-4, 0.15, 0.01, 0.5, 1e-3, "warm", "cumulative"), (1e-4, 0.15, 0.01, 0.5, 1e-3, "warm", "cumulative")]
    assert (args.decoder_steps, args.decoder_epochs, args.decoder_hidden) == (0, 50, 64)
    stages, _ = per_stage("gorl_ppo_diff.py", "FishSwim", monkeypatch)
    assert [stage[2] for stage in stages] == [0.01, 0.01, 0.01, 0.005]
    assert parse("gorl_ppo_diff.py", ["release", "--env-id", "FingerSpin"], monkeypatch)["gamma"] == 0.95
    for task, by in [("FingerSpin", "action-error"), ("FishSwim", "action-error"), ("CheetahRun", "loss")]:
        assert parse("gorl_ppo_fm.py", ["release", "--env-id", task], monkeypatch)["refit_checkpoint_by"] == by, task
    diff = parse("gorl_ppo_diff.py", ["release", "--env-id", "CheetahRun"], monkeypatch)
    assert (diff["chain_loss_weight"], diff["refit_validation"], diff["refit_checkpoint_by"]) == (1e-3, "steps", "loss")
    assert diff["evals_per_stage"] == 10 and parse("gorl_ppo_fm.py", ["release", "--env-id", "HopperStand"], monkeypatch)[
        "evals_per_stage"] == 10
    ppo = parse("ppo_gaussian.py", ["release", "--env-id", "CheetahRun"], monkeypatch)
    assert ppo["tanh_entropy_correction"] and ppo["obs_stats_accumulation"] == "legacy_batch_only"
    assert parse("dppo.py", ["release", "--env-id", "CheetahRun"], monkeypatch)["clip_coef"] == 0.2
    for name in ["ppo_gaussian.py", "fpo.py", "dppo.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py"]:  # the release's rollouts, updates
        release = parse(name, ["release", "--env-id", "HopperStand"], monkeypatch)
        assert release["mask_time_limit_terminations"] and release["normalize_advantages_over_all_steps"], name
        paper = parse(name, ["--env-id", "HopperStand"], monkeypatch)
        assert not paper["mask_time_limit_terminations"] and not paper["normalize_advantages_over_all_steps"], name


def test_help_names_the_preset_and_what_it_sets(tmp_path):
    r = run_script("gorl_ppo_fm.py", ["cpu", "--env-id", "CheetahRun", "--help"], tmp_path)
    assert r.returncode == 0 and "preset 'cpu'" in r.stdout, r.stdout + r.stderr
    assert "num_envs=16" in r.stdout and "decoder_epochs=200" in r.stdout, r.stdout
    assert "(default: 16)" in r.stdout  # the values shown are the preset's


@pytest.mark.parametrize("argv", [["cpux", "--env-id", "CheetahRun"], ["cpu", "cpu"]])
def test_an_unknown_preset_is_one_line(argv, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        parse("gorl_ppo_fm.py", argv, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "unknown preset" in err[0], err
