"""``lomix inspect``, ``lomix merge`` and ``lomix export``: thin fronts over the routing report,
merge (MC-SMoE) and export recipes, for a run folder written by ``lomix train``."""

from __future__ import annotations

from pathlib import Path

import typer

from lomix.errors import LomixError

from .commands import MAX_PER_TASK_FLAG, deprecated, fail, overrides_argument

RUN_DIR = typer.Argument(
    ...,
    help="A run folder (config.yaml, tasks.json, mixture/) of `lomix train` or `lomix merge`, or its mixture/.",
)


def inspect(
    run_dir: Path = RUN_DIR,
    overrides: list[str] | None = overrides_argument(),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for routing.json and the PNG heatmaps."),
    data: str = typer.Option("test", "--data", help="Calibration data: train, test (the run's splits) or a data file."),
    max_examples_per_task: int = typer.Option(32, MAX_PER_TASK_FLAG, help="Examples per task taken from the data."),
    per_task: int | None = typer.Option(None, "--per-task", hidden=True),  # deprecated: --max-examples-per-task
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward pass."),
) -> None:
    """Routing statistics of a trained mixture on calibration data.

    Per layer: expert usage frequency, gate share, mean probability, entropy, effective support and
    a summary of the router logits (mean, std, expert x expert cosine). Per task: usage per layer
    and on average. Writes OUT/routing.json, OUT/load_heatmap.png (layers x experts) and
    OUT/task_heatmap.png (tasks x experts).
    """
    from lomix.recipes import routing_report

    try:
        per_task = deprecated(max_examples_per_task, per_task, "--per-task", MAX_PER_TASK_FLAG)
        payload = routing_report.run(run_dir, out, data, per_task, batch_size, overrides=overrides or [])
    except LomixError as exc:
        raise fail(exc) from None
    typer.echo(f"{len(payload['layers'])} layers, {payload['data']['examples']} examples; wrote {out}")


def merge(
    run_dir: Path = RUN_DIR,
    overrides: list[str] | None = overrides_argument(),
    experts: float = typer.Option(
        ..., "--experts", help="Bank experts per layer on average (a global budget; at least one per layer)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The merged run folder to write."),
    rank: int | None = typer.Option(
        None, "--rank", help="Rank of the merged experts (default: the trained rank; smaller compresses)."
    ),
    residual_density: float = typer.Option(
        0.0, "--residual-density", help="Keep this fraction of each merged expert's residual, largest entries first."
    ),
    weighting: str = typer.Option("frequency", "--weighting", help="frequency (MC-SMoE) or uniform."),
    grouping: str = typer.Option("similarity", "--grouping", help="similarity (router logits) or random."),
    drop: bool = typer.Option(False, "--drop", help="Keep only the dominant experts, drop the rest (a baseline)."),
    max_examples_per_task: int = typer.Option(
        32, MAX_PER_TASK_FLAG, help="Training examples per task for the routing statistics (calibration)."
    ),
    calibration: int | None = typer.Option(None, "--calibration", hidden=True),  # deprecated: the flag above
    recover_steps: int = typer.Option(
        0, "--recover-steps", help="Distillation steps from the unmerged mixture (CE + 0.2 KL at T=2); 0: none."
    ),
    recover_lr: float = typer.Option(1e-4, "--recover-lr", help="Learning rate of the recovery steps."),
    evaluate: bool = typer.Option(False, "--eval", help="Evaluate the merged mixture on the run's test data."),
    eval_per_task: int | None = typer.Option(None, "--eval-per-task", hidden=True),  # eval.max_examples_per_task=N
    seed: int = typer.Option(0, "--seed", help="Seed of random grouping and of the recovery data order."),
) -> None:
    """Merge a mixture's experts with MC-SMoE, optionally compress and recover; OUT is a run folder.

    Dominant experts by usage frequency, grouping by router-logit similarity, frequency-weighted
    merge in the product space (sum f_i B_i A_i / sum f_i) with truncated SVD, and the router
    rebound so that a merged expert takes its members' summed gate. `lomix eval OUT` evaluates it.
    """
    from lomix.merge import MergeOptions
    from lomix.recipes import merge as recipe

    calibration = deprecated(max_examples_per_task, calibration, "--calibration", MAX_PER_TASK_FLAG)
    if eval_per_task is not None:
        typer.echo("lomix: warning: --eval-per-task is deprecated; use eval.max_examples_per_task=N", err=True)
    try:
        options = MergeOptions(
            experts=experts,
            rank=rank,
            weighting=weighting,  # type: ignore[arg-type]
            grouping=grouping,  # type: ignore[arg-type]
            drop=drop,
            residual_density=residual_density,
            seed=seed,
        )
        recipe.run(
            run_dir, out, options, calibration_per_task=calibration, recover_steps=recover_steps,
            recover_lr=recover_lr, evaluate=evaluate, eval_per_task=eval_per_task, seed=seed,
            overrides=overrides or [],
        )  # fmt: skip
    except LomixError as exc:
        raise fail(exc) from None


def export(
    run_dir: Path = RUN_DIR,
    overrides: list[str] | None = overrides_argument(),
    format: str = typer.Option(..., "--format", "-f", help="merged, peft, lomix or moe."),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write."),
    task: str | None = typer.Option(
        None, "--task", help="Route of this task (name or id from tasks.json), for task-routed mixtures."
    ),
) -> None:
    """Export a mixture: one PEFT LoRA, a merged transformers checkpoint, a native MoE checkpoint, or lomix.

    peft and merged need a fixed route: --task T for a task-routed mixture, or a router with a fixed
    route (a global route by task description, `fixed`). moe writes a block-routed mixture (routing_scope: block,
    softmax top-k) of a Llama/Mistral base as a Mixtral checkpoint. Other token-routed mixtures export with
    --format lomix only.
    """
    from lomix.recipes import export as recipe

    try:
        info = recipe.run(run_dir, format, out, task, overrides=overrides or [])  # type: ignore[arg-type]
    except LomixError as exc:
        raise fail(exc) from None
    for note in info.get("notes", []):
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {format} export to {out}")
