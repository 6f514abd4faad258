"""CUDA's device rules, checked on the CPU. Each script's tiny run (training with a refit, --resume of a mid-run
checkpoint, --eval-checkpoint of the saved model) runs in this process as on a GPU: `torch.cuda.is_available()` says
yes, and the networks and every tensor made for `device` live on a second device, `Dev`: CPU data reporting the `meta`
device. A dispatch mode sees every aten op, forward and backward, records each one that mixes the devices beyond what
CUDA allows, and counts host syncs: the PPO family may make 1 per rollout step and none in the minibatch loop, SAC 1 per
env step. Evaluation (a copy per step), GoRL's refit and the logging points (`finite_means`) sync by design."""
import collections
import glob
import os
import shutil
import sys

import pytest
import torch
import torch.optim.optimizer as optim_base
import torch.utils._foreach_utils as foreach_utils
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, load_script


class Dev(torch.Tensor):
    """A tensor on the second device, its data `elem` on the CPU. It reports `meta`: a tensor reporting `cuda` aborts in
    autograd on a CPU-only build. `is_meta` is False, or load_state_dict skips it (a copy into a meta parameter)."""

    is_meta = False
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem):
        t = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                dtype=elem.dtype, device="meta", requires_grad=elem.requires_grad)
        t.elem = elem
        return t

    def __reduce_ex__(self, proto):  # torch.save writes the data, as of a CUDA tensor (loaded with map_location="cpu")
        return self.elem.__reduce_ex__(proto)

    def __format__(self, spec):  # f"{t:.3f}" of a 0-dim tensor is an item(), as on CUDA
        return self.item().__format__(spec) if self.dim() == 0 else super().__format__(spec)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # outside the modes: a repr in a failure message
        return compute(func, args, kwargs or {})


def compute(func, args, kwargs):
    """Runs an aten op on the CPU data. Its new tensors are on Dev if it makes them on `device=meta` or, without a
    `device`, if an input is on Dev; inputs it returns (in-place ops, out=) are returned as the objects they were."""
    tensors, device = leaves(args, kwargs), kwargs.get("device")
    inputs = {id(unwrap(t)): t for t in tensors}
    to_dev = torch.device(device).type == "meta" if device is not None else any(isinstance(t, Dev) for t in tensors)
    kwargs = {**kwargs, "device": torch.device("cpu")} if device is not None else kwargs
    out = func(*tree_map(unwrap, args), **{k: tree_map(unwrap, v) for k, v in kwargs.items()})
    return tree_map(lambda t: inputs.get(id(t), Dev(t) if to_dev else t) if isinstance(t, torch.Tensor) else t, out)


def leaves(args, kwargs):  # aten's arguments are tensors or lists of them: 10x faster than torch.utils._pytree
    flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def tree_map(f, x):
    return type(x)(tree_map(f, y) for y in x) if isinstance(x, (list, tuple)) else f(x)


def unwrap(t):
    return t.elem if isinstance(t, Dev) else t


COPIES = {"copy_", "_to_copy", "_copy_from", "_copy_from_and_resize"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
         "unique_dim_consecutive", "equal", "bincount"}  # item(), float(), int(), bool() are _local_scalar_dense


class CudaRules(TorchDispatchMode):
    """An aten op with a tensor on Dev may take CPU tensors only where CUDA does: 0-dim ones (TensorIterator reads them as
    scalars), index tensors of a device tensor (aten's indexing moves them to its device), and in explicit copies (copy_,
    .to(), .cpu(): the fpo/dppo evaluation noise drawn on a CPU generator, checkpoints loaded to the CPU). Host syncs are
    recorded in `events` unless `quiet`."""

    def __init__(self):
        super().__init__()
        self.violations, self.events, self.quiet, self.restored = collections.Counter(), [], 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, func.overloadpacket.__name__
        tensors = leaves(args, kwargs)
        if any(isinstance(t, Dev) for t in tensors):
            indices = [i for i in args[1] if i is not None] if name in INDEXING else []
            allowed = {id(i) for i in indices} if isinstance(args[0], Dev) else set()  # not a CPU tensor's device index
            cpu = [tuple(t.shape) for t in tensors if not isinstance(t, Dev) and t.dim() > 0 and id(t) not in allowed]
            if cpu and name not in COPIES:
                on_dev = [tuple(t.shape) for t in tensors if isinstance(t, Dev)]
                self.violations[f"{func} at {where()}: CPU tensors {cpu} with device tensors {on_dev}"] += 1
            if not self.quiet and syncs(name, args, kwargs, indices):
                self.events.append(f"{func} at {where()}")
        return compute(func, args, kwargs)


