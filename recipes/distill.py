"""Recovery after merging: a short distillation of the merged mixture from the unmerged one.

MC-SMoE's optional recovery (Li et al., ICLR 2024, arXiv:2310.01334): the student (the merged mixture) trains on the
run's own training data with

    loss = CE(student, answer) + kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

over the answer tokens (the tokens training optimised), kd_weight = 0.2 and T = 2 by default. The
T^2 factor (Hinton et al.) keeps the soft term's gradient on the scale of the hard one whatever the
temperature; it is our choice where the method leaves it open. The teacher is the mixture as
trained; only the student's experts and routers train.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.nn import functional as F

import lomix
from lomix.recipes.data import IGNORE_INDEX
from lomix.recipes.losses import forward


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kd_weight: float = 0.2,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cross-entropy, KL) averaged over answer tokens; logits (B, S, V), labels (B, S) aligned."""
    mask = labels[:, 1:] != IGNORE_INDEX
    student = student_logits[:, :-1][mask].float()
    teacher = teacher_logits[:, :-1][mask].float()
    ce = F.cross_entropy(student, labels[:, 1:][mask])
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)
    return ce + kd_weight * kl, ce, kl


def recover(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    steps: int,
    lr: float = 1e-4,
    kd_weight: float = 0.2,
    temperature: float = 2.0,
    max_grad_norm: float = 1.0,
) -> list[dict[str, float]]:
    """``steps`` AdamW steps of the student's experts and routers (cycling through ``batches``);
    returns one record per step (loss, ce, kl)."""
    params = list(lomix.mixture_parameters(student))
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    records = []
    student.train()
    teacher.eval()
    source = itertools.cycle(list(batches))
    for step in range(1, steps + 1):
        batch = next(source)
        with torch.no_grad():
            teacher_logits, _ = forward(teacher, batch)
        student_logits, labels = forward(student, batch)
        loss, ce, kl = distillation_loss(student_logits, teacher_logits, labels, kd_weight, temperature)
        loss = loss + lomix.aux_loss(student)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        record = {"step": step, "loss": float(loss), "ce": float(ce), "kl": float(kl)}
        if not all(math.isfinite(v) for v in record.values()):
            raise FloatingPointError(f"recovery step {step} produced a non-finite loss: {record}")
        records.append(record)
    student.eval()
    for param in params:
        param.requires_grad_(False)
    return records


__all__ = ["distillation_loss", "recover"]
