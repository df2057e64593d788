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


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success its files land in ``target``.

    - ``target`` missing: the temporary folder is renamed onto it (one atomic step).
    - ``target`` present: each written file replaces its namesake with an atomic rename, files
      that were already there and not rewritten are kept (a run folder's logs, say).
    On any exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                fsync_file(path)
        if not target.exists():
            os.rename(tmp, target)
        else:
            if not target.is_dir():
                raise NotADirectoryError(f"{target} exists and is not a folder")
            for path in sorted(tmp.rglob("*")):
                dest = target / path.relative_to(tmp)
                if path.is_dir():
                    dest.mkdir(exist_ok=True)
                elif path.is_file():
                    os.replace(path, dest)
            shutil.rmtree(tmp)
        _fsync_dir(target.parent)
    except BaseException:
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
