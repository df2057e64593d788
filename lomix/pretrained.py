"""The Hugging Face model methods a mixture gets from `lomix.inject`, as PEFT's models have them.

    model = lomix.inject(model, config)
    model.print_trainable_parameters()      # trainable params: ... || all params: ... || trainable%: ...
    with model.disable_adapter():            # the frozen base alone
        base_logits = model(**batch).logits
    model.save_pretrained("out", tokenizer=tokenizer)   # the lomix format (+ the tokenizer), never the base
    model = lomix.from_pretrained("out")     # the base named in the mixture's metadata, with the mixture

``save_pretrained`` is what `transformers.Trainer.save_model` and ``push_to_hub`` call, so both write
a mixture folder (``lomix_config.json`` + ``lomix_model.safetensors``) instead of the base model's
weights under the mixture's module names, which `AutoModelForCausalLM.from_pretrained` would read
back with random attention weights. A mixture folder has no ``config.json``, so transformers refuses
it (``Unrecognized model in DIR. Should have a `model_type` key in its config.json``);
`lomix.from_pretrained` reads it.

The methods are bound to the model object (the model's class is unchanged); `lomix.eject` removes them.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

METHODS = ("save_pretrained", "disable_adapter", "print_trainable_parameters", "get_nb_trainable_parameters")
TOKENIZER_FILE = "tokenizer_config.json"


def save_pretrained(
    model: nn.Module,
    save_directory: str | Path,
    *,
    tokenizer: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    **_: Any,
) -> Path:
    """Write ``model``'s mixture to ``save_directory`` in the lomix format (`lomix.save`), and the
    tokenizer when one is given or the mixture knows it (``model.lomix_state.tokenizer``).

    ``state_dict`` (a full state dict, as `transformers.Trainer` passes one gathered from sharded
    processes) supplies the mixture's tensors when it holds them all; ``is_main_process=False``
    writes nothing. Other keywords of transformers' ``save_pretrained`` (``safe_serialization``,
    ``max_shard_size`` ...) do not apply to a mixture and are ignored: lomix writes safetensors only.
    """
    from .checkpoint import mixture_state_dict, save

    directory = Path(save_directory)
    if not is_main_process:
        return directory
    tensors = None
    if state_dict is not None:
        keys = mixture_state_dict(model).keys()
        if all(key in state_dict for key in keys):
            tensors = {key: state_dict[key] for key in keys}
    save(model, directory, tensors=tensors)
    tokenizer = tokenizer if tokenizer is not None else model.lomix_state.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def from_pretrained(
    directory: str | Path,
    base_model: nn.Module | str | None = None,
    *,
    trainable: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """The mixture saved in ``directory`` (by `lomix.save` or ``save_pretrained``) in its base model.

    ``base_model``: the base as a model object, or a hub id or folder for
    ``AutoModelForCausalLM.from_pretrained(base_model, **model_kwargs)``; by default the base the
    mixture was saved from (its metadata's ``base_model``). A tokenizer saved in the folder becomes
    the mixture's (``model.lomix_state.tokenizer``), so ``save_pretrained`` writes it again.
    ``trainable`` as in `lomix.load`.
    """
    from .checkpoint import load, read_config, read_weights
    from .errors import MissingFileError

    directory = Path(directory)
    read_config(directory)  # a missing or damaged folder fails here, before any base model loads
    if base_model is None or isinstance(base_model, str | Path):
        name = base_model if base_model is not None else read_weights(directory)[1].get("base_model", "")
        if not name:
            raise MissingFileError(
                f"{directory}: the mixture's metadata names no base model (it was saved from a model built in "
                "memory); pass base_model=... to lomix.from_pretrained"
            )
        from transformers import AutoModelForCausalLM

        base_model = AutoModelForCausalLM.from_pretrained(str(name), **model_kwargs)
    model = load(base_model, directory, trainable=trainable)
    if (directory / TOKENIZER_FILE).is_file():
        from transformers import AutoTokenizer

        model.lomix_state.tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """The frozen base alone inside the block (`lomix.disabled`), the mixture again after."""
    from .frozen import disabled

    with disabled(model):
        yield model


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), as PEFT's method of the same name."""
    from .inject import count_parameters

    count = count_parameters(model)
    return count.trainable, count.total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: T || all params: N || trainable%: P`` (PEFT's line)."""
    from .inject import count_parameters

    print(count_parameters(model))


def bind(model: nn.Module) -> None:
    """Give ``model`` the methods of this module (called by `lomix.inject`)."""
    for name in METHODS:
        object.__setattr__(model, name, types.MethodType(globals()[name], model))


def unbind(model: nn.Module) -> None:
    """Remove what `bind` gave (called by `lomix.eject`): the class's own methods show again."""
    for name in METHODS:
        model.__dict__.pop(name, None)


__all__ = [
    "bind",
    "disable_adapter",
    "from_pretrained",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "save_pretrained",
    "unbind",
]
