"""``lomix loramixer``: a thin typed front over lomix.methods.loramixer.recipe (LoRA-Mixer's stages)."""

from __future__ import annotations

from pathlib import Path

import typer

from lomix.cli.commands import fail, out_as_output_dir
from lomix.errors import LomixError

RECIPES = ("loramixer",)  # recipe scripts this method ships (`lomix recipes ls`)


def loramixer(
    config: Path = typer.Argument(..., help="A config with the loramixer router (recipes/configs/loramixer.yaml)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted key=value overrides: loramixer.hard_steps=20 router.k=2 loramixer.adapters='[./a, ./b]'."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="The run folder to write (the same as output_dir=OUT)."),
) -> None:
    """LoRA-Mixer: hard (label-routed experts) then soft (router) stage; sparse top-K at inference.

    With loramixer.adapters (PEFT LoRA folders or hub ids) the experts are those adapters, frozen,
    and only the router trains (plug-and-play). Config fields: `lomix train --help`.

    Writes OUTPUT_DIR/hard/ and OUTPUT_DIR/soft/ (each a finetune run folder; soft/mixture is the
    result) and OUTPUT_DIR/loramixer.json.
    """
    from lomix.methods.loramixer import recipe
    from lomix.recipes.config import load_config

    try:
        recipe.run(load_config(config, out_as_output_dir(overrides, out)))
    except LomixError as exc:
        raise fail(exc) from None


def register(root: typer.Typer) -> None:
    root.command("loramixer")(loramixer)
