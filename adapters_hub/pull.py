"""Pull a lomix mixture or a PEFT LoRA adapter from the hub (or a local folder), validated.

Hub downloads go through huggingface_hub, so its cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline mode
(``HF_HUB_OFFLINE=1``), endpoint (``HF_ENDPOINT``) and token (``HF_TOKEN``, ``hf auth login`` or
``token=``) all apply. What happens, in order:

1. The revision is resolved to a commit and the repository's file list read (one API call).
2. Every listed file name is checked: a name that could escape a folder ('..', absolute paths,
   backslashes) makes lomix refuse the repository. A repository with only pickle weights is refused
   here too, before anything is downloaded.
3. Only the files lomix needs are downloaded (config, safetensors weights, and the README / training
   config when present). huggingface_hub writes each to a temporary file and moves it into its cache
   only when complete; a commit that moves while pulling is an error, not a mix of two commits.
4. The files are validated (config fields, tensor names and shapes; no tensor is loaded yet).
5. With ``out``, the validated files are copied to ``out`` in one atomic step: an interrupted or
   refused pull leaves the previous copy there untouched.

When the hub cannot be reached (no network, ``HF_HUB_OFFLINE=1``, a 5xx answer), the files come from
the cache if a previous pull put them there; otherwise the error names the repository, the file and
how to use a local folder instead.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lomix.atomic import atomic_directory

from .errors import AccessError, DownloadError, HubError, NotFoundError, OfflineError, SpecError, UnsafePathError
from .spec import COMMIT_RE, Spec, check_relative, join_subfolder, parse_spec
from .validate import FILES, KINDS, MixtureInfo, PeftAdapter, detect_kind, inspect, missing_files_error

# Copied along with a mixture or adapter when present: the model card and the training config.
TRAINING_CONFIG_NAMES = ("resolved_config.yaml", "config.yaml")
EXTRA_FILES = ("README.md", *TRAINING_CONFIG_NAMES)


@dataclass
class Pulled:
    """What `pull` fetched and validated.

    Attributes:
        kind: ``"lomix"`` (a mixture) or ``"peft"`` (a LoRA adapter).
        folder: where the validated files are: ``out`` if given, else the hub cache's snapshot
            folder (read-only in spirit) or the local folder itself.
        source: ``namespace/name@revision`` or the folder given.
        commit: the commit the files come from (None for a local folder).
        files: the file names lomix took, relative to ``folder``.
        info: the validated contents (`PeftAdapter` or `MixtureInfo`).
    """

    kind: str
    folder: Path
    source: str
    commit: str | None
    files: list[str]
    info: PeftAdapter | MixtureInfo


def _hub():
    import huggingface_hub

    return huggingface_hub


def _local_hint() -> str:
    a, b = FILES["lomix"], FILES["peft"]
    return (
        f"use a local copy instead: pass its folder (lomix hub pull ./path/to/folder, or the path in Python), "
        f"a folder holding {a[0]} + {a[1]} or {b[0]} + {b[1]}; `lomix hub pull SPEC --out DIR` on a machine "
        "with network access makes one"
    )


def _cache_dir(cache_dir: str | Path | None) -> str:
    return str(cache_dir) if cache_dir is not None else _hub().constants.HF_HUB_CACHE


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS failure, timeout... (httpx in huggingface_hub 1.x, httpx2 in 2.x)."""
    for module_name in ("httpx2", "httpx"):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, module.TransportError):
            return True
    return isinstance(exc, ConnectionError | TimeoutError)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _unreachable_reason(exc: BaseException) -> str | None:
    """Why the hub is unreachable, if ``exc`` says so (then the cache is tried); else None."""
    errors = _hub().errors
    endpoint = _hub().constants.ENDPOINT
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if _is_network_error(exc):
        return f"cannot reach {endpoint}: {type(exc).__name__}: {exc}"
    status = _status(exc)
    if isinstance(exc, errors.HfHubHTTPError) and status is not None and status >= 500:
        return f"{endpoint} answered HTTP {status}"
    return None


def _translate(exc: BaseException, label: str, filename: str | None = None) -> HubError:
    """A huggingface_hub error as a `HubError` that names the repository (and file) and the fix."""
    errors = _hub().errors
    endpoint = _hub().constants.ENDPOINT
    what = f"{label}: {filename}" if filename else label
    token_hint = "log in with `hf auth login`, set HF_TOKEN, or pass token=... (--token)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return NotFoundError(f"{label}: no such revision on {endpoint} (a branch, tag or full commit id)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return NotFoundError(f"{label}: repository not found on {endpoint}; if it is private or gated, {token_hint}")
    if isinstance(exc, errors.EntryNotFoundError) and not isinstance(exc, errors.LocalEntryNotFoundError):
        return NotFoundError(f"{what}: no such file in the repository at that revision")
    if _status(exc) in (401, 403):
        return AccessError(f"{what}: {endpoint} refused access (HTTP {_status(exc)}); {token_hint}")
    return HubError(f"{what}: {type(exc).__name__}: {exc}")


