"""Optimizer parameter groups, so routers can have their own learning rate and weight decay."""

from __future__ import annotations

from typing import Any

from torch import nn

from .inject import mixture_layers


def parameter_groups(
    model: nn.Module,
    lr: float,
    *,
    router_lr: float | None = None,
    weight_decay: float = 0.0,
    router_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Trainable parameters split into ``experts``, ``routers`` and ``other`` groups.

    ``router_lr`` defaults to ``lr``; Poly/MHR train their routers with a much larger one (0.1 vs
    1e-3 in the paper). ``other`` holds anything else the user left trainable (a head, say) and
    gets the experts' settings. Empty groups are left out. Each group carries a ``name``, which
    torch optimizers keep and ignore.
    """
    router_ids, expert_ids = set(), set()
    for _, layer in mixture_layers(model):
        router_ids.update(id(p) for p in layer.router.parameters())
        expert_ids.update(id(p) for p in layer.experts.parameters())
    groups: dict[str, list[nn.Parameter]] = {"experts": [], "routers": [], "other": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        key = "routers" if id(param) in router_ids else "experts" if id(param) in expert_ids else "other"
        groups[key].append(param)
    settings = {
        "experts": (lr, weight_decay),
        "routers": (lr if router_lr is None else router_lr, router_weight_decay),
        "other": (lr, weight_decay),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]
