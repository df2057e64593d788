"""Portable run folders: the paths a run's config names are saved absolute, so that ``lomix eval
RUN`` (and every other verb) works from any working directory.

A config field that holds a local path says so in its metadata: ``"path": True`` (a value that may
also be a hub id or a name: made absolute only when it names something that exists here) or
``"path": "always"`` (a folder the run creates, such as ``output_dir``); ``"keywords"`` lists values
with a meaning of their own that stay as they are (``data.train: bigbench``) even when a file of that
name happens to exist. Generic code therefore names no field of any method.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def _absolute(value: str, always: bool) -> str:
    path = Path(value).expanduser()
    if path.is_absolute() or not value or (not always and not path.exists()):
        return value
    return str(path.resolve())


def absolute_paths(config: Any) -> None:
    """Make every path field of the (nested) dataclass ``config`` absolute, in place."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        mark = field.metadata.get("path")
        if value in field.metadata.get("keywords", ()):
            continue
        if mark and isinstance(value, str):
            setattr(config, field.name, _absolute(value, mark == "always"))
        elif mark and isinstance(value, list):
            setattr(config, field.name, [_absolute(v, mark == "always") if isinstance(v, str) else v for v in value])
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            absolute_paths(value)
