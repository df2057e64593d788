"""Pull a GLIDER expert library (``library.json`` + ``experts/<name>/``) from the hub or a folder.

    library = lomix.hub.pull_library("user/my-library@v1", out="runs/library")
    model = lomix.library.load_library(base_model, library, alpha=3.0)

The index is read at the revision asked for, which is then pinned to its commit: every expert is
pulled (and validated as a lomix mixture) from that same commit, so a library that moves while
pulling is never mixed. Expert folder names are checked like every other repository path.
Push a library with any hub client, or ``lomix hub push`` of each expert; it is a plain folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lomix.atomic import atomic_directory
from lomix.errors import CorruptFileError
from lomix.methods.glider.library import LIBRARY_NAME, Library

from .pull import _download, _snapshot_of, pull
from .spec import check_relative, parse_spec


def pull_library(
    spec: str | Path,
    out: str | Path,
    *,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Library:
    """Fetch the library ``spec`` (``namespace/name[@revision]`` or a folder) into ``out``; returns it.

    ``out`` is written in one atomic step after every expert has arrived and passed validation.
    """
    parsed = parse_spec(spec)
    if parsed.is_local:
        assert parsed.path is not None
        source = Library.open(parsed.path)
        label = str(parsed.path)
        index_text = (parsed.path / LIBRARY_NAME).read_text()
        base = str(parsed.path)
    else:
        label = str(parsed)
        path = _download(parsed, LIBRARY_NAME, label, token, cache_dir)
        commit = _snapshot_of(path, LIBRARY_NAME).name
        index_text = Path(path).read_text()
        source = Library.open(Path(path).parent)
        base = f"{parsed.repo_id}@{commit}"
    for entry in source.experts:
        check_relative(entry.folder, f"{label}: {LIBRARY_NAME} expert {entry.name!r} folder {entry.folder!r}")
    out = Path(out).expanduser()
    with atomic_directory(out) as tmp:
        (tmp / LIBRARY_NAME).write_text(index_text)
        for entry in source.experts:
            target = tmp / entry.folder
            if parsed.is_local:
                pulled = pull(Path(base) / entry.folder, kind="lomix")
                target.mkdir(parents=True, exist_ok=True)
                for name in pulled.files:
                    shutil.copyfile(pulled.folder / name, target / name)
            else:
                pull(base, target, kind="lomix", subfolder=entry.folder, token=token, cache_dir=cache_dir)
    library = Library.open(out)
    if [e.name for e in library.experts] != [e.name for e in source.experts]:
        raise CorruptFileError(f"{out / LIBRARY_NAME}: differs from {label}'s index after the copy")
    return library


__all__ = ["pull_library"]
