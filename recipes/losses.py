"""The recipes' losses: the answer-token cross-entropy of a wrapped causal LM, per batch or per row.

Batches come from `lomix.recipes.data.Collator` (left-padded; ``labels`` are -100 outside the
answers). Shared by the finetune recipe, GLIDER's gate training, distillation and the benchmarks.

`plain_loss` is a training step's loss for routers trained through their gates; a router that
names a gradient estimator gets its loss from a method's training hooks (`lomix.recipes.hooks`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from lomix.recipes.data import IGNORE_INDEX


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the answer tokens (labels != -100)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def answer_loss_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows,) summed next-token cross-entropy over each row's answer tokens."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    ).sum(1)


def answer_tokens(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def forward(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the wrapped model, over the last columns that hold answer tokens.

    Batches are left-padded, so the answers end every row; asking for the logits of those columns
    only skips most of the LM head. Task ids and descriptions reach the routers' RoutingContext.
    """
    labels = batch["labels"]
    answer_columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    keep = labels.shape[1] - int(answer_columns[0]) + 1 if len(answer_columns) else labels.shape[1]
    extra = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        task_ids=batch["task_ids"],
        task_descriptions=batch["task_descriptions"],
        use_cache=False,
        **extra,
    ).logits
    return logits, labels[:, -logits.shape[1] :]


def _accepts(model: torch.nn.Module, name: str) -> bool:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return name in inspect.signature(type(inner).forward).parameters


BatchLoss = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, torch.Tensor | float]]
"""(model, micro-batch) -> (summed answer loss, surrogate): the experts train on the first, the
router on the gradient of the sum (the surrogate is 0 for routers trained through their gates)."""


def plain_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
    return answer_loss_sum(*forward(model, batch)), 0.0


__all__ = [
    "answer_loss_rows",
    "answer_loss_sum",
    "answer_tokens",
    "forward",
    "plain_loss",
]