def syncs(name, args, kwargs, indices):
    """A device-to-host copy, an item(), or an op whose output's size depends on device data (boolean indexing too)."""
    device = kwargs.get("device")
    to_host = name == "copy_" and not isinstance(args[0], Dev) or \
        name == "_to_copy" and device is not None and torch.device(device).type == "cpu"
    sized = name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], Dev)
    return name in SYNCS or to_host or sized or any(i.dtype in (torch.bool, torch.uint8) for i in indices)


def where():
    """The innermost script line on the stack (for a backward op, the line that called backward())."""
    frame = sys._getframe(2)
    while frame is not None and os.path.dirname(frame.f_code.co_filename) != ROOT:
        frame = frame.f_back
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame else "?"


class OnDev(TorchFunctionMode):
    """Sends every torch function's `cuda` device (a torch.device or a string, positional or keyword: `.to`, factories,
    `as_tensor`, `.cuda()`) to `meta`, the device Dev reports, which is then as good as "cuda" (`device=t.device`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:  # setup()'s `device` stays "cuda" and takes its CUDA branch
            return func(*args, **(kwargs or {}))
        args, kwargs = tuple(map(meta_if_cuda, args)), {k: meta_if_cuda(v) for k, v in (kwargs or {}).items()}
        if func is torch.Tensor.cuda:
            func, args = torch.Tensor.to, (args[0], torch.device("meta"))
        if func is torch.Tensor.tolist and isinstance(args[0], Dev):  # refused for subclasses; on CUDA a copy to the host
            return args[0].cpu().tolist()
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and device is not None and \
                torch.device(device).type == "meta" and not isinstance(args[0], torch.Tensor):  # on meta: no data
            grad = kwargs.pop("requires_grad", False)
            return func(*args, **{**kwargs, "device": "cpu"}).to("meta").requires_grad_(grad)
        return func(*args, **kwargs)


def meta_if_cuda(x):
    return torch.device("meta") if isinstance(x, (str, torch.device)) and str(x).split(":")[0] == "cuda" else x


@pytest.fixture
def cuda(monkeypatch):
    """The rules, and a GPU: available, with an RNG state (a fixed tensor; `restored` records what restore() sets), and
    Adam and clip_grad_norm_ on their foreach or fused paths as for CUDA tensors. Undoes setup()'s CUDA branch after."""
    rules, saved = CudaRules(), (os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.are_deterministic_algorithms_enabled(),
                                 torch.is_deterministic_algorithms_warn_only_enabled())
    for name, stub in {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 1,
                       "manual_seed_all": lambda seed: None, "set_rng_state_all": rules.restored.append,
                       "get_rng_state_all": lambda: [torch.full((16,), 7, dtype=torch.uint8)]}.items():
        monkeypatch.setattr(torch.cuda, name, stub)
    for module in (foreach_utils, optim_base):
        monkeypatch.setattr(module, "_get_foreach_kernels_supported_devices", lambda: ["cuda", "meta"])
        monkeypatch.setattr(module, "_foreach_supported_types", [*module._foreach_supported_types, Dev])
    fused = optim_base._get_fused_kernels_supported_devices
    monkeypatch.setattr(optim_base, "_get_fused_kernels_supported_devices", lambda: [*fused(), "meta"])
    yield rules
    torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    os.environ.update({"CUBLAS_WORKSPACE_CONFIG": saved[0]} if saved[0] is not None else {})


