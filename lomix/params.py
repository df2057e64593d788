"""Optimizer parameter groups, so routers can have their own learning rate and weight decay."""

from __future__ import annotations

from typing import Any

from torch import nn

from .inject import mixture_layers


def attach_optimizer(model: nn.Module, optimizer: Any) -> list[Any]:
    """Let every router class of the model act on its training optimizer (`Router.attach_optimizer`),
    once per class; returns the handles (each with ``remove()``). ``optimizer`` may be accelerate's wrapper."""
    classes = {type(layer.router): None for _, layer in mixture_layers(model)}
    handles = [cls.attach_optimizer(model, optimizer) for cls in classes]
    return [handle for handle in handles if handle is not None]


def after_optimizer_step(model: nn.Module) -> None:
    """Tell every router of the model that the optimizer took a step (`Router.after_optimizer_step`):
    call it after each ``optimizer.step()`` of a training loop."""
    for _, layer in mixture_layers(model):
        layer.router.after_optimizer_step()


def parameter_groups(
    model: nn.Module,
    lr: float,
    *,
    router_lr: float | None = None,
    weight_decay: float = 0.0,
    router_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Trainable parameters split into ``experts``, ``routers`` and ``other`` groups.

    ``router_lr`` defaults to the routers' own ``default_lr`` when they declare one (a task-routing
    method may train its routing logits much faster than the adapters) and to ``lr`` otherwise. ``other`` holds
    anything else the user left trainable (a head, say) and gets the experts' settings. Empty
    groups are left out. Each group carries a ``name``, which torch optimizers keep and ignore.
    """
    router_ids, expert_ids, router_defaults = set(), set(), set()
    for _, layer in mixture_layers(model):
        router_ids.update(id(p) for p in layer.router.parameters())
        expert_ids.update(id(p) for p in layer.experts.parameters())
        router_defaults.add(layer.router.default_lr)
    if router_lr is None and len(router_defaults) == 1:
        router_lr = router_defaults.pop()  # None (the routers have no preference) keeps lr
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
