"""Running at scale without surprises: `auto` says which backend it chose, a run whose environments cannot fit in memory
stops at once with one line, --capture-video records on any backend (or fails with one line that names the fix)."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT, has_envpool, load_script, run_script

TINY = ["--env-id", "InvertedPendulum-v5", "--num-envs", "4", "--batch-size", "4", "--num-minibatches", "1", "--unroll-length", "8",
        "--update-epochs", "1", "--total-timesteps", "32", "--eval-every", "64", "--num-eval-envs", "2"]


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo_gaussian.py")


def test_auto_backend_says_what_it_chose_and_why(ppo, capsys, monkeypatch):
    if has_envpool():
        assert ppo.resolve_backend("InvertedPendulum-v5", "auto") == "envpool"
        assert capsys.readouterr().out == "backend auto -> envpool: EnvPool has the task (InvertedPendulum-v5)\n"
    monkeypatch.setattr(ppo, "envpool", None)  # as where EnvPool has no wheel
    assert ppo.resolve_backend("HopperStand", "auto") == "dm_control"
    out = capsys.readouterr().out
    assert out.startswith("backend auto -> dm_control: EnvPool is not installed (pip install envpool")
    assert out.count("\n") == 1
    assert ppo.resolve_backend("HopperStand", "dm_control") == "dm_control"
    assert capsys.readouterr().out == ""  # an explicit choice needs no explanation


def test_a_run_that_cannot_fit_in_memory_stops_with_one_line(tmp_path, monkeypatch):
    # A 300 MB machine: HopperStand's envs take about 12 MB each, so 64 + 2 cannot fit, and 16 of them can. A fresh
    # process: in a test worker that already freed memory, new envs reuse it and the resident-memory probe reads ~0.
    monkeypatch.setenv("GORL_MEMORY_LIMIT_BYTES", str(300 * 10**6))
    args = ["--env-id", "HopperStand", "--env-backend", "dm_control", "--num-envs", "64", "--batch-size", "64", "--num-minibatches", "4",
            "--num-eval-envs", "2", "--unroll-length", "1", "--update-epochs", "1", "--total-timesteps", "256"]  # short if not refused
    r = run_script("ppo_gaussian.py", args, tmp_path)
    code, err = r.returncode, r.stderr
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: 64 training + 2 evaluation/refinement envs of HopperStand"), err
    assert "MiB each, measured), more than the 0.3 GiB free" in err, err
    fits = int(err.split("--num-envs ")[1].split()[0])
    assert 4 <= fits < 64 and 256 % fits == 0, err  # a power of 2: it divides the iteration's 256 segments
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was written
    monkeypatch.setenv("GORL_MEMORY_LIMIT_BYTES", str(10**10))  # the same run on a 10 GB machine goes ahead
    assert run_script("ppo_gaussian.py", args, tmp_path).returncode == 0


def renders(gl):
    probe = "import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco/>'); mujoco.Renderer(m, 8, 8).render()"
    return subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, MUJOCO_GL=gl), capture_output=True).returncode == 0


def video_run(args, cwd, gl):
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"} | ({"MUJOCO_GL": gl} if gl else {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "ppo_gaussian.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_capture_video_fails_with_one_line_that_names_the_fix(tmp_path):
    r = video_run([*TINY, "--capture-video"], tmp_path, "disable")  # the user's MUJOCO_GL is kept, and it cannot render
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: --capture-video: MUJOCO_GL=disable cannot render here") and "install EGL" in r.stderr


def test_capture_video_records_on_any_backend_and_from_a_checkpoint(tmp_path):
    if not renders("egl"):
        pytest.skip("EGL does not render on this machine")
    r = video_run([*TINY, "--capture-video", "--save-model"], tmp_path, None)  # MUJOCO_GL unset: the script picks EGL
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    videos = sorted(glob.glob(str(tmp_path / "videos" / "*" / "*.mp4")))
    assert [os.path.basename(v) for v in videos] == ["step_0.mp4", "step_32.mp4"]
    model = glob.glob(str(tmp_path / "runs" / "*" / "ppo_gaussian.cleanrl_model"))[0]
    r = video_run(["--eval-checkpoint", model, "--capture-video"], tmp_path, None)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    video = glob.glob(str(tmp_path / "videos" / os.path.basename(os.path.dirname(model)) / "eval_checkpoint.mp4"))
    assert len(video) == 1
    import imageio.v2 as imageio

    for path in videos + video:
        frames = [frame for frame in imageio.get_reader(path)]  # list() would preallocate its infinite length
        assert len(frames) > 2 and frames[0].ndim == 3 and frames[0].std() > 0  # real frames, not a blank canvas
