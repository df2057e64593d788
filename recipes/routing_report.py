"""Routing report of a trained mixture: what its routers do on calibration data.

    lomix inspect RUN_DIR --data test --out report/        # or --data train, or a data file
    python -m lomix.recipes.routing_report RUN_DIR --out report/

Runs the data (prompt + answer, as in training) through the mixture under `lomix.RoutingStats` and
writes into OUT (atomically):

- ``routing.json``: per layer the expert usage frequency f_i (fraction of tokens whose selection
  includes expert i: MC-SMoE's frequency), the share of gate mass, the mean router probability,
  the mean router entropy, the effective support ||g||_1^2 / ||g||_2^2, and a summary of the router
  logits (per expert mean and standard deviation, and the expert x expert cosine similarity of the
  logit columns); per task the same load per layer and its mean over layers. Parameter-mixing
  routers (Poly/MHR) report their mean mixing weights per head instead.
- ``load_heatmap.png``: layers x experts, usage frequency (mean mixing weight for Poly/MHR);
- ``task_heatmap.png``: tasks x experts, the same averaged over layers (when the run has tasks).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lomix.atomic import atomic_directory
from lomix.recipes.runs import LoadedRun, batches, load_run, model_inputs, run_examples
from lomix.stats import RoutingStats


def collect(run: LoadedRun, examples, batch_size: int = 8) -> tuple[RoutingStats, dict[str, RoutingStats]]:
    """(statistics over all examples, statistics per task)."""
    per_task: dict[str, RoutingStats] = {}
    with RoutingStats(run.model) as overall, torch.no_grad():
        for task in run.tasks.names:
            chosen = [e for e in examples if e.task == task]
            if not chosen:
                continue
            with RoutingStats(run.model) as stats:
                for batch in batches(run, chosen, batch_size):
                    run.model(**model_inputs(batch), use_cache=False)
            per_task[task] = stats
    return overall, per_task


def _expert_profile(summary: dict[str, Any]) -> list[float] | None:
    """One row per layer for the heatmaps: usage frequency, or the mean mixing weight over heads."""
    if "load" in summary:
        return summary["load"]
    if "mean_mixing" in summary:
        return torch.tensor(summary["mean_mixing"]).mean(0).tolist()
    return None


def report(overall: RoutingStats, per_task: dict[str, RoutingStats]) -> dict[str, Any]:
    layers = {}
    for name, summary in overall.summary().items():
        logits = overall.layers[name].logit_summary()
        layers[name] = {**summary, **({"logits": logits} if logits else {})}
    tasks = {}
    for task, stats in per_task.items():
        summary = stats.summary()
        rows = {name: row for name, s in summary.items() if (row := _expert_profile(s)) is not None}
        first = next(iter(summary.values()), {})
        tasks[task] = {
            "tokens": first.get("tokens", 0),
            "sequences": first.get("sequences", 0),
            "mean": torch.tensor(list(rows.values())).mean(0).tolist() if rows else [],
            "layers": rows,
        }
    return {"layers": layers, "tasks": tasks}


def _heatmap(path: Path, matrix: list[list[float]], rows: list[str], title: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    data = torch.tensor(matrix).numpy()
    height = min(2.0 + 0.22 * len(rows), 60.0)
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * data.shape[1], height))
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(data.shape[1]))
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: str | Path, payload: dict[str, Any]) -> Path:
    """routing.json and the heatmaps, written atomically into ``out``."""
    layers = {name: row for name, s in payload["layers"].items() if (row := _expert_profile(s)) is not None}
    mixing = any("mean_mixing" in s for s in payload["layers"].values())
    label = "mean mixing weight" if mixing else "usage frequency f_i"
    out = Path(out)
    with atomic_directory(out) as tmp:
        (tmp / "routing.json").write_text(json.dumps(payload, indent=2) + "\n")
        if layers:
            _heatmap(tmp / "load_heatmap.png", list(layers.values()), list(layers), "routing per layer", label)
        tasks = {task: info["mean"] for task, info in payload["tasks"].items() if info["mean"]}
        if tasks:
            _heatmap(
                tmp / "task_heatmap.png",
                list(tasks.values()),
                list(tasks),
                "routing per task (mean over layers)",
                label,
            )
    return out


def run(
    run_dir: str | Path,
    out: str | Path,
    data: str = "test",
    per_task: int | None = 32,
    batch_size: int = 8,
    overrides: Sequence[str] = (),
) -> dict:
    """Routing statistics of ``run_dir``'s mixture (its config with ``overrides``) on ``data``."""
    loaded = load_run(run_dir, overrides)
    examples = run_examples(loaded, data, per_task)
    overall, tasks = collect(loaded, examples, batch_size)
    payload = report(overall, tasks)
    payload["data"] = {"source": data, "examples": len(examples), "per_task": per_task}
    write(out, payload)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default="test", help="train, test or a data file")
    parser.add_argument("--max-examples-per-task", "--per-task", dest="per_task", type=int, default=32)
    args = parser.parse_args(argv)
    run(args.run_dir, args.out, args.data, args.per_task)


if __name__ == "__main__":
    main()
