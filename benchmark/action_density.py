"""The paper's Figure 6 from saved checkpoints: how each policy spreads its actions at one state.

    python benchmark/action_density.py runs/a/ppo_gaussian.cleanrl_model runs/b/gorl_ppo_fm.cleanrl_model --out density.png

The state: the first checkpoint's deterministic policy runs one evaluation episode (its evaluation seed) for
`--state-step` steps. At that state every policy samples `--samples` actions (the actions the environment would
receive, in [-1, 1]); all samples together fit one principal component, each policy's projections get a Gaussian
KDE (scipy, bandwidth factor 0.8), one curve per checkpoint in one PNG. All checkpoints must be of one task.
"""
import argparse
import importlib.util
import logging
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {
    "ppo_gaussian.py": "PPO",
    "fpo.py": "FPO",
    "dppo.py": "DPPO",
    "gorl_ppo_diff.py": "GoRL-Diff",
    "gorl_ppo_fm.py": "GoRL-FM",
    "sac_gaussian.py": "SAC",
    "gorl_sac_diff.py": "GoRL-SAC-Diff",
}


def load_script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_policy(path):
    """Returns (script, args, stochastic policy, deterministic policy); both map raw observations to env actions."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    script = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if script not in NAMES:
        sys.exit(f"error: {path!r} is not a checkpoint of one of this repository's scripts")
    m = load_script(script)
    saved = m.Args(**checkpoint["args"])
    obs_dim, action_dim = checkpoint["loop"]["obs_dim"], checkpoint["loop"]["action_dim"]
    obs_rms = m.RunningMeanStd(obs_dim)
    obs_rms.load_state_dict(checkpoint["obs_rms"])
    if script in ("sac_gaussian.py", "gorl_sac_diff.py"):
        net = m.Actor(obs_dim, action_dim)
        net.load_state_dict(checkpoint["actor"])
        latent, mean = (lambda x: net.get_action(obs_rms(x)).action), (lambda x: net.get_action(obs_rms(x)).mean)
    elif script in ("fpo.py", "dppo.py"):
        extra = (saved.flow_steps, saved.samples_per_action) if script == "fpo.py" else (saved.denoising_steps, saved.min_std)
        net = m.Agent(obs_dim, action_dim, *extra)
        net.load_state_dict(checkpoint["agent"])
        generator = torch.Generator().manual_seed(saved.seed)
        return script, saved, (lambda x: net.act(obs_rms(x)).env_action), (lambda x: net.act(obs_rms(x), generator).env_action)
    else:
        net = m.Agent(obs_dim, action_dim)
        net.load_state_dict(checkpoint["agent"])
        latent, mean = (lambda x: net.act(obs_rms(x)).action), (lambda x: net.get_dist(obs_rms(x)).mean)
    if "decoder" in checkpoint:  # GoRL: the env receives tanh(g(s, z))
        decoder = m.Decoder(obs_dim, action_dim, saved.decoder_hidden)
        decoder.load_state_dict(checkpoint["decoder"])
        return script, saved, (lambda x: torch.tanh(decoder(x, latent(x)))), (lambda x: torch.tanh(decoder(x, mean(x))))
    return script, saved, (lambda x: torch.tanh(latent(x))), (lambda x: torch.tanh(mean(x)))


@torch.no_grad()
def pick_state(script, saved, policy, step):
    """The raw observation after `step` steps of one evaluation episode of `policy`."""
    m = load_script(script)
    backend = m.resolve_backend(saved.env_id, "dm_control")
    envs = m.VecEnv(saved.env_id, backend, 1, saved.seed + 100_000)
    obs = envs.reset()
    for _ in range(step):
        next_obs, _, terminated, truncated, _, _ = envs.step(policy(torch.as_tensor(obs)).numpy())
        if (terminated | truncated).any():
            break
        obs = next_obs
    envs.close()
    return torch.as_tensor(obs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", default="action_density.png")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--state-step", type=int, default=200, help="steps into the evaluation episode (earlier if it ends)")
    p.add_argument("--bandwidth", type=float, default=0.8, help="scipy gaussian_kde bandwidth factor")
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "disable")
    logging.getLogger("absl").setLevel(logging.ERROR)  # dm_control's model-compiler deprecation warnings
    from scipy.stats import gaussian_kde

    policies = [load_policy(path) for path in args.checkpoints]
    tasks = {saved.env_id for _, saved, _, _ in policies}
    if len(tasks) != 1:
        sys.exit(f"error: the checkpoints are of different tasks ({', '.join(sorted(tasks))}); pass checkpoints of one task")
    script, saved, _, deterministic = policies[0]
    state = pick_state(script, saved, deterministic, args.state_step)
    torch.manual_seed(0)
    with torch.no_grad():
        samples = [policy(state.repeat(args.samples, 1)).numpy().astype(np.float64) for _, _, policy, _ in policies]
    pooled = np.concatenate(samples)
    center = pooled.mean(0)
    pc1 = np.linalg.svd(pooled - center, full_matrices=False)[2][0]  # first principal component of all actions
    projections = [(s - center) @ pc1 for s in samples]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = min(x.min() for x in projections), max(x.max() for x in projections)
    grid = np.linspace(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3), 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (script, _, _, _), x, path in zip(policies, projections, args.checkpoints):
        if x.std() < 1e-9:
            print(f"{NAMES[script]} ({path}): all samples project to {x.mean():.3f}, no density to estimate")
            continue
        density = gaussian_kde(x, bw_method=args.bandwidth)(grid)
        ax.plot(grid, density, label=NAMES[script])
        ax.fill_between(grid, density, alpha=0.15)
    ax.set_title(f"{saved.env_id}: {args.samples} actions at one state, first principal component", fontsize=10)
    ax.set_xlabel("action projected on PC1")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(policies)} policies, state after {args.state_step} steps of {saved.env_id})")


if __name__ == "__main__":
    main()
