"""``lomix library`` (build an expert library) and ``lomix glider`` (route over one): thin fronts over
lomix.methods.glider.recipe and lomix.methods.glider.library."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lomix.cli.commands import fail, out_as_output_dir
from lomix.errors import LomixError

RECIPES = ("glider",)  # recipe scripts this method ships (`lomix recipes ls`)

app = typer.Typer(no_args_is_help=True, help="Expert libraries for GLIDER: add trained runs or PEFT LoRAs, list them.")


@app.command("add")
def add(
    library: Path = typer.Argument(..., help="The library folder (created when absent)."),
    runs: list[Path] = typer.Argument(..., help="Finished single-task runs of `lomix train` (one expert each)."),
    gate_steps: int = typer.Option(200, "--gate-steps", help="PHATGOOSE gate-training steps per expert (0: none)."),
    gate_lr: float = typer.Option(1e-2, "--gate-lr", help="Learning rate of the gate vectors."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Gate-training batch; default: the run's."),
    description: str | None = typer.Option(
        None, "--description", help="The task description (one run only); default: the run's data.task_descriptions."
    ),
    describe_with: str | None = typer.Option(
        None,
        "--describe-with",
        help="A local causal LM that writes missing descriptions from a few examples ('base': the run's model).",
    ),
    describe_gguf_file: str | None = typer.Option(None, "--describe-gguf-file", help="GGUF file of --describe-with."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace experts of the same name."),
) -> None:
    """Train each run's PHATGOOSE gates on its own training data (expert frozen) and add it to LIBRARY."""
    from lomix.methods.glider.config import LibraryConfig
    from lomix.methods.glider.library import Library
    from lomix.methods.glider.recipe import add_run

    try:
        if description and len(runs) > 1:
            raise LomixError("--description names one task's description; pass one run with it")
        cfg = LibraryConfig(
            gate_steps=gate_steps, gate_lr=gate_lr, describe_with=describe_with, describe_gguf_file=describe_gguf_file
        )
        lib = Library.open(library, create=True)
        for run_dir in runs:
            added = add_run(lib, run_dir, cfg, description=description, batch_size=batch_size, overwrite=overwrite)
            losses = added["gate_losses"]
            trained = f"gate loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "gates untrained"
            typer.echo(f"added {added['name']} ({trained}): {added['description']}")
    except LomixError as exc:
        raise fail(exc) from None


@app.command("add-peft")
def add_peft(
    library: Path = typer.Argument(..., help="The library folder (created when absent)."),
    source: str = typer.Argument(..., help="A PEFT LoRA adapter: hub id (user/name[@rev]) or folder."),
    name: str = typer.Option(..., "--name", help="The expert's name in the library."),
    description: str = typer.Option(..., "--description", help="What the adapter's task is (one sentence)."),
    model: str = typer.Option(
        ..., "--model", help="The base model the library's experts share (as model.name_or_path)."
    ),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="GGUF file inside --model."),
    check_base: bool = typer.Option(True, "--check-base/--no-check-base", help="Refuse adapters of another base."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an expert of the same name."),
) -> None:
    """Add a third-party PEFT LoRA as a frozen expert (zero gates: GLIDER routes to it by its description)."""
    from lomix.hub.errors import BaseModelMismatchError
    from lomix.methods.glider.library import Library
    from lomix.methods.glider.recipe import add_peft as add
    from lomix.recipes.config import ModelConfig

    try:
        lib = Library.open(library, create=True)
        added = add(
            lib, source, ModelConfig(name_or_path=model, gguf_file=gguf_file), name=name, description=description,
            overwrite=overwrite, check_base=check_base,
        )  # fmt: skip
    except BaseModelMismatchError as exc:  # its text names the Python argument; here the fix is a flag
        raise fail(str(exc).replace("pass check_base=False", "pass --no-check-base")) from None
    except LomixError as exc:
        raise fail(exc) from None
    typer.echo(f"added {added['name']}: {added['description']}")


@app.command("ls")
def ls(library: Path = typer.Argument(..., help="The library folder.")) -> None:
    """List a library's experts: name, gate steps, description, source."""
    from lomix.methods.glider.library import Library

    try:
        lib = Library.open(library)
    except LomixError as exc:
        raise fail(exc) from None
    typer.echo(json.dumps([e.__dict__ for e in lib.experts], indent=2))


def glider(
    config: Path = typer.Argument(..., help="A glider config (recipes/configs/glider.yaml)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted key=value overrides: library.path=LIB router.alpha=100 library.exclude=[task]."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="The run folder to write (the same as output_dir=OUT)."),
) -> None:
    """Route over an expert library with GLIDER and evaluate on the config's test tasks.

    Writes OUTPUT_DIR/: config.yaml, tasks.json, mixture/, eval.json, routing.json (share of tokens routed to
    each task's own expert). Re-evaluate with `lomix eval OUTPUT_DIR router.alpha=3 --task-description ...`.
    """
    from lomix.methods.glider.recipe import run
    from lomix.recipes.config import load_config

    try:
        run(load_config(config, out_as_output_dir(overrides, out)))
    except LomixError as exc:
        raise fail(exc) from None


def register(root: typer.Typer) -> None:
    root.command("glider")(glider)
    root.add_typer(app, name="library")
