"""The RLOO estimator for routers that sample their selection (ReMix, METHODS.md section 3).

Each example is run with M >= 2 independent selections. With L_m the example's loss under
selection m, Lbar their mean and log Q_m the selection's log-probability (summed over the
example's tokens and over all mixture layers), the router gradient

    G = 1/(M-1) * sum_m (L_m - Lbar) * grad log Q_m

is an unbiased estimate of grad E_Q[L] (REINFORCE with the leave-one-out mean as baseline, reward
= -loss). `rloo_surrogate` is the scalar whose gradient is G; add it to the loss before backward.
The M selections come from ONE forward over the batch replicated M times (`replicate`), so the
fused kernels serve all of them at once:

    batch = lomix.rloo.replicate(batch, M)               # row m * B + b is example b, selection m
    with lomix.rloo.recording(model):
        losses = per_row_loss(model(**batch), batch)     # (M * B,)
        log_q = lomix.rloo.selection_log_prob(model, M * B)
    loss = losses.mean() + lomix.rloo.rloo_surrogate(losses, log_q, M) / B
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lomix.errors import ConfigError, RoutingError
from lomix.inject import mixture_layers
from lomix.routing import TokenRouting


def check_samples(samples: int, name: str = "samples") -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
        raise ConfigError(
            name,
            f"must be an integer >= 2, got {samples!r}: RLOO's baseline for each selection is the mean loss of "
            "the example's other selections, so it needs at least two",
        )


def replicate(batch: dict[str, Any], samples: int) -> dict[str, Any]:
    """The batch repeated ``samples`` times along its first dimension: row m * B + b is row b.

    Tensors with a batch dimension are tiled, lists (task descriptions) are repeated, anything else
    (None, scalars) is kept.
    """
    check_samples(samples)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value.repeat(samples, *([1] * (value.dim() - 1)))
        elif isinstance(value, (list, tuple)):
            out[key] = list(value) * samples
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[nn.Module]:
    """Keep every mixture layer's routing of the forwards inside the block (with its graph)."""
    layers = [layer for _, layer in mixture_layers(model)]
    before = [layer.record_routing for layer in layers]
    for layer in layers:
        layer.record_routing = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer.record_routing = flag
            if not flag:
                layer.last_routing = None


def selection_log_prob(model: nn.Module, rows: int) -> torch.Tensor:
    """(rows,) log Q of each row's selections in the last forward, summed over tokens and layers.

    Reads ``log_prob`` of every layer's last routing (inside `recording`). Padding tokens are left
    out where the batch's attention mask describes the layer's tokens: their selections change no
    real token, so including them would only add variance.
    """
    total = None
    for name, layer in mixture_layers(model):
        routing = layer.last_routing
        if not isinstance(routing, TokenRouting) or routing.log_prob is None:
            raise RoutingError(
                f"{name}: the last forward recorded no sampled selection (log_prob); RLOO needs a router that "
                f"samples (remix) in training mode, inside lomix.rloo.recording(model)"
            )
        log_prob = routing.log_prob
        if log_prob.numel() % rows:
            raise RoutingError(f"{name}: {log_prob.numel()} routed tokens do not split into {rows} rows")
        mask = layer._context.get().token_mask(log_prob.numel())
        if mask is not None:
            log_prob = log_prob * mask.to(log_prob.device)
        per_row = log_prob.view(rows, -1).sum(1)
        total = per_row if total is None else total + per_row
    if total is None:
        raise RoutingError(f"{type(model).__name__} has no mixture layers")
    return total


def rloo_surrogate(losses: torch.Tensor, log_prob: torch.Tensor, samples: int) -> torch.Tensor:
    """Scalar whose gradient is the RLOO estimate of grad sum_b E[L_b].

    ``losses`` and ``log_prob`` are (samples * B,) in `replicate`'s order (row m * B + b). The
    losses enter without gradient (rewards); only log Q is differentiated. Its value is not a loss
    to report: it is zero in expectation.
    """
    check_samples(samples)
    if losses.shape != log_prob.shape or losses.dim() != 1 or losses.numel() % samples:
        raise RoutingError(
            f"rloo_surrogate needs losses and log_prob of one shape (samples * B,), got "
            f"{tuple(losses.shape)} and {tuple(log_prob.shape)} with samples={samples}"
        )
    per_sample = losses.detach().float().view(samples, -1)
    advantage = (per_sample - per_sample.mean(0, keepdim=True)) / (samples - 1)
    return (advantage * log_prob.view(samples, -1)).sum()


__all__ = ["check_samples", "recording", "replicate", "rloo_surrogate", "selection_log_prob"]