def _snapshot_of(path: str, repo_path: str) -> Path:
    """The snapshot folder (named after its commit) holding cache file ``path`` = ``<snapshot>/<repo_path>``."""
    return Path(path).parents[len(PurePosixPath(repo_path).parts) - 1]


def _download(spec: Spec, repo_path: str, label: str, token, cache_dir) -> str:
    hub = _hub()
    try:
        return hub.hf_hub_download(spec.repo_id, repo_path, revision=spec.revision, token=token, cache_dir=cache_dir)
    except hub.errors.LocalEntryNotFoundError as exc:
        raise OfflineError(
            f"{label}: could not download {repo_path} ({exc.__cause__ or exc}) and it is not in the local cache "
            f"({_cache_dir(cache_dir)}); {_local_hint()}"
        ) from None
    except Exception as exc:
        errors = hub.errors
        final = (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError)
        if isinstance(exc, final) or _status(exc) in (401, 403):
            raise _translate(exc, label, repo_path) from None
        if _unreachable_reason(exc) is not None or isinstance(exc, OSError):
            raise DownloadError(
                f"{label}: the download of {repo_path} did not complete ({type(exc).__name__}: {exc}). Nothing "
                "partial was kept: huggingface_hub only moves complete files into its cache, and lomix writes "
                "the output folder only after every file has arrived and passed validation. Pull again."
            ) from None
        raise _translate(exc, label, repo_path) from None


def _from_cache(spec: Spec, kind: str, subfolder: str | None, label: str, reason: str, cache_dir):
    """(folder, files, commit) of a previous pull of ``spec`` found in the cache, or `OfflineError`."""
    hub = _hub()
    looked_for = []
    for candidate in KINDS if kind == "auto" else (kind,):
        config_name, weights_name = FILES[candidate]
        config_path = join_subfolder(subfolder, config_name)
        cached = hub.try_to_load_from_cache(spec.repo_id, config_path, cache_dir=cache_dir, revision=spec.revision)
        if not isinstance(cached, str):
            looked_for.append(config_path)
            continue
        weights_path = join_subfolder(subfolder, weights_name)
        weights = hub.try_to_load_from_cache(spec.repo_id, weights_path, cache_dir=cache_dir, revision=spec.revision)
        if not isinstance(weights, str):
            looked_for = [weights_path]
            break
        snapshot = _snapshot_of(cached, config_path)
        files = [config_name, weights_name]
        for extra in EXTRA_FILES:
            found = hub.try_to_load_from_cache(
                spec.repo_id, join_subfolder(subfolder, extra), cache_dir=cache_dir, revision=spec.revision
            )
            if isinstance(found, str) and _snapshot_of(found, join_subfolder(subfolder, extra)) == snapshot:
                files.append(extra)
        return Path(cached).parent, files, snapshot.name
    raise OfflineError(
        f"{label}: {reason}, and {' / '.join(looked_for)} is not in the local cache ({_cache_dir(cache_dir)}); "
        f"{_local_hint()}"
    )


def _fetch(spec: Spec, kind: str, subfolder: str | None, token, cache_dir, local_files_only: bool):
    """(folder, files, commit): the needed files of a hub spec, in the hub cache."""
    hub = _hub()
    label = str(spec) + (f" (subfolder {subfolder})" if subfolder else "")
    if local_files_only:
        return _from_cache(spec, kind, subfolder, label, "local_files_only is set", cache_dir)
    if COMMIT_RE.match(spec.revision):  # a commit never changes: a cached copy needs no request
        try:
            return _from_cache(spec, kind, subfolder, label, "not cached yet", cache_dir)
        except OfflineError:
            pass
    try:
        info = hub.HfApi().model_info(spec.repo_id, revision=spec.revision, token=token)
    except Exception as exc:
        reason = _unreachable_reason(exc)
        if reason is None:
            raise _translate(exc, label) from None
        return _from_cache(spec, kind, subfolder, label, reason, cache_dir)
    commit = info.sha or ""
    if not COMMIT_RE.match(commit):
        raise HubError(f"{label}: the hub answered with the commit id {commit!r}, not 40 hexadecimal digits")
    listed = [s.rfilename for s in info.siblings or []]
    for name in listed:
        check_relative(name, f"{label}: the repository lists a file")
    sub = subfolder or ""  # already checked by `pull`
    prefix = f"{sub}/" if sub else ""
    here = [n[len(prefix) :] for n in listed if n.startswith(prefix) and "/" not in n[len(prefix) :]]
    found = detect_kind(here, kind)
    if found is None or FILES[found][1] not in here:
        raise missing_files_error(f"{label} (commit {commit})", here, found or kind)
    files = [*FILES[found], *(n for n in EXTRA_FILES if n in here)]
    snapshot = None
    for name in files:
        repo_path = join_subfolder(subfolder, name)
        path = _download(spec, repo_path, label, token, cache_dir)
        this = _snapshot_of(path, repo_path)
        if this.name != commit:
            raise HubError(
                f"{label}: the revision moved from commit {commit} to {this.name} during the pull; pull again, "
                "or pin a commit with namespace/name@<commit>"
            )
        snapshot = this
    assert snapshot is not None
    return snapshot / sub if sub else snapshot, files, commit


