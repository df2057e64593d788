"""Merge a trained mixture's experts (MC-SMoE), optionally compress and recover; write a run folder.

    lomix merge RUN_DIR --experts 4 --out runs/merged-4
    lomix merge RUN_DIR --experts 2 --rank 4 --residual-density 0.01 --recover-steps 20 --out runs/m2
    python -m lomix.recipes.merge RUN_DIR --experts 4 --out runs/merged-4

1. calibration: the first ``calibration_per_task`` training examples of each task (prompt + answer,
   as in training) run through the mixture under `lomix.RoutingStats`;
2. `lomix.merge.merge_mixture` (dominant experts under a global budget, grouping by router-logit
   similarity, frequency-weighted product-space merge, truncated SVD, router rebinding, optional
   sparse residual);
3. optional recovery (`lomix.recipes.distill`): a few steps of CE + 0.2 KL at T=2 from the unmerged
   mixture on the run's training data;
4. OUT (atomically): config.yaml and tasks.json of the run, mixture/ (the merged mixture, lomix
   format), merge.json (groups, frequencies, errors, adapter bytes before and after, recovery
   losses) and, with ``evaluate``, eval.json. OUT is a run folder: `lomix eval OUT`,
   `lomix inspect OUT` and `lomix export OUT` work on it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import lomix
from lomix.atomic import atomic_directory
from lomix.merge import MergeOptions, merge_mixture
from lomix.recipes.distill import recover
from lomix.recipes.evaluation import evaluate_model, results_table
from lomix.recipes.runs import LoadedRun, batches, copy_run_files, load_run, model_inputs, run_examples
from lomix.stats import RoutingStats


def calibrate(run: LoadedRun, per_task: int | None, batch_size: int, data: str = "train") -> RoutingStats:
    examples = run_examples(run, data, per_task)
    with RoutingStats(run.model) as stats, torch.no_grad():
        for batch in batches(run, examples, batch_size):
            run.model(**model_inputs(batch), use_cache=False)
    return stats


def merge_run(
    run: LoadedRun,
    options: MergeOptions,
    *,
    stats: RoutingStats,
    teacher: torch.nn.Module | None = None,
    recover_steps: int = 0,
    recover_lr: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Merge ``run.model`` in place; with ``recover_steps`` distil it from ``teacher``. Returns the report."""
    report = merge_mixture(run.model, stats, options).to_dict()
    report["recovery"] = []
    if recover_steps:
        if teacher is None:
            raise ValueError("recovery needs the unmerged mixture as teacher")
        examples = run_examples(run, "train")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        shuffled = [examples[i] for i in order[: recover_steps * batch_size]]  # one pass: each example once
        report["recovery"] = recover(run.model, teacher, batches(run, shuffled, batch_size), recover_steps, recover_lr)
    return report


def write_run(run: LoadedRun, out: str | Path, report: dict[str, Any], evaluation: dict | None = None) -> Path:
    """OUT as a run folder: the run's config.yaml and tasks.json, the merged mixture, merge.json."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        copy_run_files(run.directory, tmp)
        lomix.save(run.model, tmp / "mixture", metadata={"merged_from": str(run.directory)})
        run.tokenizer.save_pretrained(tmp / "mixture")  # as a trained run's mixture: usable on its own
        (tmp / "merge.json").write_text(json.dumps(report, indent=2) + "\n")
        if evaluation is not None:
            (tmp / "eval.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True) + "\n")
    return out


def run(
    run_dir: str | Path,
    out: str | Path,
    options: MergeOptions,
    *,
    calibration_per_task: int | None = 32,
    recover_steps: int = 0,
    recover_lr: float = 1e-4,
    batch_size: int = 8,
    evaluate: bool = False,
    eval_per_task: int | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    loaded = load_run(run_dir, overrides)
    torch.manual_seed(seed)
    stats = calibrate(loaded, calibration_per_task, batch_size)
    teacher = load_run(run_dir, overrides).model if recover_steps else None
    report = merge_run(
        loaded, options, stats=stats, teacher=teacher, recover_steps=recover_steps, recover_lr=recover_lr,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    report["calibration"] = {"data": "train", "per_task": calibration_per_task}
    evaluation = None
    if evaluate:
        cfg = loaded.cfg.eval
        if eval_per_task is not None:
            cfg.max_examples_per_task = eval_per_task
        evaluation = evaluate_model(
            loaded.model, loaded.formatter, run_examples(loaded, "test"), loaded.tasks, cfg, None, False, "eval"
        )
        print(results_table({"merged": evaluation}))
    write_run(loaded, out, report, evaluation)
    before, after = report["bytes_before"], report["bytes_after"]
    print(
        f"lomix: merged {report['experts_before']} -> {report['experts_after']} bank experts, rank "
        f"{report['rank_before']} -> {report['rank_after']}; adapter {before / 2**20:.2f} MiB -> "
        f"{after / 2**20:.2f} MiB; wrote {out}"
    )
    return {"report": report, "eval": evaluation}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--experts", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--residual-density", type=float, default=0.0)
    parser.add_argument("--recover-steps", type=int, default=0)
    args = parser.parse_args(argv)
    options = MergeOptions(experts=args.experts, rank=args.rank, residual_density=args.residual_density)
    run(args.run_dir, args.out, options, recover_steps=args.recover_steps)


if __name__ == "__main__":
    main()
