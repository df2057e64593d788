"""Where a mixture or adapter comes from: ``namespace/name[@revision]`` on the hub, or a local folder.

    "user/repo"                the default branch (main)
    "user/repo@v1.0"           a branch or a tag
    "user/repo@refs/pr/3"      any git revision, slashes included
    "user/repo@<40-hex sha>"   a commit: immutable, and served from the cache without a request
    "./runs/mixture", "/abs/path", "~/adapters/a", Path(...)   a local folder

A string that names an existing folder is that folder (as in transformers' ``from_pretrained``);
anything else must be a hub id of the form ``namespace/name``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lomix.paths import unsafe_reason

from .errors import SpecError, UnsafePathError

DEFAULT_REVISION = "main"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# The hub's own rule for a repository id: namespace/name, letters, digits, '-', '_', '.',
# no '--' or '..', not starting or ending with '-' or '.'.
_NAME = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
REPO_ID_RE = re.compile(rf"^{_NAME}/{_NAME}$")
_LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


@dataclass(frozen=True)
class Spec:
    """A parsed source: either ``repo_id`` (+ ``revision``) or ``path``."""

    repo_id: str | None = None
    revision: str = DEFAULT_REVISION
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.repo_id}@{self.revision}"


def check_relative(name: str, where: str) -> str:
    """Return ``name`` if it is a safe relative path; otherwise raise `UnsafePathError` naming ``where``."""
    reason = unsafe_reason(name)
    if reason is not None:
        raise UnsafePathError(f"{where}: refusing the path {name!r}: {reason}; lomix never writes outside its folders")
    return name


def check_revision(revision: str, where: str) -> str:
    """A revision becomes a file name in the hub cache (``refs/<revision>``): keep it inside."""
    if not revision:
        raise SpecError(f"{where}: empty revision after '@'; write namespace/name@branch, @tag or @commit")
    reason = unsafe_reason(revision)
    if reason is not None or revision.endswith("/"):
        raise UnsafePathError(f"{where}: refusing the revision {revision!r}: {reason or 'it ends with /'}")
    return revision


def parse_spec(spec: str | Path) -> Spec:
    """Parse a source spec (see the module docstring)."""
    if isinstance(spec, Path):
        return Spec(path=spec.expanduser())
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"expected a hub id (namespace/name[@revision]) or a folder, got {spec!r}")
    spec = spec.strip()
    if spec in (".", "..") or spec.startswith(_LOCAL_PREFIXES) or Path(spec).expanduser().is_dir():
        return Spec(path=Path(spec).expanduser())
    repo_id, at, revision = spec.partition("@")
    if not REPO_ID_RE.match(repo_id):
        raise SpecError(
            f"{spec!r} is neither an existing folder nor a hub id of the form namespace/name[@revision] "
            "(letters, digits, '-', '_' and '.'); prefix a local folder with ./ to be explicit"
        )
    if not at:
        return Spec(repo_id=repo_id)
    return Spec(repo_id=repo_id, revision=check_revision(revision, spec))


def join_subfolder(subfolder: str | None, name: str) -> str:
    """``subfolder/name`` as a repository path, after checking the subfolder cannot escape."""
    if not subfolder:
        return name
    sub = subfolder.strip("/")
    check_relative(sub, f"subfolder {subfolder!r}")
    return str(PurePosixPath(sub) / name)
