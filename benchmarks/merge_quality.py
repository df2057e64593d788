"""Accuracy and adapter memory of MC-SMoE merging variants, with and without recovery.

    python benchmarks/merge_quality.py RUN_DIR [--experts 4 2] [--eval-per-task 20] [--recover-steps 8]

RUN_DIR is a run of `lomix train` (the quickstart: 8 experts, top-2). For each budget N (bank experts
per layer on average) and each variant

- ``frequency``: MC-SMoE (grouping by router-logit similarity, frequency-weighted product-space merge),
- ``uniform``: the same groups, equal weights,
- ``random``: random groups, frequency weights,
- ``drop``: only the dominant experts kept, the others dropped (no merging),

the merged mixture is evaluated on the run's test data, then recovered by distillation from the
unmerged mixture (CE + 0.2 KL at T=2, on the run's training data) and evaluated again. Statistics
come once, from the unmerged mixture on ``--calibration`` training examples per task. Prints a
markdown table (with the load average, as the machine is shared) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lomix.merge import MergeOptions, adapter_bytes
from lomix.recipes.evaluation import evaluate_model
from lomix.recipes.merge import calibrate, merge_run
from lomix.recipes.runs import load_run, run_examples

VARIANTS = {
    "frequency": {},
    "uniform": {"weighting": "uniform"},
    "random": {"grouping": "random"},
    "drop": {"drop": True},
}


def evaluate(run, examples, per_task: int) -> dict:
    cfg = run.cfg.eval
    cfg.max_examples_per_task = per_task
    return evaluate_model(run.model, run.formatter, examples, run.tasks, cfg, None, False, "eval")


def row(label: str, result: dict, reference: float, megabytes: float, seconds: float) -> dict:
    mean = result["mean"]["score"]
    return {
        "variant": label,
        "mean": mean,
        "kept": mean / reference if reference else None,
        "adapter_mib": megabytes,
        "tasks": {t: v["score"] for t, v in result["tasks"].items()},
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    tasks = list(rows[0]["tasks"])
    header = ["variant", "mean acc", "kept", "adapter MiB", *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        kept = "-" if r["kept"] is None else f"{100 * r['kept']:.1f}%"
        cells = [r["variant"], f"{r['mean']:.3f}", kept, f"{r['adapter_mib']:.2f}"]
        lines.append("| " + " | ".join(cells + [f"{r['tasks'][t]:.2f}" for t in tasks]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--experts", type=float, nargs="+", default=[4, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-per-task", type=int, default=20)
    parser.add_argument("--calibration", type=int, default=32, help="training examples per task for the statistics")
    parser.add_argument("--recover-steps", type=int, default=8, help="0 skips recovery")
    parser.add_argument("--recover-lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/merge_quality_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()

    teacher = load_run(args.run_dir)
    test = run_examples(teacher, "test", args.eval_per_task)
    stats = calibrate(teacher, args.calibration, args.batch_size)
    clock = time.time()
    unmerged = evaluate(teacher, test, args.eval_per_task)
    reference = unmerged["mean"]["score"]
    rows = [
        row(
            f"unmerged E={teacher.model.lomix_state.config.num_experts}",
            unmerged,
            reference,
            adapter_bytes(teacher.model) / 2**20,
            time.time() - clock,
        )
    ]
    print(table(rows), flush=True)
    results = {"args": vars(args), "rows": rows, "merges": {}}

    def save() -> None:
        results["load_average"] = {"before": load_before, "after": os.getloadavg()}
        results["minutes"] = (time.time() - started) / 60
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    # All merges first, then the recovered ones: a cut-short run still has the whole first table.
    for recovery in [False, True] if args.recover_steps else [False]:
        for experts in args.experts:
            for name in args.variants:
                label = f"N={experts:g} {name}" + (" + recovery" if recovery else "")
                student = load_run(args.run_dir)
                clock = time.time()
                report = merge_run(
                    student, MergeOptions(experts=experts, **VARIANTS[name]), stats=stats, teacher=teacher.model,
                    recover_steps=args.recover_steps if recovery else 0, recover_lr=args.recover_lr,
                    batch_size=args.batch_size,
                )  # fmt: skip
                result = evaluate(student, test, args.eval_per_task)
                rows.append(row(label, result, reference, adapter_bytes(student.model) / 2**20, time.time() - clock))
                keep = ("experts_after", "bytes_before", "bytes_after", "recovery")
                results["merges"][label] = {k: report[k] for k in keep}
                print(table(rows[-1:]).split("\n", 2)[-1], flush=True)
                save()
                del student
    save()
    print(f"\nload average {load_before} -> {os.getloadavg()}; {results['minutes']:.1f} min in all")
    print(table(rows))


if __name__ == "__main__":
    main()
