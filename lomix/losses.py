"""Balance losses over `TokenRouting`, and their collection from a whole model."""

from __future__ import annotations

import torch
from torch import nn


def switch_load_balancing_loss(
    probs: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i.

    f_i is the fraction of the (token, slot) assignments that go to expert i and P_i the mean
    router probability of expert i over tokens; both over real tokens only when ``mask`` is given.
    With ``gates``, a slot whose gate is 0 is padding (a router with a variable number of experts
    per token) and is not an assignment. Equals 1 under perfectly uniform routing.
    probs (N, E), indices (N, k), mask (N,) bool, gates (N, k).
    """
    num_experts = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    # Padding is weighted out, not indexed out: boolean indexing would wait on the tensor's values.
    live = None if gates is None else (gates.detach() != 0).to(probs.dtype)
    if mask is None:
        mean_probs = probs.mean(dim=0)
    else:
        real = mask.to(probs.dtype)
        live = real[:, None].expand(indices.shape) if live is None else live * real[:, None]
        # where, not a product: a padding row's non-finite value must not leak into the sum.
        mean_probs = torch.where(mask[:, None], probs, 0.0).sum(dim=0) / real.sum().clamp_min(1)
    weights = None if live is None else live.reshape(-1)
    counts = torch.bincount(indices.reshape(-1), weights=weights, minlength=num_experts).to(probs.dtype)
    fraction = counts / counts.sum().clamp_min(1)
    return num_experts * (fraction * mean_probs).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits (N, E)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    squared = torch.logsumexp(logits.float(), dim=-1).pow(2)
    if mask is None:
        return squared.mean()
    # Selected with where, not indexed: no wait on the mask's values, and padding stays out.
    return torch.where(mask, squared, 0.0).sum() / mask.sum().clamp_min(1).to(squared.dtype)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The model's auxiliary loss from its last forward: every mixture layer's weighted balance losses,
    reduced over the layers that reported any by ``balance.reduction`` (mean by default, or sum).

    Add it to the task loss before ``backward()``. Zero (a scalar tensor) when no layer has any,
    e.g. in eval mode or with all balance coefficients at 0.
    """
    from .layer import MixtureLinear

    per_layer = []  # (the layer's summed losses, its reduction)
    for module in model.modules():
        if isinstance(module, MixtureLinear) and module.aux_losses:
            per_layer.append((sum(module.aux_losses.values()), module.balance.reduction))
    if not per_layer:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else "cpu")
    layers = len(per_layer)
    return sum(value / layers if reduction == "mean" else value for value, reduction in per_layer)
