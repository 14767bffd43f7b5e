"""The output folder: what may be written, how it is replaced, and what is left behind.

Rules (checked by :func:`check_output` before a run loads anything):

- an output folder the project wrote holds the marker file :data:`MARKER`; an
  existing folder is replaced (``overwrite=True``) only when it is empty or holds
  that marker, so ``--output . --overwrite`` never deletes a user's files;
- ``/`` (any filesystem root), the home folder, the working directory and its
  ancestors are refused, and so is a symbolic link (it would be replaced, not
  followed);
- files are written to a staging folder ``.<name>.tmp-<pid>-<random>`` next to the
  output and swapped in at the end: atomically where the system has
  ``renameat2(RENAME_EXCHANGE)`` (Linux), otherwise the old folder is renamed to
  ``.<name>.old-<pid>`` until the new one is in place, and put back by the next
  run if the process died between the two renames;
- every run removes the staging and backup folders (and the private temporary
  folders of :func:`private_tempdir`) left by a process that no longer runs, or
  older than :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optimum_lowrank.errors import OutputError, OutputExistsError

__all__ = ["MARKER", "STALE_SECONDS", "check_output", "pid_alive", "private_tempdir", "remove_stale", "staging"]

#: File written into every output folder; its presence lets ``overwrite`` replace the folder.
MARKER = ".optimum-lowrank-output"
#: Leftover temporary folders older than this (seconds) are removed even if their process id is in use.
STALE_SECONDS = 24 * 3600
#: Prefix of the private temporary folders in the system temp folder (see :func:`private_tempdir`).
TEMP_PREFIX = "optimum-lowrank-"

_LEFTOVER = re.compile(r"\.(?:tmp|old)-(\d+)-")


def check_output(output: str | os.PathLike | None, overwrite: bool) -> Path | None:
    """Check that ``output`` may be written (and replaced, with ``overwrite``), before any work.

    Also puts back an output folder a killed run left renamed away, and removes the
    run leftovers of dead processes next to it (see :func:`remove_stale`).

    Parameters
    ----------
    output : path or None
        None: nothing will be written.
    overwrite : bool
        Allow replacing a non-empty folder that holds :data:`MARKER`.

    Returns
    -------
    Path or None
        The absolute output path.

    Raises
    ------
    OutputError
        ``output`` is a filesystem root, the home folder, the working directory or
        one of its ancestors, a symbolic link, a file, or its parent is not writable.
    OutputExistsError
        ``output`` is not empty and ``overwrite`` is False, or it holds files not
        written by this project (no marker), whatever ``overwrite`` says.
    """
    if output is None:
        return None
    out_dir = Path(os.path.abspath(Path(output).expanduser()))
    if out_dir.is_symlink():
        raise OutputError(f"output {out_dir} is a symbolic link; give the folder it points to, or a new path")
    real = out_dir.resolve()
    protected = {Path(real.anchor): "a filesystem root", Path.home().resolve(): "your home folder"}
    cwd = Path.cwd().resolve()
    if real in protected:
        raise OutputError(f"output {out_dir} is {protected[real]}; give a new or project-written folder")
    if cwd == real or real in cwd.parents:
        raise OutputError(f"output {out_dir} is the working directory or one of its ancestors; give a new or project-written folder")
    if out_dir.parent.exists():
        _recover(out_dir)
        remove_stale(out_dir.parent, f".{out_dir.name}.")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise OutputError(f"output {out_dir} exists and is not a folder")
        entries = list(out_dir.iterdir())
        if entries and not overwrite:
            raise OutputExistsError(f"output folder {out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
        if entries and not (out_dir / MARKER).is_file():
            shown = ", ".join(sorted(p.name for p in entries)[:5])
            raise OutputExistsError(
                f"output folder {out_dir} holds files not written by optimum-lowrank ({shown}{', ...' if len(entries) > 5 else ''}; "
                f"no {MARKER} marker); --overwrite replaces only empty or project-written folders: give a new folder"
            )
    ancestor = next((p for p in (out_dir.parent, *out_dir.parent.parents) if p.exists()), None)
    if ancestor is None or not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {out_dir}: {ancestor} is not a writable folder")
    return out_dir


@contextmanager
def staging(out_dir: Path | None) -> Iterator[Path]:
    """A temporary folder moved to ``out_dir`` (with :data:`MARKER`) if the block succeeds, removed otherwise.

    With ``out_dir`` None, a private folder in the system temp folder, always removed.
    """
    if out_dir is None:
        with private_tempdir() as tmp:
            yield Path(tmp)
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield folder
        (folder / MARKER).write_text(json.dumps({"written_by": "optimum-lowrank", "time": time.time()}) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes it 0700; an output folder is ordinary data
        _swap_in(folder, out_dir)
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def _swap_in(new: Path, out_dir: Path) -> None:
    """Move ``new`` to ``out_dir``; an existing ``out_dir`` ends up at ``new`` (removed by the caller)."""
    if not out_dir.exists():
        new.rename(out_dir)
        return
    if _exchange(new, out_dir):
        return
    backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
    out_dir.rename(backup)
    new.rename(out_dir)  # a kill between the two renames is repaired by the next check_output (_recover)
    shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _recover(out_dir: Path) -> None:
    """Put back an output folder renamed away by a run killed during the swap."""
    if out_dir.exists():
        return
    backups = [p for p in out_dir.parent.glob(f".{glob_escape(out_dir.name)}.old-*") if p.is_dir() and not _owner_alive(p)]
    if backups:
        newest = max(backups, key=lambda p: p.stat().st_mtime)
        newest.rename(out_dir)
        warnings.warn(f"put back the output folder {out_dir}, left renamed by an interrupted run", stacklevel=3)


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _owner_alive(path: Path) -> bool:
    """Whether the process named in a leftover's name (``.tmp-<pid>-`` / ``.old-<pid>-`` / ``-<pid>-``) still runs."""
    match = _LEFTOVER.search(path.name) or re.match(rf"{TEMP_PREFIX}(\d+)-", path.name)
    if match is None:
        return False
    return pid_alive(int(match.group(1)))


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs (a process of another user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def remove_stale(folder: Path, prefix: str, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove this project's leftovers named ``<prefix>tmp-<pid>-*`` / ``<prefix>old-<pid>-*`` (or,
    for ``prefix`` :data:`TEMP_PREFIX`, ``<prefix><pid>-*``) in ``folder`` whose process is gone or
    that are older than ``max_age`` seconds.

    Returns
    -------
    list of Path
        What was removed. Errors (a folder removed concurrently, no permission) are ignored.
    """
    removed = []
    now = time.time()
    try:
        candidates = list(folder.glob(f"{glob_escape(prefix)}*"))
    except OSError:
        return removed
    for path in candidates:
        name = path.name[len(prefix):]
        if prefix == TEMP_PREFIX:
            if not re.match(r"\d+-", name):
                continue
        elif not re.match(r"(tmp|old)-\d+-", name):
            continue
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        if _owner_alive(path) and age < max_age:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def private_tempdir() -> Iterator[str]:
    """A private folder ``<system temp>/optimum-lowrank-<pid>-*`` made the default of :mod:`tempfile`
    for the block (ONNX Runtime's quantizer and the exporters write there), removed at exit.

    Leftovers of killed runs (process gone, or older than :data:`STALE_SECONDS`) are removed on entry.
    """
    base = Path(tempfile.gettempdir())
    remove_stale(base, TEMP_PREFIX)
    folder = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=base)
    previous = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def read_json_cache(path: Path, parse=None):
    """The JSON cached at ``path`` (through ``parse`` if given), or None when absent; an entry that
    does not read or parse (a run killed while writing it, a hand edit) is removed with a warning."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return parse(data) if parse is not None else data
    except Exception as err:  # noqa: BLE001 - JSONDecodeError, UnicodeDecodeError, KeyError or TypeError from parse
        warnings.warn(f"the cache entry {path} is unreadable ({type(err).__name__}: {str(err)[:120]}); recomputing it", stacklevel=2)
        path.unlink(missing_ok=True)
        return None


def write_json_cache(path: Path, data) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(3).hex()}")
    try:
        partial.write_text(json.dumps(data), encoding="utf-8")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
