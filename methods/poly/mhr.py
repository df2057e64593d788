"""Adapting a task-routed (Poly / MHR) mixture to new tasks (METHODS.md section 1).

- `add_tasks`: a fresh routing row per new task name in every task router.
- `train_only_task_rows`: MHR-z (Poly-z); only the routing rows of the given tasks train.
- `average_skills`: MHR-mu; every layer's skills collapse into their mean, one LoRA per layer.

    model = lomix.load(base, "runs/mhr/mixture", trainable=True)
    ids = lomix.add_tasks(model, ["new_task"])       # MHR-z
    lomix.train_only_task_rows(model, ids)
    # or: lomix.average_skills(model)                # MHR-mu, then fine-tune the one LoRA
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from lomix.config import BalanceConfig, MixtureConfig
from lomix.errors import ConfigError, LomixError, RoutingError
from lomix.inject import eject, inject, mixture_layers
from lomix.methods.poly.router import PolyRouter, PolyRouterConfig
from lomix.routers import router_config


def _state(model: nn.Module):
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture; call lomix.inject or lomix.load first")
    return state


def _task_router_config(model: nn.Module, what: str) -> PolyRouterConfig:
    config = _state(model).config.router
    if not isinstance(config, PolyRouterConfig):
        raise ConfigError(
            "router.name", f"{what} needs a task router (poly or mhr); this mixture's router is {config.name!r}"
        )
    return config


def task_ids(model: nn.Module, names: Sequence[str]) -> list[int]:
    """The routing row of each task name, from the names saved in the router config."""
    config = _task_router_config(model, "routing by task name")
    return [config.task_id(name) for name in names]


def add_tasks(model: nn.Module, names: Sequence[str]) -> list[int]:
    """Give every task router a fresh routing row for each name it does not know; returns the ids of ``names``.

    New rows are appended after the existing ones (the old task ids keep their rows) and start as
    U(-init_range, init_range), like a new router. The mixture's config (``model.lomix_state``)
    lists the new names, so `lomix.save` records them.
    """
    config = _task_router_config(model, "add_tasks")
    if config.n_tasks and not config.tasks:
        raise RoutingError(
            f"the {config.name} router has {config.n_tasks} unnamed task rows; name them (router.tasks) to add "
            "tasks by name"
        )
    new = list(dict.fromkeys(n for n in names if n not in config.tasks))
    if new:
        tasks = [*config.tasks, *new]
        updated = dataclasses.replace(config, tasks=tasks, n_tasks=len(tasks))
        for _, layer in mixture_layers(model):
            router: PolyRouter = layer.router
            fresh = router.logits.new_empty(len(new), router.num_heads, router.num_experts)
            with torch.no_grad():
                fresh.uniform_(-config.init_range, config.init_range)
            router.logits = nn.Parameter(
                torch.cat([router.logits.detach(), fresh]), requires_grad=router.logits.requires_grad
            )
            router.config = updated
        state = _state(model)
        state.config = dataclasses.replace(state.config, router=updated)
    return task_ids(model, names)


def train_only_task_rows(model: nn.Module, ids: Sequence[int]) -> None:
    """MHR-z: freeze everything but the task routers, and let only the rows ``ids`` of them learn.

    The other rows get a zero gradient (a hook on the router logits), so an optimizer without weight
    decay on the routers (lomix's default) leaves them, and the frozen experts, bit-identical.
    """
    _task_router_config(model, "train_only_task_rows")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in mixture_layers(model):
        router: PolyRouter = layer.router
        bad = [i for i in ids if not 0 <= i < router.num_tasks]
        if bad:
            raise RoutingError(f"{name}: task ids {bad} have no routing row (0..{router.num_tasks - 1})")
        mask = torch.zeros(router.num_tasks, 1, 1, dtype=router.logits.dtype, device=router.logits.device)
        mask[list(ids)] = 1
        router.logits.requires_grad_(True)
        router.logits.register_hook(lambda grad, mask=mask: grad * mask)


def mean_skills_config(config: MixtureConfig) -> MixtureConfig:
    """The one-LoRA mixture MHR-mu collapses ``config`` into: one expert of the same rank, always used."""
    return dataclasses.replace(
        config,
        num_experts=1,
        router=router_config("fixed", experts=[0]),
        balance=BalanceConfig(switch=0.0, z_loss=0.0),
    )


def average_skills(model: nn.Module) -> nn.Module:
    """MHR-mu: replace each layer's skills and routing by the mean of the skills, as one trainable LoRA.

    Uniform weights w = 1/S in every head make A_q = mean_s A_{q,s} for every slice q, so the mixed
    A is the mean of the skills' A (and B likewise): the layer computes W x + s * mean(B) mean(A) x
    for every task. The result is a one-expert mixture (`mean_skills_config`), trainable.
    """
    state = _state(model)
    means = {
        name: (layer.experts.A.detach().mean(0, keepdim=True), layer.experts.B.detach().mean(0, keepdim=True))
        for name, layer in mixture_layers(model)
    }
    config = mean_skills_config(state.config)
    eject(model)
    inject(model, config)
    with torch.no_grad():
        for name, layer in mixture_layers(model):
            layer.experts.A.copy_(means[name][0])
            layer.experts.B.copy_(means[name][1])
    return model


__all__ = ["add_tasks", "average_skills", "mean_skills_config", "task_ids", "train_only_task_rows"]
