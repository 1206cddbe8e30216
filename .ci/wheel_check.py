"""The wheel check (``make wheel-check``, run by ``.ci/run`` after ``make test``).

Builds the wheel, then for the core install and for each extra alone (every key of
``[project.optional-dependencies]`` but ``dev``) makes a fresh venv (no system site packages), installs only
``vitscope[extra]`` with ``-c constraints.txt``, and runs `.ci/wheel_smoke.py` in it from a folder outside the
repository: every subcommand and every registered method in the core venv, each optional model family in every
venv (it loads where its extra is installed, and is refused with the one-line ``pip install 'vitscope[...]'``
error where not). A module that vitscope imports at run time but does not declare fails here, as the test
command's environment (``.[dev]``) cannot show it.

uv makes the venvs: it hard-links packages from its cache, so torch is downloaded once and the venvs cost
seconds, not minutes. uv is told the indexes and find-links that pip is configured with here (``pip config
list``), so it resolves the same files as the Makefile's pip.

Usage: ``python .ci/wheel_check.py [--only core,hf] [--full] [--select flow,report] [--keep] [--work DIR]``. Exit 0 when every step
passed. Needs uv (``pip install -c constraints.txt uv``) beside this interpreter or on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
SMOKE = ROOT / ".ci" / "wheel_smoke.py"
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                "vitscope-demo", "runs")


def extras() -> list[str]:
    """The user-facing extras of pyproject.toml (all but ``dev``), in their order there."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [e for e in project.get("optional-dependencies", {}) if e != "dev"]


def variants() -> list[str]:
    """What gets a venv: ``core`` (the wheel alone) and each extra."""
    return ["core", *extras()]


