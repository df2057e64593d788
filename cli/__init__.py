"""lomix.cli: the typer app behind the ``lomix`` command (repository folder ``cli/``)."""

from .app import app, main

__all__ = ["app", "main"]
