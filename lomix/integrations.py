"""Train a mixture with `transformers.Trainer` or TRL's trainers, as a PEFT model is trained.

    from lomix.integrations import MixtureTrainer, mixture_trainer

    model = lomix.inject(AutoModelForCausalLM.from_pretrained(name), lomix.MixtureConfig(...))
    trainer = MixtureTrainer(model=model, args=TrainingArguments(...), train_dataset=data)
    trainer.train(); trainer.save_model("out")          # a lomix mixture folder (lomix.from_pretrained)

    SFTMixtureTrainer = mixture_trainer(trl.SFTTrainer)  # the same for any Trainer subclass

What a plain Trainer gets wrong with a mixture, and the trainer class here adds:

- the balance losses: the loss it optimises is the task loss plus `lomix.aux_loss(model)` (every
  mixture layer's weighted Switch / z-loss / router objective of that forward, reduced over the
  layers), the same sum ``lomix train`` optimises, averaged over gradient-accumulation steps;
- the routing columns: ``task_ids`` (and ``task_descriptions``, ``task_embeddings``) are not in the
  model's forward signature, so ``remove_unused_columns`` would drop them; here they are kept, and
  `RoutingCollator` takes them out of the rows before the data collator pads the rest and puts them
  back as one batch field (routers that route by task need them);
- quantized bases: transformers refuses to fine-tune a "purely quantized" model; a 4-bit or 8-bit
  base that holds a mixture is accepted;
- saving needs nothing: ``model.save_pretrained`` of an injected model writes the mixture
  (`lomix.pretrained`); resuming (``resume_from_checkpoint``) and ``load_best_model_at_end`` read
  a checkpoint's mixture back.

Routers trained with a sampling gradient estimator (``RouterConfig.estimator``, e.g. "rloo") need
several forwards per example and their own loss; a trainer here refuses them and ``lomix train``
trains them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .checkpoint import CONFIG_NAME, load_weights_into
from .errors import ConfigError, LomixError
from .losses import aux_loss
from .routing import CONTEXT_KWARGS


class RoutingCollator:
    """Wraps a data collator: the rows' routing fields (``task_ids``, ``task_descriptions``,
    ``task_embeddings``) are taken out before ``collator`` sees the rows and come back as batch
    fields: ``task_ids`` (batch,) long, ``task_embeddings`` (batch, d) float, ``task_descriptions``
    a list of strings. Rows without them pass through unchanged."""

    def __init__(self, collator: Callable[[list[Any]], Mapping[str, Any]]):
        self.collator = collator

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        if not all(isinstance(row, Mapping) for row in rows):  # rows of another shape: nothing to take out
            return self.collator(rows)
        fields: dict[str, list[Any]] = {}
        stripped = []
        for row in rows:
            row = dict(row)
            for key in CONTEXT_KWARGS:
                if key in row:
                    fields.setdefault(key, []).append(row.pop(key))
            stripped.append(row)
        batch = dict(self.collator(stripped))
        for key, values in fields.items():
            if len(values) != len(rows):
                raise ConfigError(key, f"{len(rows) - len(values)} of the batch's {len(rows)} rows lack this column")
            if key == "task_ids":
                batch[key] = torch.as_tensor([int(v) for v in values], dtype=torch.long)
            elif key == "task_embeddings":
                batch[key] = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values])
            else:
                batch[key] = list(values)
        return batch


def check_trainable(model: nn.Module) -> None:
    """A one-line error unless ``model`` holds a mixture a Trainer can train by backpropagation."""
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture; call lomix.inject or lomix.load first")
    router = state.config.router
    if router.estimator is not None:
        raise ConfigError(
            "router.name",
            f"router {router.name!r} trains with the {router.estimator!r} gradient estimator (sampled expert "
            "selections, several forwards per example), which a transformers Trainer cannot run; train it with "
            "`lomix train`",
        )


@contextlib.contextmanager
def _trainable_adapters_declared(model: Any) -> Iterator[None]:
    """While the Trainer is built, a quantized base that holds a mixture says it has trainable
    adapters (transformers' flag for its own PEFT integration): the Trainer refuses to fine-tune "purely
    quantized models", which a mixture over a 4-bit or 8-bit base is not. The flag is restored after."""
    if getattr(model, "lomix_state", None) is None or not getattr(model, "is_quantized", False):
        yield
        return
    before = model.__dict__.get("_hf_peft_config_loaded", _UNSET)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if before is _UNSET:
            del model._hf_peft_config_loaded
        else:
            model._hf_peft_config_loaded = before


_UNSET = object()


class MixtureTrainerMixin:
    """What `mixture_trainer` adds to a `transformers.Trainer` subclass (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        with _trainable_adapters_declared(model):
            super().__init__(*args, **kwargs)
        check_trainable(self.accelerator.unwrap_model(self.model))
        if not isinstance(self.data_collator, RoutingCollator):
            self.data_collator = RoutingCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns += [key for key in CONTEXT_KWARGS if key not in self._signature_columns]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        balance = aux_loss(self.accelerator.unwrap_model(model))  # zero in eval mode
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            # the task loss is already a share of the accumulated batch: the Trainer will not divide the
            # sum by the accumulation steps, so the balance term (a per-micro-batch mean) is divided here
            balance = balance / self.current_gradient_accumulation_steps
        loss = loss + balance.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Whether `Trainer.training_step` leaves this step's loss undivided by the accumulation steps
        (its own rule, transformers >= 5)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """A checkpoint written through ``model.save_pretrained`` holds a mixture, not the model's weights."""
        if not (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_into(
            self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint
        )
        return None

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's mixture."""
        best = self.state.best_model_checkpoint
        if best is None or not (Path(best) / CONFIG_NAME).is_file():
            return super()._load_best_model()
        load_weights_into(self.accelerator.unwrap_model(self.model), best)
        return None


class MixtureTrainer(MixtureTrainerMixin, Trainer):
    """`transformers.Trainer` for a model that holds a mixture: balance losses in the loss, routing
    columns kept, mixture checkpoints resumed (the module docstring says how)."""


@functools.cache
def mixture_trainer(trainer_class: type) -> type:
    """``trainer_class`` (`transformers.Trainer` or a subclass: TRL's ``SFTTrainer`` ...) with the
    balance losses, the routing columns and mixture checkpoints (the module docstring says what)."""
    if trainer_class is Trainer:
        return MixtureTrainer
    if issubclass(trainer_class, MixtureTrainerMixin):
        return trainer_class
    return type(f"Mixture{trainer_class.__name__}", (MixtureTrainerMixin, trainer_class), {})


__all__ = ["MixtureTrainer", "MixtureTrainerMixin", "RoutingCollator", "check_trainable", "mixture_trainer"]
