"""Experiment trackers (``train.trackers``): checked before anything loads, wandb kept offline.

accelerate drives the trackers; by itself it only warns when one is not installed and the run then
logs nothing to it. Here an absent tracker is a `ConfigError` naming the field and the install line,
and wandb writes its run locally (``WANDB_MODE=offline``) unless the user chose a mode.
"""

from __future__ import annotations

import importlib.util
import os

from lomix.errors import ConfigError
from lomix.recipes.config import TrainConfig

# The modules accelerate imports for each tracker (any one suffices) and how to install them.
MODULES = {"tensorboard": ("tensorboard", "tensorboardX")}
INSTALL = {"tensorboard": "pip install 'lomix[tensorboard]'"}


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it: wandb and mlflow are slow)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def prepare(train: TrainConfig) -> None:
    """Refuse a tracker that is not installed; default wandb to offline mode. Call before loading."""
    for tracker in train.trackers:
        if not any(is_installed(module) for module in MODULES.get(tracker, (tracker,))):
            install = INSTALL.get(tracker, f"pip install {tracker}")
            raise ConfigError("train.trackers", f"{tracker!r} is not installed; install it with: {install}")
    if "wandb" in train.trackers:
        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network: the run stays local


__all__ = ["INSTALL", "MODULES", "is_installed", "prepare"]
