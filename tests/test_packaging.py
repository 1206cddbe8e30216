"""The sdist and wheel: license, metadata, docs/tests/constraints in the sdist, and an installed wheel that runs
``vitscope demo`` and ``vitscope info`` from outside the repository (no editable install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("build")
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "vitscope-demo", "runs"))
    out = work / "dist"
    # sdist first, then the wheel built from the unpacked sdist (so the sdist is proven complete)
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir",
                          str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (sdist,) = out.glob("vitscope-*.tar.gz")
    (wheel,) = out.glob("vitscope-*.whl")
    return {"sdist": sdist, "wheel": wheel, "work": work}


def test_sdist_has_license_docs_tests_and_constraints(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("LICENSE", "constraints.txt", "Makefile", "docs/models.md", "docs/methods.md",
                   "tests/conftest.py", "tests/test_cli_errors.py", "tests/capture/test_capture.py",
                   "benchmarks/README.md", ".ci/run"):
        assert needed in names, needed
    assert not any("__pycache__" in n for n in names)


def test_wheel_metadata_license_and_links(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
        lic = next(n for n in names if n.endswith("licenses/LICENSE"))
        assert "Apache License" in zf.read(lic).decode() and "Version 2.0" in zf.read(lic).decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Project-URL: Source, https://github.com/vitscope/vitscope" in meta
    assert "Classifier: Programming Language :: Python :: 3" in meta
    description = meta.split("\n\n", 1)[1]
    relative = [part for part in description.split("](")[1:] if not part.startswith(("http://", "https://", "#"))]
    assert not relative, f"links that break on the package page: {relative[:3]}"
    assert any(n.startswith("vitscope/viewer/") and n.endswith(".js") for n in names)
    assert "vitscope/py.typed" in names


def test_installed_wheel_runs_demo_and_info_outside_the_repo(dists: dict[str, Path]) -> None:
    work = dists["work"]
    env_dir = work / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies (torch, ...) come from the test environment's site-packages, read as a plain path:
    # its .pth files (the editable vitscope among them) are not processed there
    (purelib / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                          "-q", str(dists["wheel"])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run_dir = work / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(py), "-c", "import vitscope; print(vitscope.__file__)"], cwd=run_dir, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env_dir)  # the wheel, not the repository's src/
    script = env_dir / "bin" / "vitscope"
    info = subprocess.run([str(script), "info"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "prefix tokens" in info.stdout
    demo = subprocess.run([str(script), "demo", "-o", "demo"], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert demo.returncode == 0, demo.stderr
    written = {p.name for p in (run_dir / "demo").iterdir()}
    assert "viewer.html" in written and any(n.endswith(".png") for n in written)
