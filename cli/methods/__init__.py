"""The command-line verbs that routing methods add to ``lomix``: one module per method.

Each module defines ``register(app)`` (adds its commands to the root typer app) and ``RECIPES``
(the recipe scripts it ships, for ``lomix recipes ls``). Every module of this folder is found and
registered here, so the generic command modules name no method. Modules import only typer at the
top (their work is imported when a command runs), which keeps ``lomix --help`` fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import typer


def modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]


def register(app: typer.Typer) -> None:
    for module in modules():
        module.register(app)


def recipes() -> tuple[str, ...]:
    """The recipe scripts the methods ship."""
    return tuple(name for module in modules() for name in module.RECIPES)