def _copy_out(folder: Path, files: list[str], out: Path) -> None:
    for name in files:
        check_relative(name, f"copying into {out}")
        if "/" in name:
            raise UnsafePathError(f"copying into {out}: {name!r} is not a plain file name")
    with atomic_directory(out) as tmp:
        for name in files:
            shutil.copyfile(folder / name, tmp / name)  # follows the cache's symlinks to the blobs


def pull(
    spec: str | Path,
    out: str | Path | None = None,
    *,
    kind: str = "auto",
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Pulled:
    """Fetch and validate a lomix mixture or PEFT LoRA adapter; optionally copy it to ``out``.

    Args:
        spec: ``namespace/name[@revision]`` (branch, tag or commit) or a local folder.
        out: folder to copy the validated files into (created or updated atomically); without it
            they stay where they are (the hub cache, or the local folder).
        kind: ``"auto"`` (a mixture if the folder has ``lomix_config.json``, else a PEFT adapter),
            ``"lomix"`` or ``"peft"``.
        subfolder: a folder inside the repository (or local folder) holding the files.
        token: hub token; None uses ``HF_TOKEN`` or the saved login, False sends none.
        cache_dir: hub cache folder; None uses huggingface_hub's (``HF_HUB_CACHE`` / ``HF_HOME``).
        local_files_only: never touch the network (like ``HF_HUB_OFFLINE=1``).

    Raises `lomix.hub.errors.HubError` subclasses (and lomix's `CheckpointError`s for bad files),
    each naming the repository or folder and file.
    """
    if kind not in ("auto", *KINDS):
        raise SpecError(f"kind must be 'auto', 'lomix' or 'peft', got {kind!r}")
    parsed = parse_spec(spec)
    subfolder = check_relative(subfolder.strip("/"), f"subfolder {subfolder!r}") if subfolder else None
    if parsed.is_local:
        assert parsed.path is not None
        folder = parsed.path / subfolder if subfolder else parsed.path
        info = inspect(folder, kind, source=str(folder))
        files = [*FILES[info.kind], *(n for n in EXTRA_FILES if (folder / n).is_file())]
        commit = None
        source = str(folder)
    else:
        folder, files, commit = _fetch(parsed, kind, subfolder, token, cache_dir, local_files_only)
        source = str(parsed) + (f" (subfolder {subfolder})" if subfolder else "")
        info = inspect(folder, kind, source=f"{source} (commit {commit})")
    if out is not None:
        out = Path(out).expanduser()
        if not (out.exists() and out.resolve() == folder.resolve()):
            _copy_out(folder, files, out)
        folder = out
        info.folder = out
    return Pulled(kind=info.kind, folder=folder, source=source, commit=commit, files=files, info=info)


def load(model, spec: str | Path, *, trainable: bool = False, **pull_kwargs):
    """Pull the lomix mixture ``spec`` (hub id or folder) and load it into ``model`` (`lomix.load`).

    ``pull_kwargs`` are `pull`'s (``subfolder``, ``token``, ``cache_dir``, ``local_files_only``,
    ``out``). For PEFT adapters use `lomix.hub.load_peft_experts`.
    """
    import lomix
    from lomix.errors import CheckpointError

    pulled = pull(spec, kind="lomix", **pull_kwargs)
    try:
        return lomix.load(model, pulled.folder, trainable=trainable)
    except CheckpointError as exc:
        if pulled.commit is None:
            raise
        raise type(exc)(f"{pulled.source} (commit {pulled.commit}): {exc}") from None
