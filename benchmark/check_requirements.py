"""Do the README's two pip installs resolve to wheels on every Python and platform they claim? Asks the package index,
installs nothing.

    python benchmark/check_requirements.py                      # CPython 3.10-3.14 on the four platforms below
    python benchmark/check_requirements.py --pythons 3.12 --platforms linux-x86_64

The README installs with `pip install -r requirements.txt && pip install --no-deps dm-control==...` (.ci/run runs the
same command; the --no-deps pins are read from there). For each (Python, platform) it prints which EnvPool line
applies, resolves the first install with `pip install --dry-run --only-binary=:all: --python-version X --platform P
--ignore-installed --target <tmp> -r ...`, checks that the second install's pins have wheels there too, and that
every dependency of the second install comes from the first, except ALLOWED_MISSING. pip asks only its default index
(this machine's pip configuration is ignored unless --use-pip-config).
pip evaluates environment markers for the machine it runs on, not for --python-version/--platform, so the markers of
requirements.txt are evaluated here for the target and pip gets the lines that apply there, markers removed. The
markers inside the packages' own dependencies (torch's CUDA libraries, for one) pip would still evaluate for this
machine, so pip resolves in full only the target that is this machine's OS and CPU; any other target is resolved
level by level: pip --no-deps on the requirements so far, then the dependencies in the metadata of what it picked,
their markers evaluated here for the target, added as requirements, until nothing new comes (every package has a
wheel there and the version bounds met on the way hold together; pip's backtracking is not repeated). Needs the index
(under a minute per target: pip reads the wheels' metadata only, so torch's large wheels are not downloaded).
Exit code 0 when every target passes.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

try:
    from packaging.requirements import Requirement
except ImportError:  # packaging comes with matplotlib; pip vendors it too
    from pip._vendor.packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dm-control's dependencies that neither install brings: labmaze has wheels up to CPython 3.12 only, and only
# dm_control's locomotion mazes import it, never the scripts.
ALLOWED_MISSING = {"labmaze"}
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


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_environment(python, env):
    return {"python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "os_name": "nt" if env["sys_platform"] == "win32" else "posix",
            "extra": "", **env}


def applies(req, environment, extras=()):
    """Does `req`'s marker hold on the target (for the package's base requirements or one of `extras`)?"""
    return req.marker is None or any(req.marker.evaluate({**environment, "extra": e}) for e in {"", *extras})


def requirement_lines(path, environment):
    """The lines of `path` that apply on the target, markers removed (pip would evaluate them for this machine)."""
    lines = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if applies(req, environment):
            req.marker = None
            lines.append(str(req))
    return lines


def no_deps_pins(ci_run):
    """The pins of the README's second install, `pip install --no-deps PIN ...`, as .ci/run (the README's test command,
    verbatim) runs it."""
    pins = []
    for match in re.finditer(r"pip install --no-deps ([^&;|\n]+)", open(ci_run).read()):
        pins += match.group(1).split()
    if not pins:
        sys.exit(f"no `pip install --no-deps ...` in {ci_run}")
    return sorted(set(pins))


def dry_run(lines, python, tags, no_deps, pip_env):
    """(ok, error or "", {canonical name: pip's report entry} of what pip would install)"""
    with tempfile.TemporaryDirectory() as tmp:
        req_file, report_file = os.path.join(tmp, "requirements.txt"), os.path.join(tmp, "report.json")
        with open(req_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--only-binary=:all:", "--python-version", python,
               *[a for t in tags for a in ("--platform", t)], "--ignore-installed", "--use-feature=fast-deps",
               "--target", os.path.join(tmp, "target"), "--report", report_file, "-r", req_file,
               *(["--no-deps"] if no_deps else [])]
        r = subprocess.run(cmd, capture_output=True, text=True, env=pip_env)
        if r.returncode == 0:
            return True, "", {canonical(i["metadata"]["name"]): i for i in json.load(open(report_file))["install"]}
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
    return False, errors[-1] if errors else r.stderr.strip()[-300:], {}


def resolve_for_target(lines, python, tags, environment, pip_env):
    """Level by level with pip --no-deps, the packages' dependency markers evaluated for the target (see the top).
    Each level asks pip only for the names not picked yet; a bound that a package picked earlier misses sends every
    requirement so far to pip at once, which then picks versions meeting them all."""
    requirements, picked, pending = set(), {}, set(lines)
    while pending:
        requirements |= pending
        new_names = {canonical(Requirement(r).name) for r in pending} - set(picked)
        if any(canonical(r.name) in picked and not r.specifier.contains(picked[canonical(r.name)]["metadata"]["version"],
                                                                         prereleases=True) for r in map(Requirement, pending)):
            batch, picked = sorted(requirements), {}
        else:
            batch = sorted(r for r in requirements if canonical(Requirement(r).name) in new_names)
        if batch:
            ok, error, installs = dry_run(batch, python, tags, no_deps=True, pip_env=pip_env)
            if not ok:
                return ok, error, installs
            picked.update(installs)
        extras = {}
        for req in map(Requirement, requirements):
            extras.setdefault(canonical(req.name), set()).update(req.extras)
        wanted = set()
        for name, install in picked.items():
            for dependency in map(Requirement, install["metadata"].get("requires_dist") or []):
                if applies(dependency, environment, extras.get(name, ())):
                    dependency.marker = None
                    wanted.add(str(dependency))
        pending = wanted - requirements
    return True, "", picked


def listing(installs):
    return " ".join(sorted(f"{i['metadata']['name']}-{i['metadata']['version']}" for i in installs.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requirements", default=os.path.join(ROOT, "requirements.txt"))
    parser.add_argument("--ci-run", default=os.path.join(ROOT, ".ci", "run"), help="where the --no-deps pins are read")
    parser.add_argument("--pythons", nargs="+", default=["3.10", "3.11", "3.12", "3.13", "3.14"])
    parser.add_argument("--platforms", nargs="+", default=list(PLATFORMS), choices=list(PLATFORMS))
    parser.add_argument("--verbose", action="store_true", help="print the full lists of what each install would bring")
    parser.add_argument("--use-pip-config", action="store_true",
                        help="keep pip's configuration (extra indexes, find-links, constraints); by default pip asks only its "
                             "default index, the one every machine has, since a local index may carry other wheels or omit "
                             "Requires-Python (then pip here picks releases that the Python does not support)")
    args = parser.parse_args()
    pip_env = dict(os.environ)
    if not args.use_pip_config:
        for name in ["PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_NO_INDEX"]:
            pip_env.pop(name, None)
        pip_env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    second = no_deps_pins(args.ci_run)
    print(f"first install: -r {os.path.relpath(args.requirements)}; second install: --no-deps {' '.join(second)}")
    failed = 0
    for name in args.platforms:
        for python in args.pythons:
            tags, env = PLATFORMS[name]
            environment = marker_environment(python, env)
            lines = requirement_lines(args.requirements, environment)
            envpool = next((line for line in lines if line.startswith("envpool")), "no envpool (dm_control only)")
            if (env["sys_platform"], env["platform_machine"]) == (sys.platform, platform.machine()):
                ok, detail, first = dry_run(lines, python, tags, no_deps=False, pip_env=pip_env)
                check = "pip's full resolution"
            else:
                ok, detail, first = resolve_for_target(lines, python, tags, environment, pip_env)
                check = "resolution level by level (dependency markers for the target)"
            if ok:
                detail = listing(first) if args.verbose else f"{len(first)} packages"
            # The second install: its wheels exist, it pins what requirements.txt pins, and the first brings its deps.
            pinned = {canonical(Requirement(line).name): Requirement(line).specifier for line in lines}
            ok2, detail2, installs = dry_run(second, python, tags, no_deps=True, pip_env=pip_env)
            for pin in map(Requirement, second):
                if canonical(pin.name) in pinned and pinned[canonical(pin.name)] != pin.specifier:
                    ok2, detail2 = False, f"{pin} differs from requirements.txt's {pinned[canonical(pin.name)]}"
            if ok2:
                needed = {canonical(d.name) for i in installs.values()
                          for d in map(Requirement, i["metadata"].get("requires_dist") or []) if applies(d, environment)}
                missing = sorted(needed - set(first) - set(installs)) if ok else []
                ok2 = not set(missing) - ALLOWED_MISSING
                detail2 = listing(installs) if args.verbose else f"{len(installs)} wheel(s)"
                detail2 += f", dependencies from neither install: {', '.join(missing) if missing else 'none'}"
            failed += not (ok and ok2)
            print(f"{'PASS' if ok and ok2 else 'FAIL'} python {python} {name}: {envpool}; {check}: {detail}; "
                  f"second install: {detail2}", flush=True)
    print(f"{failed} target(s) failed" if failed else "all targets resolve")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
