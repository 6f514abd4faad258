"""Does requirements.txt resolve to wheels on every Python and platform it claims? Asks the package index, installs nothing.

    python benchmark/check_requirements.py                      # CPython 3.11-3.14 on the four platforms below
    python benchmark/check_requirements.py --pythons 3.12 --platforms linux-x86_64

For each (Python, platform) it prints which EnvPool line applies and runs
`pip install --dry-run --only-binary=:all: --python-version X --platform P --ignore-installed -r ... --target <tmp>`.
pip evaluates environment markers for the machine it runs on, not for --python-version/--platform, so the markers
are evaluated here for the target first and pip gets the requirement lines that apply there, markers removed. The
same holds for the markers inside the packages' own dependencies (torch's CUDA libraries, for one): a target that
is another OS than this machine may fail on those alone; such a target is checked again with --no-deps (every pin
has a wheel) and the report says which check passed. Needs the index (about a minute per target: lazy wheels via
HTTP range requests, so torch's large wheels are not downloaded). Exit code 0 when every target passes.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile

try:
    from packaging.requirements import Requirement
except ImportError:  # packaging comes with matplotlib; pip vendors it too
    from pip._vendor.packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pip 23 does not widen --platform to older manylinux tags, so every tag a wheel of ours uses is listed.
MANYLINUX = ["manylinux_2_{}_{{}}".format(v) for v in range(28, 16, -1)] + ["manylinux2014_{}"]
PLATFORMS = {  # name -> (pip --platform tags, marker environment)
    "linux-x86_64": ([t.format("x86_64") for t in MANYLINUX],
                     {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}),
    "linux-aarch64": ([t.format("aarch64") for t in MANYLINUX],
                      {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"}),
    "macos-arm64": ([f"macosx_{v}_0_arm64" for v in range(15, 10, -1)],
                    {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}),
    "windows-x86_64": (["win_amd64"], {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"}),
}


def requirement_lines(path, python, env):
    """The lines of `path` that apply on the target, markers removed (pip would evaluate them for this machine)."""
    environment = {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "os_name": "nt" if env["sys_platform"] == "win32" else "posix",
                   **env}
    lines = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(environment):
            req.marker = None
            lines.append(str(req))
    return lines


def dry_run(lines, python, tags, no_deps):
    with tempfile.TemporaryDirectory() as tmp:
        req_file = os.path.join(tmp, "requirements.txt")
        with open(req_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--only-binary=:all:", "--python-version", python,
               *[a for t in tags for a in ("--platform", t)], "--ignore-installed", "--use-feature=fast-deps",
               "--target", os.path.join(tmp, "target"), "-r", req_file, *(["--no-deps"] if no_deps else [])]
        r = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
    would = [line for line in r.stdout.splitlines() if line.startswith("Would install")]
    if r.returncode == 0:
        return True, would[0] if would else ""
    return False, errors[-1] if errors else r.stderr.strip()[-300:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requirements", default=os.path.join(ROOT, "requirements.txt"))
    parser.add_argument("--pythons", nargs="+", default=["3.11", "3.12", "3.13", "3.14"])
    parser.add_argument("--platforms", nargs="+", default=list(PLATFORMS), choices=list(PLATFORMS))
    parser.add_argument("--verbose", action="store_true", help="print pip's full 'Would install' line")
    args = parser.parse_args()
    host = {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}.get(platform.system(), "?")
    failed = 0
    for name in args.platforms:
        for python in args.pythons:
            tags, env = PLATFORMS[name]
            lines = requirement_lines(args.requirements, python, env)
            envpool = next((line for line in lines if line.startswith("envpool")), "no envpool (dm_control only)")
            ok, detail = dry_run(lines, python, tags, no_deps=False)
            check = "full resolution"
            if not ok and not name.startswith(host):
                # The failure may be a dependency marker evaluated for this machine; at least check every pin's wheel.
                ok, detail = dry_run(lines, python, tags, no_deps=True)
                check = "pinned wheels only (--no-deps; the full resolution failed: dependency markers evaluate for this host)"
            failed += not ok
            if ok and not args.verbose:
                detail = f"{len(detail.split()) - 2} packages"
            print(f"{'PASS' if ok else 'FAIL'} python {python} {name}: {envpool}; {check}: {detail}", flush=True)
    print(f"{failed} target(s) failed" if failed else "all targets resolve")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
