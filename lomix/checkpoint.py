"""Save and load mixtures in the lomix format: ``lomix_config.json`` + ``lomix_model.safetensors``.

Only the experts and routers are written (never the base model), and only safetensors is read:
lomix never unpickles weights.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .atomic import atomic_directory, recover_interrupted_swap
from .config import MixtureConfig
from .errors import (
    ArchitectureMismatchError,
    ConfigError,
    CorruptFileError,
    LomixError,
    MissingFileError,
    ShapeMismatchError,
    TargetModulesNotFoundError,
)
from .inject import eject, inject, mixture_layers

CONFIG_NAME = "lomix_config.json"
WEIGHTS_NAME = "lomix_model.safetensors"
FORMAT_VERSION = "1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def mixture_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mixture's own tensors (experts, routers, router buffers), keyed by full module path."""
    state = {}
    for name, layer in mixture_layers(model):
        # The base layer is never asked for its state: that is all of its weights, and a bitsandbytes
        # layer converts its storage in place when asked.
        layer._save_to_state_dict(state, f"{name}.", keep_vars=False)
        for child_name, child in layer.named_children():
            if child is not layer.base_layer:
                state.update(child.state_dict(prefix=f"{name}.{child_name}."))
    return state


def base_model_info(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    return {
        "base_model_type": str(getattr(config, "model_type", None) or type(model).__name__),
        "base_model": str(getattr(config, "_name_or_path", "") or ""),
    }


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s mixture to ``directory`` atomically; returns the folder.

    Other files already in the folder are kept; the two lomix files are replaced together.
    ``tensors``: the mixture's tensors when they come from elsewhere than the model's own modules
    (a state dict gathered from sharded processes); the same keys as `mixture_state_dict`.
    """
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture; nothing to save")
    tensors = mixture_state_dict(model) if tensors is None else tensors
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": "lomix", "format_version": FORMAT_VERSION, "lomix_version": __version__}
    meta.update(base_model_info(model))
    meta.update(metadata or {})
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        state.config.save(tmp / CONFIG_NAME)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
    return directory


def read_config(directory: str | Path) -> MixtureConfig:
    """The `MixtureConfig` saved in a mixture folder, with errors naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        with contextlib.suppress(OSError):  # a save killed mid-swap left the previous mixture aside
            recover_interrupted_swap(directory)
    if not directory.is_dir():
        raise MissingFileError(
            f"{directory}: no such folder; expected a lomix mixture folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; a lomix mixture folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return MixtureConfig.load(path)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.args[0].split(': ', 1)[-1]} (in {path})") from None


def read_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a mixture folder's safetensors file; refuses pickle files."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in Path(directory).glob("*") if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f"; found {', '.join(pickles)}, but lomix reads weights from safetensors only and never unpickles files"
            if pickles
            else ""
        )
        raise MissingFileError(f"{path} is missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def _check_base(directory: Path, metadata: dict[str, str], model: nn.Module) -> None:
    saved_type = metadata.get("base_model_type")
    actual = base_model_info(model)
    if saved_type and saved_type != actual["base_model_type"]:
        raise ArchitectureMismatchError(
            f"{directory} holds a mixture for a {saved_type!r} model ({metadata.get('base_model') or 'unnamed'}), "
            f"but the base model given is a {actual['base_model_type']!r} model ({actual['base_model'] or 'unnamed'})"
        )


def _load_tensors(directory: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = mixture_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the base model needs {len(missing)} tensors the file lacks (first: {missing[0]})")
        if unexpected:
            parts.append(f"the file has {len(unexpected)} tensors for modules the base lacks (first: {unexpected[0]})")
        raise ArchitectureMismatchError(f"{directory / WEIGHTS_NAME} does not fit this base model: " + "; ".join(parts))
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ShapeMismatchError(
                f"{directory / WEIGHTS_NAME}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                f"but the base model's module needs {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])


def _check_bank_sizes(directory: Path, config: MixtureConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The config's expert count and rank against the file's expert tensors, before anything is built:
    a damaged config (num_experts: 1099511627776) must not make `inject` try to allocate its bank."""
    for key, tensor in tensors.items():
        if not key.endswith((".experts.A", ".experts.B")):
            continue
        layer = key.rsplit(".", 2)[0]
        mapping = config.merged.expert_map.get(layer) if config.merged is not None else None
        experts = config.num_experts if mapping is None else max(mapping) + 1
        rank = tensor.shape[1] if key.endswith(".A") else tensor.shape[-1]
        if tensor.dim() != 3 or tensor.shape[0] != experts or rank != config.rank:
            raise ShapeMismatchError(
                f"{directory / WEIGHTS_NAME}: tensor {key} has shape {tuple(tensor.shape)}, but {CONFIG_NAME} says "
                f"{experts} experts of rank {config.rank}"
            )


def load(base_model: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
    """Inject the mixture saved in ``directory`` into ``base_model`` and load its weights.

    Everything is validated first; on any error the base model is left as it was. With
    ``trainable=False`` (inference) every parameter is frozen; with True the mixture trains.
    """
    directory = Path(directory)
    config = read_config(directory)
    tensors, metadata = read_weights(directory)
    _check_base(directory, metadata, base_model)
    _check_bank_sizes(directory, config, tensors)
    try:
        inject(base_model, config)
    except TargetModulesNotFoundError as exc:
        actual = base_model_info(base_model)
        raise ArchitectureMismatchError(
            f"{directory} was saved for a {metadata.get('base_model_type', '?')!r} model "
            f"({metadata.get('base_model') or 'unnamed'}) and does not fit the base given "
            f"({actual['base_model_type']!r}, {actual['base_model'] or 'unnamed'}): {exc}"
        ) from None
    try:
        _load_tensors(directory, base_model, tensors)
    except BaseException:
        eject(base_model)
        raise
    if not trainable:
        for param in base_model.parameters():
            param.requires_grad_(False)
    return base_model


def load_weights_into(model: nn.Module, directory: str | Path) -> nn.Module:
    """Copy the tensors of the mixture saved in ``directory`` into ``model``'s mixture, which must
    already hold the same modules and shapes (resuming training from a checkpoint); returns ``model``."""
    if getattr(model, "lomix_state", None) is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture to load {directory} into")
    directory = Path(directory)
    tensors, _ = read_weights(directory)
    _load_tensors(directory, model, tensors)
    return model


def describe(directory: str | Path) -> dict[str, Any]:
    """Config and metadata of a saved mixture, without loading a model."""
    config = read_config(directory)
    _, metadata = read_weights(directory)
    return {"config": config.to_dict(), "metadata": metadata}