def instrument(m, rules, monkeypatch, tmp_path):
    """Marks among the syncs the training env steps "E", the minibatch starts "G" (compute_gae runs only there) and the
    optimizer steps "O". Evaluations, GoRL's refits and the logging points run quiet. Keeps every checkpoint written."""
    def quiet(f):
        def wrapped(*args, **kwargs):
            rules.quiet += 1
            try:
                return f(*args, **kwargs)
            finally:
                rules.quiet -= 1
        return wrapped
    for name in {"evaluate", "collect_refinement_data", "fit_decoder", "finite_means"} & set(vars(m)):
        monkeypatch.setattr(m, name, quiet(getattr(m, name)))
    step, gae, save, saved = m.VecEnv.step, getattr(m, "compute_gae", None), m.save_checkpoint, []
    monkeypatch.setattr(m.VecEnv, "step", lambda env, action: (rules.quiet or rules.events.append("E"), step(env, action))[1])
    if gae:
        monkeypatch.setattr(m, "compute_gae", lambda *args: (rules.events.append("G"), gae(*args))[1])
    monkeypatch.setattr(m, "save_checkpoint", lambda args, backend, run_name, *rest: (save(args, backend, run_name, *rest),
        saved.append(shutil.copyfile(f"runs/{run_name}/checkpoint.pt", tmp_path / f"checkpoint-{len(saved)}.pt"))))
    return optim_base.register_optimizer_step_post_hook(lambda *_: rules.quiet or rules.events.append("O")), saved


def ppo_syncs(events):
    """(the rollouts' syncs, the minibatch loops' syncs, training env steps). A minibatch loop runs from an iteration's
    first "G" to its last "O": with 2 minibatches an iteration, a sync anywhere in a minibatch falls inside one. The
    rollouts have the rest (each step's copy of its action, to_segments, the normalizer update)."""
    rollout, update, steps, pending, in_update = [], [], 0, [], False
    for event in events:
        if event == "E":
            rollout, pending, steps, in_update = rollout + pending, [], steps + 1, False
        elif event in ("G", "O"):
            (update if in_update or event == "O" else rollout).extend(pending)
            pending, in_update = [], True
        else:
            pending.append(event)
    return rollout + pending, update, steps


def sac_syncs(events):
    """The syncs between consecutive training env steps: a step's updates and the next step's action."""
    gaps = [[]]
    for event in events:
        if event == "E":
            gaps.append([])
        elif event != "O":
            gaps[-1].append(event)
    return gaps


# InvertedDoublePendulum-v5: episodes end within about 10 steps, so evaluations (1 env) and refits are quick. PPO: 2 envs,
# 4-step unrolls, 2 minibatches of 2 segments, 16 env steps an iteration, 3 iterations (GoRL: 2 stages of 2 and a refit),
# a checkpoint after each. SAC: 8 envs, 2 updates an env step from shortly before the checkpoint at step 1000.
ENV = ["--env-id", "InvertedDoublePendulum-v5", "--env-backend", "dm_control", "--num-eval-envs", "1", "--eval-every", "99999"]
PPO = ENV + ["--num-envs", "2", "--unroll-length", "4", "--batch-size", "2", "--num-minibatches", "2", "--update-epochs", "1",
             "--checkpoint-every", "16"]
GORL = ["--stage-weights", "1", "1", "--refine-episodes", "2", "--refine-num-envs", "2", "--decoder-epochs", "1",
        "--decoder-batch-size", "256"]
SAC = ENV + ["--num-envs", "8", "--total-timesteps", "1040", "--utd-ratio", "0.25", "--batch-size", "32",
             "--checkpoint-every", "1000"]
