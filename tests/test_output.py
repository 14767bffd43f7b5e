"""The output folder: refused places, the marker, the swap, leftovers of killed runs (issue 15, findings 2 and 6)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from optimum_lowrank.cli import main
from optimum_lowrank.errors import OutputError, OutputExistsError
from optimum_lowrank.output import MARKER, check_output, private_tempdir, remove_stale, staging

RECIPE = "version: 1\n"


def _dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_overwrite_refuses_a_folder_with_foreign_files_before_the_run(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "recipe.yaml").write_text(RECIPE)
    monkeypatch.chdir(work)
    # the model does not exist: the output check must come first
    assert main(["optimize", "--model", str(tmp_path / "no-model"), "--recipe", "recipe.yaml", "--output", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "working directory" in err
    assert (work / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(OutputExistsError, match="not written by optimum-lowrank .*thesis.tex"):
        check_output(other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "x"


@pytest.mark.parametrize("where", ["/", "~", "..", "."])
def test_root_home_and_cwd_ancestors_are_refused(where, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(OutputError, match="filesystem root|home folder|working directory"):
        check_output(where, overwrite=True)


def test_symlink_output_is_refused(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(tmp_path / "link", overwrite=True)


def test_output_under_a_file_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a writable folder"):
        check_output(tmp_path / "file" / "out", overwrite=False)


def test_unwritable_parent_is_refused_up_front(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes anywhere: report the folder as the kernel would to another user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw))
    try:
        with pytest.raises(OutputError, match="not a writable folder"):
            check_output(locked / "out", overwrite=False)
    finally:
        locked.chmod(0o755)


def test_staging_writes_the_marker_swaps_and_uses_ordinary_permissions(tmp_path):
    out = tmp_path / "out"
    with staging(check_output(out, False)) as folder:
        (folder / "a.txt").write_text("1")
    assert (out / MARKER).is_file() and (out / "a.txt").read_text() == "1"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    with staging(check_output(out, True)) as folder:  # project-written: may be replaced
        (folder / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), staging(check_output(out, True)) as folder:
        (folder / "c.txt").write_text("3")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"], "a failed run keeps the old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_dead_runs_are_removed_and_a_renamed_output_put_back(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"0" * 100)
    live = tmp_path / f".out.tmp-{os.getpid()}-def"
    live.mkdir()
    backup = tmp_path / f".out.old-{dead}-123"
    backup.mkdir()
    (backup / MARKER).write_text("{}")
    (backup / "report.json").write_text("{}")
    with pytest.warns(UserWarning, match="put back"):
        out = check_output(tmp_path / "out", overwrite=True)
    assert not stale.exists() and live.exists() and not backup.exists()
    assert (out / "report.json").is_file(), "the output a killed swap renamed away is put back"
    old = tmp_path / f".out.tmp-{os.getpid()}-old"
    old.mkdir()
    os.utime(old, (0, 0))
    assert remove_stale(tmp_path, ".out.", max_age=3600) == [old], "older than the stated age: removed even if the pid is alive"


def test_private_tempdir_holds_tempfile_and_sweeps_dead_ones():
    base = Path(tempfile.gettempdir())
    dead = base / f"optimum-lowrank-{_dead_pid()}-zzz"
    dead.mkdir(exist_ok=True)
    with private_tempdir() as folder:
        assert tempfile.gettempdir() == folder
        made = tempfile.mkdtemp(prefix="ort.quant.")
        assert Path(made).parent == Path(folder)
    assert not Path(folder).exists() and not dead.exists()
    assert tempfile.gettempdir() == str(base)
