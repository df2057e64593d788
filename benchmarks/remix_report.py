"""Compare finished finetune runs: test accuracy per task and the routing statistics their logs hold.

    python benchmarks/remix_report.py RUN_DIR [RUN_DIR ...] [--last N] [--json OUT]

For each run: the test accuracy (eval.json; the base model's from the first run with
eval_base.json), and, from the last N log records of training (the routing statistics of
lomix.stats over those steps' micro-batches), per layer:
  - effective support of the gates ||g||_1^2 / ||g||_2^2 (k for equal gates, 1 for one expert);
  - prob_support, the same figure of the router's full distribution (how many experts it spreads over);
  - load_experts, the effective number of experts in use, 1 / sum_e p_e^2 with p the normalised load;
  - entropy of the router distribution (nats).
Layers are summarised by their mean, min and max, and by depth (first, middle, last third).
Writes the whole table as markdown to stdout and, with --json, the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_records(run: Path) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def routing_figures(records: list[dict], last: int) -> dict[str, list[float]] | None:
    """Per-layer figures averaged over the last ``last`` records that carry routing statistics."""
    with_routing = [r for r in records if r.get("routing")]
    if not with_routing:
        return None
    window = with_routing[-last:]
    names = list(window[0]["routing"])
    figures: dict[str, list[float]] = {"effective_support": [], "prob_support": [], "load_experts": [], "entropy": []}
    for name in names:
        layers = [r["routing"][name] for r in window]
        for key in ("effective_support", "prob_support", "entropy"):
            values = [layer[key] for layer in layers if key in layer]
            figures[key].append(statistics.mean(values) if values else float("nan"))
        counts = []
        for layer in layers:
            total = sum(layer["load"])
            counts.append(1.0 / sum((x / total) ** 2 for x in layer["load"]) if total else float("nan"))
        figures["load_experts"].append(statistics.mean(counts))
    figures["layers"] = names
    return figures


def summary(values: list[float]) -> str:
    third = max(1, len(values) // 3)
    parts = [values[:third], values[third:-third] or values, values[-third:]]
    depth = "/".join(f"{statistics.mean(p):.2f}" for p in parts)
    return f"{statistics.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}] ({depth})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--last", type=int, default=2, help="log records (windows of log_every steps) to average")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    evals = {run.name: json.loads((run / "eval.json").read_text()) for run in args.runs}
    names = ("eval_base.json", "eval_before.json")  # the base model's result: its name, and its older name
    base = next((json.loads((r / n).read_text()) for r in args.runs for n in names if (r / n).is_file()), None)
    columns = ({"base": base} if base else {}) | evals
    tasks = list(next(iter(evals.values()))["tasks"])
    print("## Test accuracy\n")
    print("| task | n | chance | majority | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    first = next(iter(evals.values()))
    for task in tasks:
        info = first["tasks"][task]
        cells = [f"{c['tasks'][task]['score']:.3f}" for c in columns.values()]
        chance = "-" if info["chance"] is None else f"{info['chance']:.3f}"
        print(f"| {task} | {info['n']} | {chance} | {info['majority']:.3f} | " + " | ".join(cells) + " |")
    cells = [f"**{c['mean']['score']:.3f}**" for c in columns.values()]
    chance = first["mean"]["chance"]
    print(
        f"| **mean** | {first['mean']['n']} | {'-' if chance is None else f'{chance:.3f}'} | "
        f"{first['mean']['majority']:.3f} | " + " | ".join(cells) + " |"
    )

    print(
        f"\n## Routing during training (last {args.last} log windows; per layer: mean [min, max] "
        "(first / middle / last third of the layers))\n"
    )
    print("| run | gate effective support | router prob_support | experts in use (load) | router entropy |")
    print("|---|---|---|---|---|")
    numbers = {"accuracy": {k: v["mean"]["score"] for k, v in columns.items()}, "routing": {}}
    for run in args.runs:
        figures = routing_figures(load_records(run), args.last)
        config = json.loads((run / "mixture" / "lomix_config.json").read_text())
        if figures is None or config["num_experts"] == 1:
            print(f"| {run.name} | - (one expert) | - | - | - |")
            continue
        numbers["routing"][run.name] = figures
        print(
            f"| {run.name} | {summary(figures['effective_support'])} | {summary(figures['prob_support'])} | "
            f"{summary(figures['load_experts'])} | {summary(figures['entropy'])} |"
        )
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