# (arguments, the checkpoint to resume: PPO's first, before GoRL's refit; SAC's last before the end, with a full buffer)
RUNS = {"ppo_gaussian.py": (PPO + ["--total-timesteps", "48"], 0),
        "gorl_ppo_fm.py": (PPO + GORL + ["--total-timesteps", "64"], 0),
        "sac_gaussian.py": (SAC + ["--learning-starts", "940"], -2),
        "gorl_sac_diff.py": (SAC + GORL + ["--learning-starts", "460"], -2)}
RUNS["fpo.py"] = RUNS["dppo.py"] = RUNS["ppo_gaussian.py"]
RUNS["gorl_ppo_diff.py"] = RUNS["gorl_ppo_fm.py"]


def run(m, argv, rules):
    """The script's main under the harness, as its command line runs it (--compile off: no torch.compile on a fake device)."""
    argv = argv + (["--compile", "off"] if hasattr(m.Args, "compile") and "--resume" not in argv else [])
    with pytest.MonkeyPatch.context() as patch:  # the script's own command line: --resume takes the saved settings
        patch.setattr(sys, "argv", [m.__file__, *argv])
        args = m.parse_args()
    try:
        with OnDev(), rules:
            m.main(args)
    except SystemExit as e:  # --eval-checkpoint exits 0
        assert not e.code, f"exit {e.code}"


def check(name, rules, tmp_path, monkeypatch, patch=lambda m: None):
    """Trains (and refits), resumes a mid-run checkpoint and evaluates the saved model under the harness; then no
    violation, and the syncs within budget. `patch` changes the loaded script first (the breaks below)."""
    m, (argv, mid) = load_script(name), RUNS[name]
    patch(m)
    monkeypatch.chdir(tmp_path)
    hook, saved = instrument(m, rules, monkeypatch, tmp_path)
    try:
        run(m, argv + ["--save-model"], rules)
        assert torch.are_deterministic_algorithms_enabled()  # setup() took its CUDA branch
        run(m, ["--resume", str(saved[mid])], rules)
        assert [torch.equal(s, torch.full((16,), 7, dtype=torch.uint8)) for s in rules.restored[0]] == [True]  # GPU RNG
        events = list(rules.events)
        run(m, ["--eval-checkpoint", *glob.glob("runs/*/*.cleanrl_model")], rules)
    finally:
        hook.remove()
    if rules.violations:
        pytest.fail("device-rule violations:\n" + "\n".join(f"{n}x {v}" for v, n in rules.violations.items()))
    if hasattr(m, "ReplayBuffer"):
        gaps = sac_syncs(events)
        assert "O" in events and len(gaps) > 100, "no updates, or too few env steps to count"
        assert max(map(len, gaps)) <= 1, f"host syncs in one env step: {collections.Counter(max(gaps, key=len))}"
    else:
        rollout, update, steps = ppo_syncs(events)
        assert "G" in events and steps > 0, "no compute_gae call: the minibatch loop needs another marker"
        assert not update, f"{len(update)} host syncs in the minibatch loops: {collections.Counter(update)}"
        assert len(rollout) <= steps, f"{len(rollout)} host syncs in {steps} rollout steps: {collections.Counter(rollout)}"


@pytest.mark.parametrize("name", list(RUNS))
def test_training_resume_and_evaluation_keep_cuda_device_rules_and_sync_once_a_step(name, cuda, tmp_path, monkeypatch):
    check(name, cuda, tmp_path, monkeypatch)


def to_segments_on_the_host(m):  # the rollout's numpy storage stays on the CPU while the observations are on the device
    m.to_segments = lambda x, device: torch.as_tensor(x).transpose(1, 2).flatten(0, 1)


def refit_observations_on_the_host(m):  # fit_decoder indexes them with device indices
    fit = m.fit_decoder
    m.fit_decoder = lambda data, *args: fit((data[0].cpu(), *data[1:]), *args)


@pytest.mark.parametrize("name, patch", [("ppo_gaussian.py", to_segments_on_the_host),
                                         ("gorl_ppo_fm.py", refit_observations_on_the_host)])
