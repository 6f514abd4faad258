"""Refits one GoRL stage's decoder again, several ways, on that stage's refit data: what makes a refit lose.

    python benchmark/refit_probe.py checkpoint.pt --decoders gorl_ppo_diff gorl_ppo_fm --fit-seeds 1 2 3

The checkpoint must be the one a GoRL PPO script writes at a stage's end, right after the refit (copy
runs/<run>/checkpoint.pt before the next one replaces it): it holds the stage's best encoder and the decoder the stage
acted through. The probe collects the refit's episodes as the run did (same encoder, decoder and env seeds; the
latent draws are not the run's, whose RNG state was not saved), fits a new decoder with each named script's own
`fit_decoder`, and evaluates it as the run does right after a refit (the restarted encoder's latent z = 0, on the
run's evaluation episodes). Each fit is repeated with other torch seeds: a fit's own randomness (split, minibatches,
noise) is part of the outcome. It also prints how far the decoded action at z = 0 is from the stage's deterministic
action (tanh of both) on the refit's states, what the evaluation after a refit depends on.
`--set name=value` overrides fit settings (`--set decoder_epochs=200`, `--set decoder_steps=20000`); `--episodes`
the amount of refit data.
"""
import argparse
import copy
import importlib.util
import os
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--decoders", nargs="+", default=["gorl_ppo_diff", "gorl_ppo_fm"], help="whose decoder to fit")
    p.add_argument("--fit-seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--episodes", type=int, default=None, help="refit episodes (default: the run's)")
    p.add_argument("--set", nargs="*", default=[], help="fit settings name=value, as the scripts' Args fields")
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "disable")
    saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    m = load(saved["script"].replace(".py", ""))
    run = m.Args(**saved["args"])
    for item in args.set:
        name, value = item.split("=")
        setattr(run, name, type(getattr(run, name))(value))
    stage, loop, device, backend = saved["loop"]["stage"], saved["loop"], torch.device("cpu"), saved["backend"]
    if stage < 1 or loop["best_return"] != -float("inf"):  # the stage's first evaluation replaces its best encoder
        raise SystemExit(f"{args.checkpoint}: not a checkpoint written right after a refit (stage {stage})")
    obs_dim, action_dim = loop["obs_dim"], loop["action_dim"]
    encoder, encoder_rms = m.Agent(obs_dim, action_dim), m.RunningMeanStd(obs_dim)
    encoder.load_state_dict(saved["best_agent"])
    encoder_rms.load_state_dict(saved["best_obs_rms"])
    old = m.Decoder(obs_dim, action_dim, run.decoder_hidden)
    old.load_state_dict(loop["decoders"][stage - 1])
    seed = run.seed + m.REFINE_SEED_OFFSET + stage - 1
    episodes = args.episodes or run.refine_episodes
    torch.manual_seed(run.seed)  # the encoder's latent draws: every call of the probe fits the same data
    data, returns, _ = m.collect_refinement_data(lambda x: encoder.act(encoder_rms(x))[0], old, run.env_id, backend,
                                                 run.refine_num_envs, episodes, seed, device)
    eval_seed = run.seed + m.EVAL_SEED_OFFSET
    source = m.evaluate(m.eval_policy(encoder, encoder_rms, old), run.env_id, backend, run.num_eval_envs, eval_seed,
                        device)[0]
    print(f"{saved['script']} {run.env_id} seed {run.seed}, refit {stage}: {len(returns)} episodes, {len(data[0])} actions, "
          f"return {returns.mean():.1f}; the stage's best encoder evaluates {source:.1f}, its end {loop['eval_return']:.1f}")
    print("fit settings: " + ", ".join(f"{k}={getattr(run, k)}" for k in
                                        ("decoder_epochs", "decoder_steps", "decoder_batch_size", "decoder_lr",
                                         "decoder_hidden", "target_clip", "refine_input")))
    obs = data[0]
    with torch.no_grad():
        mean_action = torch.tanh(old(obs, encoder.act(encoder_rms(obs), deterministic=True)[0]))
    restarted = m.reset_encoder(copy.deepcopy(encoder), "prior", obs_dim, action_dim)
    for name in args.decoders:
        d = m if name == saved["script"].replace(".py", "") else load(name)
        results = []
        for fit_seed in args.fit_seeds:
            torch.manual_seed(fit_seed)
            start = time.time()
            decoder, train_loss, val_loss = d.fit_decoder(data, run, device)
            after = m.evaluate(m.eval_policy(restarted, encoder_rms, decoder), run.env_id, backend, run.num_eval_envs,
                               eval_seed, device)[0]
            with torch.no_grad():
                gap = (torch.tanh(decoder(obs, torch.zeros_like(data[1]))) - mean_action).abs().mean().item()
            results.append(after)
            print(f"  {name} fit seed {fit_seed}: after {after:.1f} ({after / source:.2f} of the encoder), val loss "
                  f"{val_loss:.4f}, |tanh g(s, 0) - tanh mu(s)| {gap:.3f} ({time.time() - start:.0f}s)", flush=True)
        print(f"  {name}: after {np.mean(results):.1f} +- {np.std(results):.1f}, ratios "
              + ", ".join(f"{r / source:.2f}" for r in results))


if __name__ == "__main__":
    main()
