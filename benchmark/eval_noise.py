"""How much two deterministic evaluations of one unchanged policy differ: the same saved model evaluated again on the
same episode seeds, and on other seed sets of the same size.

    python benchmark/eval_noise.py runs/<run>/checkpoint.pt --sets 8 --episodes 32

The evaluation is the script's own (`load_policy`, `evaluate`). The run's own seeds (seed + 100_000) give the number
it logged; set k > 0 starts its episodes at seed + 100_000 + k * 1_000_000. Prints every set's mean return and their
spread (std over sets), the noise of comparing two evaluations of one policy on different episodes.
"""
import argparse
import importlib.util
import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--sets", type=int, default=8, help="seed sets besides the run's own")
    p.add_argument("--episodes", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "disable")
    saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    spec = importlib.util.spec_from_file_location("script", os.path.join(ROOT, saved["script"]))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    run = m.Args(**saved["args"])
    policy = m.load_policy(saved, torch.device("cpu"))
    base = run.seed + m.EVAL_SEED_OFFSET
    own = [m.evaluate(policy, run.env_id, saved["backend"], args.episodes, base, "cpu")[0] for _ in range(2)]
    others = [m.evaluate(policy, run.env_id, saved["backend"], args.episodes, base + k * 1_000_000, "cpu")[0]
              for k in range(1, args.sets + 1)]
    print(f"{saved['script']} {run.env_id} seed {run.seed}, {args.episodes} episodes per evaluation")
    print(f"the run's own seeds, twice: {own[0]:.1f} and {own[1]:.1f} (difference {abs(own[0] - own[1]):.2g})")
    print(f"{args.sets} other seed sets: " + ", ".join(f"{r:.1f}" for r in others))
    print(f"spread over sets: std {np.std(others, ddof=1):.1f}, range {min(others):.1f} to {max(others):.1f}")


if __name__ == "__main__":
    main()
