"""The ``lomix`` command."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.core import TyperCommand

from . import catalog, commands, infer, methods, tools
from .hub import hub_app

app = typer.Typer(
    name="lomix",
    help="Fine-tune frozen Hugging Face models with routed mixtures of LoRA experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from lomix import __version__

        typer.echo(f"lomix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fine-tune frozen Hugging Face models with routed mixtures of LoRA experts."""


@app.command()
def show(
    directory: Path = typer.Argument(..., help="A saved lomix mixture folder, or a run folder holding one."),
) -> None:
    """Print a saved mixture's config and metadata (no model is loaded)."""
    from lomix.checkpoint import CONFIG_NAME, describe
    from lomix.errors import LomixError

    if not (directory / CONFIG_NAME).is_file() and (directory / "mixture" / CONFIG_NAME).is_file():
        directory = directory / "mixture"  # RUN: its mixture
    try:
        info = describe(directory)
    except LomixError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(info, indent=2, sort_keys=True))


class _TrainCommand(TyperCommand):
    """``lomix train``: its epilog (the config reference) is built only when the help is shown, so
    other commands and ``lomix --help`` do not import the recipe config (and torch)."""

    @property
    def epilog(self) -> str:
        return commands.train_epilog()

    @epilog.setter
    def epilog(self, value: str | None) -> None:
        pass


# Sub-commands live in their own modules and register here, one line each.
app.command("train", cls=_TrainCommand)(commands.train)
app.command("eval")(commands.evaluate)
app.command("inspect")(tools.inspect)
app.command("merge")(tools.merge)
app.command("export")(tools.export)
app.command("chat")(infer.chat)
app.command("generate")(infer.generate)
methods.register(app)  # each method's own verbs (cli/methods/)
app.add_typer(catalog.app, name="recipes")
app.add_typer(hub_app, name="hub", help="Pull and push PEFT LoRA adapters and lomix mixtures (hub or folders).")


def main() -> None:
    app()
