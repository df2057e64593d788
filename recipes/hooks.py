"""The training hooks of the methods: what a method adds to the generic finetune recipe.

A method package's ``hooks.py`` (`lomix.methods.<method>.hooks`) defines ``HOOKS``, a `TrainingHooks`;
the recipe asks this module, never a method by name: the run's task ids (`resolve_tasks`), the
mixture's build (`build_mixture`: a method's own start, or `lomix.inject`), and the batch loss of a
training step (`batch_loss_for`: the gradient estimator a router config names, `RouterConfig.estimator`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

import lomix
from lomix import methods
from lomix.errors import ConfigError
from lomix.recipes.data import TaskSet
from lomix.recipes.losses import BatchLoss, plain_loss


@dataclass(frozen=True)
class TrainingHooks:
    """A method's hooks into the finetune recipe; every one defaults to adding nothing.

    ``estimators``: estimator name (what `RouterConfig.estimator` says) -> a function of the recipe
    config (a `FinetuneConfig`) that returns the batch loss, ``(model, micro-batch) -> (summed answer
    loss, surrogate)``: the experts train on the first, the router on the gradient of the sum.
    ``resolve_tasks(cfg, tasks)``: the run's task ids (a `TaskSet`) from the training data's, for
    routers that keep rows per task; it may fill the run's copy of ``cfg.mixture``.
    ``build(model, cfg, tasks, data_tasks)``: put the mixture into the model when the method owns
    this run's start (True), else False and the recipe injects ``cfg.mixture``.
    ``describe(cfg)``: what the run's start line adds (``"; ..."``), or ``""``.
    """

    estimators: Mapping[str, Callable[[Any], BatchLoss]] = field(default_factory=dict)
    resolve_tasks: Callable[[Any, TaskSet], TaskSet] | None = None
    build: Callable[[nn.Module, Any, TaskSet, list[str]], bool] | None = None
    describe: Callable[[Any], str] | None = None


def every() -> list[TrainingHooks]:
    """The ``HOOKS`` of every method package that has training hooks."""
    return [module.HOOKS for module in methods.modules("hooks")]


def estimator(name: str) -> Callable[[Any], BatchLoss]:
    """The estimator ``name`` of the method that defines it."""
    found = {key: value for hooks in every() for key, value in hooks.estimators.items()}
    if name not in found:
        raise ConfigError("router.estimator", f"no method defines the estimator {name!r}; known: {sorted(found)}")
    return found[name]


def resolve_tasks(cfg: Any, tasks: TaskSet) -> TaskSet:
    """The run's task ids: the training data's tasks, as each method's ``resolve_tasks`` orders them."""
    for hooks in every():
        if hooks.resolve_tasks is not None:
            tasks = hooks.resolve_tasks(cfg, tasks)
    return tasks


def build_mixture(model: nn.Module, cfg: Any, tasks: TaskSet, data_tasks: list[str]) -> None:
    """Put the run's mixture into ``model``: a method's own start, or `lomix.inject` of ``cfg.mixture``."""
    if not any(hooks.build is not None and hooks.build(model, cfg, tasks, data_tasks) for hooks in every()):
        lomix.inject(model, cfg.mixture)


def describe(cfg: Any) -> str:
    """What the methods add to the run's start line."""
    return "".join(hooks.describe(cfg) for hooks in every() if hooks.describe is not None)


def batch_loss_for(cfg: Any) -> BatchLoss:
    """The batch loss of a run whose recipe config is ``cfg`` (a `FinetuneConfig`): plain
    backpropagation through the gates, or the estimator the router names."""
    name = cfg.mixture.router.estimator
    return plain_loss if name is None else estimator(name)(cfg)


__all__ = ["TrainingHooks", "batch_loss_for", "build_mixture", "describe", "estimator", "every", "resolve_tasks"]
