"""Running at scale without surprises: `auto` says which backend it chose, dm_control says when it will be slow, a run
whose environments cannot fit in memory stops at once with one line, and --capture-video records on any backend."""
import glob
import os
import sys
from types import SimpleNamespace

import pytest

from conftest import has_envpool, load_script, run_script

TINY = ["--env-id", "InvertedPendulum-v5", "--num-envs", "4", "--batch-size", "4", "--num-minibatches", "1", "--unroll-length", "8",
        "--update-epochs", "1", "--total-timesteps", "32", "--eval-every", "64", "--num-eval-envs", "2"]


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo_gaussian.py")


def test_auto_backend_says_what_it_chose_and_why(ppo, capsys, monkeypatch):
    if has_envpool():
        assert ppo.resolve_backend("InvertedPendulum-v5", "auto") == "envpool"
        assert capsys.readouterr().out == "backend auto -> envpool: it has the task (InvertedPendulum-v5)\n"
        assert ppo.resolve_backend("CartpoleSwingupSparse", "auto") in ("envpool", "dm_control")
        capsys.readouterr()
    monkeypatch.setitem(sys.modules, "envpool", None)  # import envpool now raises ImportError
    assert ppo.resolve_backend("HopperStand", "auto") == "dm_control"
    out = capsys.readouterr().out
    assert out.startswith("backend auto -> dm_control: envpool is not installed (pip install envpool==1.2.5") and out.count("\n") == 1
    assert ppo.resolve_backend("HopperStand", "dm_control") == "dm_control"
    assert capsys.readouterr().out == ""  # an explicit choice needs no explanation


def resources_args(**kw):
    return SimpleNamespace(**{"env_id": "InvertedPendulum-v5", "seed": 1, "num_envs": 4, "num_eval_envs": 2, "total_timesteps": 10**6,
                              "batch_size": 64, "num_minibatches": 4, "unroll_length": 8, **kw})


def test_dm_control_with_many_envs_says_it_will_be_slow(ppo, capsys, monkeypatch):
    monkeypatch.setenv("GORL_MEMORY_LIMIT_BYTES", str(1 << 40))
    ppo.check_resources(resources_args(num_envs=64), "dm_control")
    assert capsys.readouterr().out == ""
    ppo.check_resources(resources_args(num_envs=128), "dm_control")
    out = capsys.readouterr().out
    assert out.startswith("note: dm_control steps its 128 envs one after another") and out.count("\n") == 1
    assert "env steps/s measured here" in out and "pip install envpool==1.2.5" in out


def test_a_run_that_cannot_fit_in_memory_stops_with_one_line(tmp_path, monkeypatch):
    # A 300 MB machine: HopperStand's envs take about 12 MB each, so 64 + 2 cannot fit, and 16 of them can. A fresh
    # process: in a test worker that already freed memory, new envs reuse it and the resident-memory probe reads ~0.
    monkeypatch.setenv("GORL_MEMORY_LIMIT_BYTES", str(300 * 10**6))
    args = ["--env-id", "HopperStand", "--env-backend", "dm_control", "--num-envs", "64", "--batch-size", "64", "--num-minibatches", "4",
            "--num-eval-envs", "2", "--unroll-length", "1", "--update-epochs", "1", "--total-timesteps", "256"]  # short if not refused
    r = run_script("ppo_gaussian.py", args, tmp_path)
    code, err = r.returncode, r.stderr
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: 64 training + 2 evaluation/refinement envs of HopperStand"), err
    assert "MiB each, measured), more than the 0.3 GiB available" in err, err
    fits = int(err.split("--num-envs ")[1].split()[0])
    assert 4 <= fits < 64 and 256 % fits == 0, err  # it keeps the batch layout: a divisor of the 256 segments
    assert f"as {256 // fits} unrolls of {fits} envs instead of 4 of 64" in err, err
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was written


def test_capture_video_records_on_any_backend_and_from_a_checkpoint(tmp_path):
    ppo = load_script("ppo_gaussian.py")
    try:
        gl = ppo.render_backend(True)
    except SystemExit:
        pytest.skip("neither EGL nor OSMesa renders on this machine")
    r = run_script("ppo_gaussian.py", [*TINY, "--capture-video", "--save-model"], tmp_path)  # the backend `auto` picks
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr + f" (MUJOCO_GL={gl})"
    videos = sorted(glob.glob(str(tmp_path / "videos" / "*" / "*.mp4")))
    assert [os.path.basename(v) for v in videos] == ["step_0.mp4", "step_32.mp4"]
    model = glob.glob(str(tmp_path / "runs" / "*" / "ppo_gaussian.cleanrl_model"))[0]
    r = run_script("ppo_gaussian.py", ["--eval-checkpoint", model, "--capture-video"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    video = glob.glob(str(tmp_path / "videos" / "*" / "eval_checkpoint.mp4"))
    assert len(video) == 1 and f"video saved to videos/{os.path.basename(os.path.dirname(model))}/eval_checkpoint.mp4" in r.stdout
    import imageio.v2 as imageio

    for path in videos + video:
        reader = imageio.get_reader(path)
        frames = [frame for frame in reader]
        assert len(frames) > 2 and frames[0].ndim == 3 and frames[0].std() > 0  # real frames, not a blank canvas