def test_the_check_catches_a_cpu_tensor_indexed_by_a_device_index(name, patch, cuda, tmp_path, monkeypatch):
    with pytest.raises(pytest.fail.Exception, match=r"aten\.index\.Tensor at .*: CPU tensors \[\(\d+, \d+\)\] with device"):
        check(name, cuda, tmp_path, monkeypatch, patch)


# ---------------------------------------------------------------- the checkpoint's GPU RNG states
def test_a_checkpoint_from_more_gpus_resumes_on_fewer(monkeypatch):
    """Saved on 2 GPUs, resumed where there is 1: the state of the GPU that exists is restored (no IndexError)."""
    m, restored = load_script("ppo_gaussian.py"), []
    for name, stub in {"is_initialized": lambda: True, "device_count": lambda: 1, "set_rng_state_all": restored.append}.items():
        monkeypatch.setattr(torch.cuda, name, stub)
    states = [torch.full((16,), k, dtype=torch.uint8) for k in (1, 2)]
    checkpoint = {"rng": {"torch": torch.get_rng_state(), "cuda": states}, "loop": {"global_step": 0}, "run_name": "run"}
    m.restore(checkpoint, {})
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], states[0])


def test_a_run_without_cuda_never_starts_it_for_its_checkpoints(monkeypatch, tmp_path):
    """A --no-cuda run on a machine with a GPU: its checkpoints save no GPU RNG state (asking for it would start CUDA)."""
    m = load_script("ppo_gaussian.py")

    def starts_cuda():
        raise AssertionError("get_rng_state_all starts CUDA on GPU 0")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is there, CUDA not started (is_initialized)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", starts_cuda)
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/run")
    m.save_checkpoint(m.Args(env_id="Hopper-v5"), "dm_control", "run", {}, {"global_step": 0})
    assert torch.load("runs/run/checkpoint.pt", weights_only=True)["rng"]["cuda"] == []


# ---------------------------------------------------------------- FPO's and DPPO's evaluation noise
@pytest.mark.parametrize("name", ["fpo.py", "dppo.py"])
def test_a_model_trained_on_the_gpu_evaluates_to_its_logged_return_on_the_cpu(name, cuda, tmp_path, monkeypatch, capsys):
    """Their evaluation samples noise: from a seeded CPU generator, moved to the device, so --eval-checkpoint on the CPU
    reproduces the return logged on the GPU (a generator on the model's device would draw other numbers there)."""
    m, (argv, _) = load_script(name), RUNS[name]
    monkeypatch.chdir(tmp_path)
    run(m, argv + ["--save-model"], cuda)
    from conftest import only_run_dir, read_scalars

    logged = read_scalars(only_run_dir(tmp_path))["eval/episodic_return"][-1][1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # now a CPU-only machine, without the harness
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", [m.__file__, "--eval-checkpoint", *glob.glob("runs/*/*.cleanrl_model")])
        m.main(m.parse_args())
    out = capsys.readouterr().out
    assert float(out.split("eval/episodic_return=")[-1].split()[0]) == pytest.approx(logged, rel=1e-5, abs=1e-4), out


# ---------------------------------------------------------------- the replay buffer in a checkpoint
def test_a_checkpoint_holds_the_filled_rows_of_the_replay_buffer_only():
    m, out = load_script("sac_gaussian.py"), __import__("io").BytesIO()
    rb = m.ReplayBuffer(1_000_000, 11, 3, "cpu")
    rows = lambda n: __import__("numpy").ones((n, 11), dtype="float32")  # noqa: E731
    rb.add(rows(10), rows(10)[:, :3], rows(10)[:, 0], rows(10), rows(10)[:, 0] > 2)
    torch.save(rb.state_dict(), out)
    assert out.tell() < 50_000, out.tell()  # 10 rows, not the preallocated million (110 MB)


# ---------------------------------------------------------------- the suite itself runs on the CPU
def test_the_suite_pins_the_cpu():
    """conftest hides any GPU from this process and the scripts it starts, so a GPU CI box runs what this one runs (the
    tests that mean a device fake one, as above)."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()