def find_uv() -> str:
    for candidate in (Path(sys.executable).parent / "uv", shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    sys.exit("wheel check: uv not found (pip install -c constraints.txt uv)")


def pip_sources() -> list[str]:
    """pip's configured index-url / extra-index-url / find-links as uv options (none: uv's defaults)."""
    try:
        res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    pairs: list[tuple[str, str]] = []
    flag = {"index-url": "--default-index", "extra-index-url": "--index", "find-links": "--find-links"}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if sep and name in flag:
            for url in value.strip().strip("'\"").split():
                if (flag[name], url) not in pairs:  # (pip lists a setting of its environment and its file both)
                    pairs.append((flag[name], url))
    options = [part for pair in pairs for part in pair]
    if options:  # a package on several indexes: the best version wins, as with pip
        options += ["--index-strategy", "unsafe-best-match"]
    return options


def run(argv: list[str], log: Path, **kwargs: object) -> tuple[int, float]:
    """Run ``argv`` with its output in ``log``: (exit code, seconds)."""
    start = time.monotonic()
    with log.open("w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, **kwargs).returncode  # type: ignore[call-overload]
    return rc, time.monotonic() - start


def build_wheel(uv: str, work: Path, sources: list[str]) -> Path:
    """The wheel of the working tree (a copy of it, so nothing is written into the repository)."""
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    log = work / "build.log"
    rc, seconds = run([uv, "build", "--wheel", "--out-dir", str(work / "dist"), "--build-constraints",
                       str(CONSTRAINTS), *sources, str(src)], log, env=_uv_env())
    if rc:
        print(log.read_text()[-4000:])
        sys.exit(f"wheel check: building the wheel failed (exit {rc})")
    (wheel,) = (work / "dist").glob("vitscope-*.whl")
    print(f"built {wheel.name} in {seconds:.1f}s", flush=True)
    return wheel


def _uv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    return env


def make_venv(uv: str, wheel: Path, variant: str, work: Path, sources: list[str]) -> tuple[Path | None, float]:
    """A fresh venv with ``vitscope[variant]`` (or the wheel alone for ``core``): (its python or None, seconds)."""
    venv = work / "venvs" / variant
    log = work / f"install-{variant}.log"
    start = time.monotonic()
    rc, _ = run([uv, "venv", "--clear", "--no-project", "--python", sys.executable, str(venv)], log, env=_uv_env(),
                cwd=work)
    if rc == 0:
        req = f"vitscope @ {wheel.as_uri()}" if variant == "core" else f"vitscope[{variant}] @ {wheel.as_uri()}"
        rc, _ = run([uv, "pip", "install", "--python", str(venv / "bin" / "python"), "-c", str(CONSTRAINTS),
                     *sources, req], log, env=_uv_env(), cwd=work)
    seconds = time.monotonic() - start
    if rc:
        print(f"[{variant}] install failed (exit {rc}):\n{log.read_text()[-4000:]}", flush=True)
        return None, seconds
    return venv / "bin" / "python", seconds


def smoke(python: Path, variant: str, work: Path, core: bool, select: str | None = None) -> list[dict[str, object]]:
    """Run the smoke program in the venv from ``work/run-<variant>``, echoing its lines: its step results."""
    run_dir = work / f"run-{variant}"
    run_dir.mkdir()
    script = work / "wheel_smoke.py"  # run from outside the repository
    results = work / f"results-{variant}.json"
    argv = [str(python), str(script), "--work", str(run_dir), "--results", str(results)]
    if not core:
        argv.append("--no-core")
    if select:
        argv += ["--select", select]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{variant}] {line}", end="", flush=True)
    rc = proc.wait()
    if not results.exists():
        return [{"name": "smoke program", "ok": False, "why": f"exit {rc} before writing results", "seconds": 0}]
    return list(json.loads(results.read_text()))


def summary(rows: list[tuple[str, str, bool, float, str]]) -> str:
    """The table: venv, step, ok/FAIL, seconds (and why a step failed)."""
    width = max(len(r[1]) for r in rows)
    lines = [f"{'venv':<10} {'step':<{width}}  result  seconds", "-" * (width + 30)]
    for venv, step, ok, seconds, why in rows:
        lines.append(f"{venv:<10} {step:<{width}}  {'ok' if ok else 'FAIL':<6}  {seconds:7.1f}"
                     + (f"  {why}" if why else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="Comma-separated venvs to check (core and/or extras; default all).")
    parser.add_argument("--full", action="store_true", help="Every subcommand and method in every venv too.")
    parser.add_argument("--select", help="Comma-separated words: only the smoke steps whose name has one.")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (printed).")
    parser.add_argument("--work", type=Path, help="Work folder (default: a new temporary one).")
    args = parser.parse_args(argv)
    chosen = variants()
    if args.only:
        wanted = [v.strip() for v in args.only.split(",") if v.strip()]
        unknown = sorted(set(wanted) - set(chosen))
        if unknown:
            sys.exit(f"wheel check: unknown venv {unknown[0]!r}: choose from {', '.join(chosen)}")
        chosen = [v for v in chosen if v in wanted]
    start = time.monotonic()
    work = (args.work or Path(tempfile.mkdtemp(prefix="vitscope-wheel-check-"))).resolve()
    if work.is_relative_to(ROOT):
        sys.exit("wheel check: --work must be outside the repository")
    work.mkdir(parents=True, exist_ok=True)
    uv = find_uv()
    sources = pip_sources()
    print(f"wheel check in {work} with {subprocess.run([uv, '--version'], capture_output=True, text=True).stdout.strip()}"
          f"; venvs: {', '.join(chosen)}", flush=True)
    rows: list[tuple[str, str, bool, float, str]] = []
    try:
        wheel = build_wheel(uv, work, sources)
        shutil.copy(SMOKE, work / "wheel_smoke.py")
        for variant in chosen:
            python, seconds = make_venv(uv, wheel, variant, work, sources)
            spec = "vitscope" if variant == "core" else f"vitscope[{variant}]"
            rows.append((variant, f"install {spec}", python is not None, seconds, "" if python else "see above"))
            if python is None:
                continue
            print(f"[{variant}] installed {spec} in {seconds:.1f}s", flush=True)
            for r in smoke(python, variant, work, core=variant == "core" or args.full, select=args.select):
                rows.append((variant, str(r["name"]), bool(r["ok"]), float(r["seconds"]), str(r["why"])))  # type: ignore[arg-type]
            if not args.keep:  # its packages are hard links into uv's cache: this frees little, but keeps /tmp tidy
                shutil.rmtree(work / "venvs" / variant, ignore_errors=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - start
    failed = [r for r in rows if not r[2]]
    print("\n" + summary(rows))
    print(f"\nwheel check: {len(rows)} steps in {len(chosen)} venvs, {total:.0f}s wall"
          + (f"; kept {work}" if args.keep or args.work else ""))
    print(f"wheel-check: {len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
