"""``lomix train`` and ``lomix eval``: thin typed fronts over their recipes."""

from __future__ import annotations

from pathlib import Path

import typer

from lomix.errors import LomixError


def fail(exc: BaseException) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


# The vocabulary every verb shares: --out/-o for what it writes, key=value overrides wherever a config
# is read, and "max examples per task" (eval.max_examples_per_task) for a per-task example budget.
OVERRIDES_HELP = "Dotted key=value overrides of the run's config, e.g. eval.max_examples_per_task=20 eval.batch_size=4."
MAX_PER_TASK_FLAG = "--max-examples-per-task"


def overrides_argument(help: str = OVERRIDES_HELP):
    return typer.Argument(None, help=help, show_default=False)


def out_as_output_dir(overrides: list[str] | None, out: Path | None) -> list[str]:
    """``--out DIR`` of a verb that writes a run folder: the same as the ``output_dir=DIR`` override."""
    return [*(overrides or []), *([f"output_dir={out}"] if out is not None else [])]


def deprecated(value, old_value, old: str, new: str):
    """``old_value`` (with a one-line warning) when the deprecated flag ``old`` was given, else ``value``."""
    if old_value is None:
        return value
    typer.echo(f"lomix: warning: {old} is deprecated; use {new}", err=True)
    return old_value


def train(
    config: Path = typer.Argument(..., help="A recipe config (YAML); `lomix recipes ls` lists the shipped ones."),
    overrides: list[str] | None = overrides_argument(
        "Dotted key=value overrides, parsed as YAML: router.k=3 train.lr=2e-4 data.max_length=128."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="The run folder to write (the same as output_dir=OUT)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the config, print it fully resolved (YAML) and exit; loads nothing."
    ),
) -> None:
    """Fine-tune a mixture of LoRA experts on a frozen causal LM (the finetune recipe).

    One process as is. Data-parallel: accelerate launch --multi_gpu --num_processes N -m lomix.cli train ...
    (DDP; gloo on CPU), or --config_file with one of recipes/configs/accelerate/*.yaml (lomix recipes ls).

    Writes OUTPUT_DIR/: config.yaml (paths absolute), tasks.json, log.jsonl, checkpoints/, mixture/ (with
    the tokenizer), eval_base.json (eval.before_training) and eval.json.
    """
    from lomix.recipes.config import load_config

    try:
        cfg = load_config(config, out_as_output_dir(overrides, out))
    except LomixError as exc:
        raise fail(exc) from None
    if dry_run:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    from lomix.recipes import finetune

    try:
        finetune.run(cfg)
    except LomixError as exc:
        raise fail(exc) from None


def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder written by `lomix train` (or its mixture/ folder)."),
    overrides: list[str] | None = overrides_argument(),
    base: bool = typer.Option(False, "--base", help="Evaluate the base model alone (no mixture)."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Evaluate this checkpoint's mixture instead of RUN_DIR/mixture."
    ),
    task_description: list[str] | None = typer.Option(
        None,
        "--task-description",
        help="The task's description for the routers: TEXT for every test task, or TASK=TEXT (repeatable). A "
        "described test task the run never trained on is evaluated held-out (routers that route by description).",
    ),
    reroute_steps: int | None = typer.Option(
        None,
        "--reroute-steps",
        help="Test-time rerouting: fit per-prompt router-logit offsets to the prompt's own loss for N Adam steps "
        "before scoring or answering it (eval.reroute_steps; routers that produce logits).",
    ),
    reroute_every: int | None = typer.Option(
        None,
        "--reroute-every",
        help="Re-fit the offsets every N generated tokens (eval.reroute_every; 0: prompt only).",
    ),
    reroute_lr: float | None = typer.Option(
        None, "--reroute-lr", help="Learning rate of the offsets (eval.reroute_lr, default 0.1)."
    ),
    max_examples_per_task: int | None = typer.Option(
        None, MAX_PER_TASK_FLAG, help="Test examples per task (eval.max_examples_per_task; default: all)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="The result file (JSON); default: the next free RUN_DIR/eval[-N].json."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing result (--out, or RUN_DIR/eval.json) instead of numbering."
    ),
) -> None:
    """Evaluate a run on its test data, per task and on average.

    Multiple choice: accuracy, choosing the answer of highest log-likelihood. Generative: exact match.
    Shown beside chance and the majority-class prior.

    Writes RUN_DIR/eval.json (eval_base.json with --base) and prints a markdown table. An earlier
    result is never replaced: when that file exists the result goes to eval-2.json (eval_base-2.json),
    eval-3.json, ...; --overwrite replaces it, --out names the file.
    """
    from lomix.recipes import evaluation

    flags = {
        "reroute_steps": reroute_steps,
        "reroute_every": reroute_every,
        "reroute_lr": reroute_lr,
        "max_examples_per_task": max_examples_per_task,
    }
    overrides = [*(overrides or []), *(f"eval.{key}={value}" for key, value in flags.items() if value is not None)]
    try:
        evaluation.run(
            run_dir, overrides, base=base, checkpoint=checkpoint, task_descriptions=task_description or [],
            out=out, overwrite=overwrite,
        )  # fmt: skip
    except LomixError as exc:
        raise fail(exc) from None


def train_epilog() -> str:
    """The config reference printed under ``lomix train --help``: every field, its default and help."""
    from rich.markup import escape

    from lomix.recipes.config import config_reference

    # typer renders help through rich: escape the reference so "[tensorboard]" is not read as markup.
    return "Config fields (YAML sections; override any as section.key=value):\n\n" + escape(config_reference())
