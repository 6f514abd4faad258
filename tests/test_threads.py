"""PyTorch threads per phase: one for the rollout, every core for the update (--threads 0), or one fixed count; and
OpenMP's idle threads spin briefly, so two runs on the same cores do not slow each other down many times over."""
import ast
import os

import pytest
import torch

from conftest import ROOT, run_inprocess

SCRIPTS = ["ppo_gaussian.py", "gorl_ppo_fm.py", "gorl_ppo_diff.py", "fpo.py", "dppo.py", "sac_gaussian.py", "gorl_sac_diff.py"]
TINY = ["--env-id", "Hopper-v5", "--env-backend", "dm_control", "--num-envs", "2", "--batch-size", "2", "--num-minibatches", "2",
        "--unroll-length", "4", "--update-epochs", "1", "--total-timesteps", "32", "--eval-every", "100000", "--num-eval-envs", "1"]


@pytest.mark.parametrize("threads, expected", [("0", [1, 3, 1, 3]), ("2", [2, 2, 2, 2])])
def test_threads_per_phase(threads, expected, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # as if OMP_NUM_THREADS=3
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    code, out, err = run_inprocess("ppo_gaussian.py", [*TINY, "--threads", threads], tmp_path, capsys, monkeypatch)
    assert code == 0, err
    assert calls == expected  # two iterations: rollout, update, rollout, update


@pytest.mark.parametrize("name", SCRIPTS)
def test_openmp_spin_is_short_and_set_before_torch_loads(name):
    tree = ast.parse(open(os.path.join(ROOT, name)).read())
    first_torch = next(i for i, n in enumerate(tree.body) if isinstance(n, ast.Import) and n.names[0].name == "torch")
    settings = [ast.unparse(n) for n in tree.body[:first_torch] if isinstance(n, ast.Expr)]
    assert "os.environ.setdefault('GOMP_SPINCOUNT', '1000')" in settings and "os.environ.setdefault('KMP_BLOCKTIME', '1')" in settings
