"""The routing methods, one package each (`lomix.methods.<method>`): everything a method adds to lomix.

A method package is a vertical slice; each of its modules belongs to one layer, told by its name:

- library level (import ``lomix`` only, never the hub, recipes or CLI): ``router.py`` (its routers,
  registered by name), ``config.py`` (its sections of the recipe config, ``SECTIONS``), and any other
  module of its library helpers (e.g. ``library.py``);
- recipe level (may import ``lomix.recipes``): ``hooks.py`` (``HOOKS``, the training hooks the generic
  finetune recipe calls for its routers) and ``recipe.py`` (its own script, when it has stages of its own);
- command level: ``cli.py`` (``register(app)`` adds its ``lomix`` verbs; ``RECIPES`` names its script).

The generic code finds the pieces here by their module name, so it never names a method: the router
registry imports every ``router``, the recipe config every ``config``, the finetune recipe asks
`lomix.recipes.hooks` (which reads every ``hooks``), the ``lomix`` app every ``cli``. This module
imports only the standard library, so the registry and ``lomix --help`` stay light.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from types import ModuleType

LIBRARY_LEVEL = ("router", "config")  # the piece kinds that lower layers may import
PIECES = (*LIBRARY_LEVEL, "hooks", "recipe", "cli")


def names() -> list[str]:
    """The method packages, sorted."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)


def modules(piece: str) -> list[ModuleType]:
    """Every method's module ``piece`` (``router``, ``config``, ``hooks``, ``recipe``, ``cli``), by method name."""
    if piece not in PIECES:
        raise ValueError(f"piece must be one of {', '.join(PIECES)}, got {piece!r}")
    return [
        importlib.import_module(f"{__name__}.{name}.{piece}")
        for name in names()
        if importlib.util.find_spec(f"{__name__}.{name}.{piece}") is not None
    ]


__all__ = ["LIBRARY_LEVEL", "PIECES", "modules", "names"]
