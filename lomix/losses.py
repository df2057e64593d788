"""Balance losses over `TokenRouting`, and their collection from a whole model."""

from __future__ import annotations

import torch
from torch import nn


def switch_load_balancing_loss(
    probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i.

    f_i is the fraction of the N*k (token, slot) assignments that go to expert i and P_i the mean
    router probability of expert i over tokens; both over real tokens only when ``mask`` is given.
    Equals 1 under perfectly uniform routing. probs (N, E), indices (N, k), mask (N,) bool.
    """
    num_experts = probs.shape[-1]
    if mask is not None:
        probs, indices = probs[mask], indices[mask]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    fraction = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits (N, E)."""
    if mask is not None:
        logits = logits[mask]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every mixture layer's weighted auxiliary losses from the model's last forward.

    Add it to the task loss before ``backward()``. Zero (a scalar tensor) when no layer has any,
    e.g. in eval mode or with all balance coefficients at 0.
    """
    from .layer import MixtureLinear

    total = None
    for module in model.modules():
        if isinstance(module, MixtureLinear):
            for value in module.aux_losses.values():
                total = value if total is None else total + value
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else "cpu")
    return total
