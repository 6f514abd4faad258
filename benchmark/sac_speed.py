"""The cost of one SAC update: milliseconds (median of --updates after warm-up) and aten operations per update.

    python benchmark/sac_speed.py                                   # sac_gaussian.py, eager and compiled
    python benchmark/sac_speed.py --script old_sac_gaussian.py --modes eager   # another version of the script
    python benchmark/sac_speed.py --env-sps                         # also env steps/s at --utd-ratio 20, end to end

The update is the script's own (`make_sac`, `ReplayBuffer`, `sac_update`, and `compile_update` with --compile), on a
buffer of random Hopper-sized transitions (obs 11, actions 3), batch 256, --threads PyTorch threads, on the CPU.
Operations are the aten calls a TorchDispatchMode sees (eager only: under a dispatch mode torch.compile runs the
function eagerly), and kernels the profiler's count (`kernels`), both averaged over two actor periods. `--env-sps`
runs the script itself on Hopper-v5 twice, 1000 random steps then 100 and 300 learning steps at --utd-ratio 20, and
divides the 200 extra steps by the extra wall clock (so start-up and compilation cancel out), and projects the
paper's 4M-step run.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch._inductor.config
from torch.utils._python_dispatch import TorchDispatchMode

torch._inductor.config.cpp.enable_kernel_profile = True  # each compiled kernel a profiler event, for `kernels`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernels(step, n):
    """Kernels per update over `n` updates, from the profiler (with inductor's per-kernel profiling on): the aten ops
    that run outside compiled graphs (not nested in another aten op) and every kernel a compiled graph launches (its
    generated C++ kernels and the aten ops it calls). A TorchDispatchMode cannot count compiled code: under one,
    torch.compile runs the function eagerly."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    count = 0
    for event in prof.events():
        parent, ancestors = event.cpu_parent, []
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        in_graph = ancestors and ancestors[0].startswith("## Call CompiledFxGraph")
        top_level_aten = event.name.startswith("aten::") and not any(a.startswith(("aten::", "## Call")) for a in ancestors)
        count += in_graph or top_level_aten
    return count / n


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def updater(m, compiled):
    """The script's update, its networks and a batch sampler, as its main loop uses them."""
    args = m.Args(env_id="Hopper-v5")
    device, obs_dim, action_dim = torch.device("cpu"), 11, 3
    sac, rb = m.make_sac(obs_dim, action_dim, args, device), m.ReplayBuffer(10_000, obs_dim, action_dim, device)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).numpy()  # noqa: E731
    rb.add(rand(10_000, obs_dim), rand(10_000, action_dim), rand(10_000), rand(10_000, obs_dim), (rand(10_000) > 2))
    names = m.sac_update.__code__.co_varnames
    update = m.compile_update(m.sac_update, device) if compiled else m.sac_update
    counter = iter(range(10**9))

    def step():  # one update as the script's loop makes it: a critic step, and every policy_frequency the actor steps
        i, batch = next(counter), rb.sample(args.batch_size)
        if "actor" not in names:  # the version before: one call, the actor steps inside
            return update(sac, *batch, args, i)
        out = update(sac, *batch, args, False)
        for _ in range(args.policy_frequency if i % args.policy_frequency == 0 else 0):
            update(sac, *batch, args, True)
        return out

    return step, args.policy_frequency


def measure(path, compiled, updates):
    m = load(path)
    step, period = updater(m, compiled)
    start = time.time()
    for _ in range(2 * period):  # compiles, with and without the actor step
        step()
    warmup = time.time() - start
    for _ in range(50):
        step()
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    launched = kernels(step, 2 * period)
    if compiled:  # under a dispatch mode torch.compile runs the function eagerly, and recompiles after it
        return statistics.median(times) * 1e3, float("nan"), launched, warmup
    with CountOps() as ops:
        for _ in range(2 * period):
            step()
    return statistics.median(times) * 1e3, ops.count / (2 * period), launched, warmup


def env_sps(path, threads, extra):
    """Hopper-v5 env steps per second at --utd-ratio 20 past the random phase: two runs, 200 learning steps apart."""
    seconds = []
    for total in (1100, 1300):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, path, "--env-id", "Hopper-v5", "--num-envs", "1", "--utd-ratio", "20", "--learning-starts",
                   "1000", "--total-timesteps", str(total), "--eval-every", "100000", "--num-eval-envs", "1", "--threads",
                   str(threads), "--no-cuda", *extra]
            start = time.time()
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=dict(os.environ, MUJOCO_GL="disable"))
            seconds.append(time.time() - start)
            if r.returncode != 0:
                sys.exit(f"error: {' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return 200 / (seconds[1] - seconds[0])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", default=os.path.join(ROOT, "sac_gaussian.py"))
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--updates", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--env-sps", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MUJOCO_GL", "disable")
    print(f"{os.path.basename(args.script)}, {args.threads} thread(s), batch 256, median of {args.updates} updates")
    print("| mode | ms per update | aten ops per update (dispatch mode) | kernels per update (profiler) | warm-up (s) | "
          "env steps/s at UTD 20 | 4M steps at that rate |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:
        ms, ops, launched, warmup = measure(args.script, mode == "compiled", args.updates)
        row = f"| {mode} | {ms:.2f} | {'-' if ops != ops else f'{ops:.0f}'} | {launched:.0f} | {warmup:.1f} |"
        if args.env_sps:
            has_flag = "compile" in open(args.script).read()  # the version before had none: eager
            sps = env_sps(args.script, args.threads, ["--compile", "on" if mode == "compiled" else "off"] if has_flag else [])
            row += f" {sps:.1f} | {4e6 / sps / 86400:.1f} days |"
        else:
            row += " | |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
