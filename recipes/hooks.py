"""The training hooks of the methods: what a method adds to the generic finetune recipe.

A method package's ``hooks.py`` (`lomix.methods.<method>.hooks`) defines ``HOOKS``, a `TrainingHooks`;
the recipe asks this module, never a method by name. Today a hook is a gradient estimator: a router
config names one (`RouterConfig.estimator`), and the batch loss of a training step comes from the
method that defines it (`batch_loss_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lomix import methods
from lomix.errors import ConfigError
from lomix.recipes.losses import BatchLoss, plain_loss


@dataclass(frozen=True)
class TrainingHooks:
    """A method's hooks into the finetune recipe; every one defaults to adding nothing.

    ``estimators``: estimator name (what `RouterConfig.estimator` says) -> a function of the recipe
    config (a `FinetuneConfig`) that returns the batch loss, ``(model, micro-batch) -> (summed answer
    loss, surrogate)``: the experts train on the first, the router on the gradient of the sum.
    """

    estimators: Mapping[str, Callable[[Any], BatchLoss]] = field(default_factory=dict)


def every() -> list[TrainingHooks]:
    """The ``HOOKS`` of every method package that has training hooks."""
    return [module.HOOKS for module in methods.modules("hooks")]


def estimator(name: str) -> Callable[[Any], BatchLoss]:
    """The estimator ``name`` of the method that defines it."""
    found = {key: value for hooks in every() for key, value in hooks.estimators.items()}
    if name not in found:
        raise ConfigError("router.estimator", f"no method defines the estimator {name!r}; known: {sorted(found)}")
    return found[name]


def batch_loss_for(cfg: Any) -> BatchLoss:
    """The batch loss of a run whose recipe config is ``cfg`` (a `FinetuneConfig`): plain
    backpropagation through the gates, or the estimator the router names."""
    name = cfg.mixture.router.estimator
    return plain_loss if name is None else estimator(name)(cfg)


__all__ = ["TrainingHooks", "batch_loss_for", "estimator", "every"]
