"""Push a run's mixture to the hub with its training config and a generated model card, in one commit.

What is uploaded from ``run_dir`` (all found files, in one commit, so a failed push changes nothing):

- the mixture: ``lomix_config.json`` + ``lomix_model.safetensors``, from ``run_dir`` itself or, when
  it holds none, from its one subfolder (up to two levels down) that does; among several, a folder
  named ``mixture`` or ``final`` is taken, otherwise the error lists them;
- the resolved training config: the first of ``resolved_config.yaml`` and ``config.yaml`` found in
  ``run_dir``, then in the mixture folder (whichever the recipe wrote), under its own name;
- evaluation results ``eval*.json`` and routing statistics ``routing*.json`` (``run_dir`` and the
  mixture folder), which also fill the card's tables;
- ``README.md``: the generated model card (`lomix.hub.card`).

The mixture is validated first; nothing is uploaded if it is malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lomix.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from lomix.errors import MissingFileError

from .card import model_card
from .errors import AccessError, HubError, OfflineError, SpecError
from .pull import TRAINING_CONFIG_NAMES, _status, _unreachable_reason
from .spec import REPO_ID_RE
from .validate import MixtureInfo, inspect_lomix

_PREFERRED = ("mixture", "final")


@dataclass
class PushPlan:
    """What `push` would upload: ``files`` maps each path in the repository to a local file."""

    repo_id: str
    mixture: MixtureInfo
    files: dict[str, Path]
    card: object  # huggingface_hub.ModelCard

    @property
    def readme(self) -> str:
        return str(self.card)

    def paths(self) -> list[str]:
        return sorted([*self.files, "README.md"])


@dataclass
class PushResult:
    repo_id: str
    commit: str
    url: str
    files: list[str]


def find_mixture(run_dir: Path) -> Path:
    """The folder of ``run_dir`` holding the mixture (see the module docstring)."""
    if not run_dir.is_dir():
        raise MissingFileError(f"{run_dir}: no such folder; expected a run folder holding a lomix mixture")
    if (run_dir / CONFIG_NAME).is_file():
        return run_dir
    found = sorted({p.parent for pattern in (f"*/{CONFIG_NAME}", f"*/*/{CONFIG_NAME}") for p in run_dir.glob(pattern)})
    if len(found) == 1:
        return found[0]
    for name in _PREFERRED:
        if run_dir / name in found:
            return run_dir / name
    if not found:
        raise MissingFileError(
            f"{run_dir} holds no lomix mixture ({CONFIG_NAME} + {WEIGHTS_NAME}), neither itself nor in a subfolder"
        )
    listed = ", ".join(str(p.relative_to(run_dir)) for p in found)
    raise MissingFileError(
        f"{run_dir} holds several mixtures ({listed}) and none is named {' or '.join(_PREFERRED)}; "
        "pass the folder of the one to push"
    )


def _first(folders: list[Path], names: tuple[str, ...]) -> Path | None:
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _glob(folders: list[Path], pattern: str) -> list[Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():
                found.setdefault(path.name, path)
    return list(found.values())


def plan_push(run_dir: str | Path, repo_id: str, *, base_model: str | None = None) -> PushPlan:
    """Find and validate what `push` uploads, and generate the model card; touches no network."""
    if not isinstance(repo_id, str) or not REPO_ID_RE.match(repo_id):
        raise SpecError(f"{repo_id!r} is not a hub repository id of the form namespace/name")
    run_dir = Path(run_dir).expanduser()
    mixture_dir = find_mixture(run_dir)
    info = inspect_lomix(mixture_dir, str(mixture_dir))
    folders = [run_dir] if mixture_dir == run_dir else [run_dir, mixture_dir]
    files = {CONFIG_NAME: mixture_dir / CONFIG_NAME, WEIGHTS_NAME: mixture_dir / WEIGHTS_NAME}
    training_config = _first(folders, TRAINING_CONFIG_NAMES)
    if training_config is not None:
        files[training_config.name] = training_config
    evals = _glob(folders, "eval*.json")
    routing = _glob(folders, "routing*.json")
    for path in [*evals, *routing]:
        files[path.name] = path
    card = model_card(
        info,
        repo_id=repo_id,
        base_model=base_model,
        training_config=training_config,
        eval_files=evals,
        routing_files=routing,
    )
    return PushPlan(repo_id=repo_id, mixture=info, files=files, card=card)


def _push_error(exc: BaseException, repo_id: str) -> HubError:
    reason = _unreachable_reason(exc)
    if reason is not None:
        return OfflineError(f"{repo_id}: cannot push ({reason}); pushing needs the hub, and nothing was uploaded")
    if _status(exc) in (401, 403):
        return AccessError(
            f"{repo_id}: the hub refused the push (HTTP {_status(exc)}); log in with `hf auth login`, set HF_TOKEN "
            "or pass token=... (--token) with a token that can write to this namespace"
        )
    return HubError(f"{repo_id}: push failed ({type(exc).__name__}: {exc}); nothing was committed")


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
) -> PushResult:
    """Upload ``run_dir``'s mixture, training config, evaluation files and model card as one commit.

    Args:
        run_dir: a run folder, or the mixture folder itself (see the module docstring).
        repo_id: ``namespace/name``; the repository is created if missing.
        private: visibility of a NEW repository (an existing one keeps its own); None: the hub's default.
        token: hub token with write access; None uses ``HF_TOKEN`` or the saved login.
        commit_message: default: a summary of the mixture.
        base_model: hub id of the base model for the card, when the mixture's metadata lacks it.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    plan = plan_push(run_dir, repo_id, base_model=base_model)
    config = plan.mixture.config
    message = commit_message or (
        f"Upload lomix mixture ({config.num_experts} experts, rank {config.rank}, router {config.router.name})"
    )
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.readme.encode()))
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        info = api.create_commit(repo_id, operations, commit_message=message, token=token)
    except Exception as exc:
        raise _push_error(exc, repo_id) from None
    return PushResult(repo_id=repo_id, commit=info.oid, url=info.commit_url, files=plan.paths())
