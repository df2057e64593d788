"""The command-line verbs that routing methods add to ``lomix``: one ``cli`` module per method.

Each method package's ``cli.py`` (`lomix.methods.<method>.cli`, and for a method not yet moved to
a package, a module of this folder) defines ``register(app)`` (adds its commands to the root typer
app) and ``RECIPES`` (the recipe scripts it ships, for ``lomix recipes ls``). They are found and
registered here, so the generic command modules name no method. Modules import only typer at the
top (their work is imported when a command runs), which keeps ``lomix --help`` fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import typer

from lomix import methods


def modules() -> list[ModuleType]:
    here = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    return [*here, *methods.modules("cli")]


def register(app: typer.Typer) -> None:
    for module in modules():
        module.register(app)


def recipes() -> dict[str, str]:
    """The recipe scripts the methods ship: name -> the module that holds it."""
    found = {}
    for module in modules():
        package = module.__name__.rpartition(".")[0]
        for name in module.RECIPES:  # a method package ships its script as recipe.py
            found[name] = f"{package}.recipe" if package != __name__ else f"lomix.recipes.{name}"
    return found
