"""``lomix recipes ls`` and ``lomix recipes cp``: the shipped recipes and configs, to read or copy and edit."""

from __future__ import annotations

import importlib.util
import shutil
from importlib.resources import files
from pathlib import Path

import typer

from . import methods

app = typer.Typer(
    help="List the shipped recipes and configs, or copy one to edit.",
    no_args_is_help=True,
    add_completion=False,
)

# One readable script per job (torchtune style): name -> its module, run as `python -m <module>`
# (a method's own script lives in its package, `lomix.methods.<method>.recipe`).
GENERIC = ("finetune", "evaluation", "bigbench", "routing_report", "merge", "distill", "export")
RECIPES = {**{name: f"lomix.recipes.{name}" for name in GENERIC}, **methods.recipes()}


def package_root() -> Path:
    return Path(str(files("lomix.recipes")))


def shipped_configs() -> list[str]:
    root = package_root() / "configs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of the shipped recipe ``name`` (its module is found, not imported)."""
    return Path(importlib.util.find_spec(RECIPES[name]).origin)


def _summary(path: Path) -> str:
    """First line of a recipe's docstring, or a config's first comment line."""
    for line in path.read_text().splitlines():
        line = line.strip().strip('"').strip()
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line and not line.startswith(("from ", "import ")):
            return line
    return ""


def resolve(name: str) -> Path:
    """A shipped recipe (``finetune``) or config (``quickstart``, ``accelerate/ddp.yaml``)."""
    root = package_root()
    stem = name[:-3] if name.endswith(".py") else name
    if stem in RECIPES:
        return recipe_path(stem)
    config = name if name.endswith(".yaml") else f"{name}.yaml"
    if config in shipped_configs():
        return root / "configs" / config
    raise typer.BadParameter(
        f"{name!r} is not a shipped recipe or config; recipes: {', '.join(RECIPES)}; "
        f"configs: {', '.join(shipped_configs())}",
        param_hint="NAME",
    )


@app.command("ls")
def ls() -> None:
    """List the recipes and configs that ship with lomix."""
    root = package_root()
    typer.echo("recipes (run with `lomix train CONFIG` / `lomix eval RUN_DIR`, or copy and run the script):")
    for name in RECIPES:
        typer.echo(f"  {name:<28} {_summary(recipe_path(name))}")
    typer.echo("configs:")
    for name in shipped_configs():
        typer.echo(f"  {name:<28} {_summary(root / 'configs' / name)}")


@app.command("cp")
def cp(
    name: str = typer.Argument(..., help="A recipe (finetune, evaluation, bigbench) or config (quickstart.yaml)."),
    dest: Path = typer.Argument(..., help="Destination file, or an existing folder to copy into."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing destination file."),
) -> None:
    """Copy a shipped recipe or config to DEST, to edit and run it yourself."""
    source = resolve(name)
    stem = name[:-3] if name.endswith(".py") else name
    filename = f"{stem}.py" if stem in RECIPES else source.name  # a method's recipe.py copies as <method>.py
    target = dest / filename if dest.is_dir() else dest
    if target.exists() and not force:
        typer.echo(f"error: {target} exists; pass --force to overwrite it", err=True)
        raise typer.Exit(2)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    typer.echo(f"copied {filename} to {target}")
