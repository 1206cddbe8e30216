"""Files and folders vitscope writes get the user's umask (not mkstemp's 0600 / mkdtemp's 0700); an output
folder's unreadable subfolder counts as the user's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = textwrap.dedent("""
    import json, os, stat, sys
    os.umask(int(sys.argv[2], 8))
    from pathlib import Path
    from vitscope._io import atomic_write_text, make_temp_dir
    from vitscope.models.vit import save_vit
    from vitscope.train.report import model_report
    sys.path.insert(0, sys.argv[3])
    from tests.conftest import make_tiny_vit
    out = Path(sys.argv[1])
    model_report("vitscope:shapes", out / "report", images=4, localisation_images=0, samples=1, log=None)
    save_vit(make_tiny_vit(), out / "model")
    atomic_write_text(out / "a.txt", "x")
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in sorted(out.rglob("*"))}
    modes["temp"] = stat.S_IMODE(make_temp_dir(".t.", out).stat().st_mode)
    print(json.dumps(modes))
""")


@pytest.mark.parametrize("umask", ["022", "077"])
def test_written_files_follow_the_umask(tmp_path: Path, umask: str) -> None:
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), umask, str(Path(__file__).parents[1])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    modes = json.loads(res.stdout.strip().splitlines()[-1])
    mask = int(umask, 8)
    files = {k: v for k, v in modes.items() if "." in Path(k).name and k != "temp"}
    dirs = {k: v for k, v in modes.items() if k not in files}
    assert "report/report.md" in files and "model/model.safetensors" in files and "report" in dirs
    assert set(files.values()) == {0o666 & ~mask}, files
    assert set(dirs.values()) == {0o777 & ~mask}, dirs


def test_an_unreadable_subfolder_is_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder os.walk cannot list may hold anything: it makes -o a folder vitscope did not write (root reads
    everything, so the permission error is simulated)."""
    import os

    from vitscope._io import claim_output
    from vitscope.errors import VitscopeError

    (tmp_path / "out" / "private").mkdir(parents=True)
    (tmp_path / "out" / "private" / "x").mkdir()
    real = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)).name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(VitscopeError, match=r"did not write \(private/\)"):
        claim_output(tmp_path / "out", "report")
    claim_output(tmp_path / "out", "report", overwrite=True).check_writes(["report.md"])  # beside it: fine
