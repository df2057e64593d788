"""Writes that never leave a partial file or folder in place of a good one."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reached(point: str) -> None:
    """Called at each step of an `atomic_directory` swap; the fault-injection tests replace it to
    kill the process exactly there."""


def _aside_folders(target: Path) -> list[Path]:
    """Previous versions of ``target`` set aside by a swap (``.NAME.old-*``), newest last."""
    return sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)


def recover_interrupted_swap(target: str | Path) -> None:
    """Finish or undo a swap of ``target`` that a kill interrupted (see `atomic_directory`).

    Killed after the old folder went aside but before the new one came in: ``target`` is missing,
    and the old folder is renamed back (the new one may be incomplete). Killed after the new one
    came in: the old folder is deleted.
    """
    target = Path(target)
    aside = _aside_folders(target) if target.parent.is_dir() else []
    if not aside:
        return
    if not target.exists():
        os.rename(aside.pop(), target)
        _fsync_dir(target.parent)
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)


def _carry_over(source: Path, dest: Path) -> None:
    """Hard-link (or copy) into ``dest`` every file of ``source`` that ``dest`` lacks: a rewritten
    folder keeps the files its writer did not rewrite (a user's notes, a README)."""
    for path in sorted(source.rglob("*")):
        into = dest / path.relative_to(source)
        if into.exists() or into.is_symlink() or not into.parent.is_dir():
            continue  # rewritten (the new version wins), or inside something the writer replaced
        if path.is_symlink():
            os.symlink(os.readlink(path), into)
        elif path.is_dir():
            into.mkdir()
        else:
            try:
                os.link(path, into)
            except OSError:  # a filesystem without hard links
                shutil.copy2(path, into)


def _usual_permissions(folder: Path) -> None:
    """Give every file written into ``folder`` the permissions a plain new file gets here (the
    umask's) at least: safetensors >= 0.8 creates its files owner-only (0600), and a run or export
    folder copied to a server run by another user would be unreadable there. Nothing is narrowed."""
    usual = folder.stat().st_mode & 0o666  # mkdir applied the umask to 0777
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode & 0o7777
            if mode & usual != usual:
                os.chmod(path, mode | usual)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``, as a whole.

    - ``target`` missing: the temporary folder is renamed onto it (one atomic step).
    - ``target`` present: files of ``target`` that the block did not write are linked into the
      temporary folder (so a run folder keeps its logs, a user's notes stay), then the whole folder
      is swapped: ``target`` is renamed aside, the new folder renamed in, the old one deleted. A kill
      between the two renames leaves ``target`` missing and the old folder aside; the next write
      (or `lomix.load`) of ``target`` renames it back (`recover_interrupted_swap`). At no point
      does ``target`` hold a mix of old and new files.
    On any exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        _reached("written")
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a folder")
        _usual_permissions(tmp)
        if target.exists():
            _carry_over(target, tmp)
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
        _reached("complete")
        if not target.exists():
            os.rename(tmp, target)
        else:
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            _reached("aside")
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            _reached("swapped")
            shutil.rmtree(old)
        _fsync_dir(target.parent)
        _reached("done")
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)  # failed between the renames: the old folder goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
