"""ReMix's training hooks: the RLOO estimator's batch loss, which the finetune recipe uses for every
router whose config names ``estimator = "rloo"``."""

from __future__ import annotations

from typing import Any

import torch

from lomix.methods.remix import rloo
from lomix.recipes.hooks import TrainingHooks
from lomix.recipes.losses import answer_loss_rows, forward


def rloo_loss(model: torch.nn.Module, batch: dict[str, Any], samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer loss, RLOO surrogate) of a micro-batch run with ``samples`` selections per example.

    The batch is replicated ``samples`` times in ONE forward. The answer loss is the mean over the
    selections of the summed answer-token loss (what the experts train on, comparable with
    `answer_loss_sum`); the surrogate's gradient is the RLOO estimate of the router gradient of the
    same summed loss, with each example's loss under each selection as the reward (lomix.methods.remix.rloo).
    """
    rows = batch["input_ids"].shape[0] * samples
    inner = getattr(model, "module", model)  # DDP wraps the model
    with rloo.recording(inner):
        per_row = answer_loss_rows(*forward(model, rloo.replicate(batch, samples)))
        log_q = rloo.selection_log_prob(inner, rows)
    return per_row.sum() / samples, rloo.rloo_surrogate(per_row, log_q, samples)


HOOKS = TrainingHooks(estimators={"rloo": lambda cfg: lambda model, batch: rloo_loss(model, batch, cfg.rloo.samples)})

__all__ = ["HOOKS", "rloo_loss"]
