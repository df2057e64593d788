"""Token routers on the quickstart's tasks and budget: accuracy, experts per token, load balance.

    python benchmarks/router_quickstart.py --runs runs/routers [--only topk,topp-0.5] [--summary-only]

Trains the quickstart (SmolLM2-135M-Instruct, 6 BIG-bench tasks, E=8 experts of rank 8 on the seven
projections, 48 steps of batch 8) once per router variant with `lomix train`, then runs
`lomix inspect RUN --data test` for the routing statistics of the trained mixture on the test split.
Every variant differs from the quickstart only in the overrides listed in VARIANTS. A variant whose
run folder already holds eval.json (and report/routing.json) is not recomputed: the study resumes
after an interruption.

Reported per variant:

- accuracy on the 6 x 40 test examples (with the normal-approximation 95% interval of a proportion:
  one seed, so this is the test-set noise only) and its difference to topk;
- experts per token and the effective support of the gates, averaged over the 210 mixture layers, at
  evaluation (test data) and over the last training log window (expert-choice routes differently in
  training);
- the coefficient of variation (std / mean) of the expert load per layer: mean, median and max over
  layers, at evaluation and over the last training window;
- the step time relative to topk: the median over the log records of tokens/s, topk's over the
  variant's. The runs are sequential, not alternating, so on a shared machine this ratio carries the
  load of the moment; benchmarks/model_step.py is the protocol for timing claims.

Writes benchmarks/results/router_quickstart_cpu.{json,md} (or --results).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import machine, write_json

CONFIG = "recipes/configs/quickstart.yaml"

# name -> overrides of the quickstart. topk is the quickstart as shipped (mean-reduced switch loss).
# Top-p pays for max_k kernel slots per token: 4 keeps it at most twice topk's expert work.
VARIANTS: dict[str, list[str]] = {
    "topk": [],
    "topp-0.5": ["router.name=topp", "router.p=0.5", "router.max_k=4"],
    "topp-0.8": ["router.name=topp", "router.p=0.8", "router.max_k=4"],
    "topk+bias": ["router.bias_update_rate=1e-3", "mixture.balance.switch=0"],
    "expert-choice": ["router.name=expert_choice", "router.capacity_factor=2", "router.eval_k=2"],
}


def lomix(*args: str) -> None:
    command = [sys.executable, "-m", "lomix.cli", *args]
    print("+", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def train(runs: Path, name: str) -> Path:
    out = runs / name
    if not (out / "eval.json").is_file():
        before = "true" if name == "topk" else "false"  # the base model's accuracy once is enough
        lomix("train", CONFIG, f"output_dir={out}", f"eval.before_training={before}", *VARIANTS[name])
    if not (out / "report" / "routing.json").is_file():
        lomix("inspect", str(out), "--data", "test", "--out", str(out / "report"))
    return out


def cv(load: list[float]) -> float:
    mean = statistics.fmean(load)
    return statistics.pstdev(load) / mean if mean > 0 else float("nan")


def layer_figures(layers: dict) -> dict:
    cvs = [cv(v["load"]) for v in layers.values() if "load" in v]
    return {
        "experts_per_token": statistics.fmean(v["experts_per_token"] for v in layers.values()),
        "effective_support": statistics.fmean(v["effective_support"] for v in layers.values()),
        "load_cv_mean": statistics.fmean(cvs),
        "load_cv_median": statistics.median(cvs),
        "load_cv_max": max(cvs),
        "layers": len(cvs),
    }


def accuracy(eval_json: dict) -> tuple[float, int]:
    """(mean accuracy over tasks, number of test examples) from a run's eval.json."""
    tasks = eval_json["tasks"] if "tasks" in eval_json else eval_json
    scores, count = [], 0
    for task, entry in tasks.items():
        if not isinstance(entry, dict) or "accuracy" not in entry:
            continue
        scores.append(entry["accuracy"])
        count += int(entry.get("n", entry.get("examples", 0)))
    return statistics.fmean(scores), count


def summarize(run: Path) -> dict:
    evaluation = json.loads((run / "eval.json").read_text())
    acc, n = accuracy(evaluation)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    last_window = next(r for r in reversed(records) if "routing" in r)
    report = json.loads((run / "report" / "routing.json").read_text())
    out = {
        "accuracy": acc,
        "examples": n,
        "ci95": 1.96 * math.sqrt(acc * (1 - acc) / n) if n else None,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steps),
        "eval": layer_figures(report["layers"]),
        "train_last_window": layer_figures(last_window["routing"]),
        "overrides": VARIANTS[run.name],
    }
    base = next((run / n for n in ("eval_base.json", "eval_before.json") if (run / n).is_file()), None)  # new, old name
    if base is not None:
        out["base_accuracy"] = accuracy(json.loads(base.read_text()))[0]
    return out


def table(results: dict[str, dict]) -> str:
    ref = results["topk"]
    lines = [
        "| router | overrides | accuracy (95% CI) | vs topk | experts/token eval (train) | "
        "eff. support eval (train) | load CV per layer eval: mean / max (train mean) | step time / topk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        e, t = r["eval"], r["train_last_window"]
        lines.append(
            f"| {name} | {' '.join(r['overrides']) or '(as shipped)'} | {r['accuracy']:.3f} (+-{r['ci95']:.3f}) | "
            f"{r['accuracy'] - ref['accuracy']:+.3f} | {e['experts_per_token']:.2f} ({t['experts_per_token']:.2f}) | "
            f"{e['effective_support']:.2f} ({t['effective_support']:.2f}) | "
            f"{e['load_cv_mean']:.2f} / {e['load_cv_max']:.2f} ({t['load_cv_mean']:.2f}) | "
            f"{ref['tokens_per_s_median'] / r['tokens_per_s_median']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/routers", help="folder of the run folders (one per variant)")
    parser.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    parser.add_argument("--summary-only", action="store_true", help="tabulate the finished runs, train nothing")
    parser.add_argument("--results", default="benchmarks/results/router_quickstart_cpu")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    runs = Path(args.runs)
    started = time.time()
    if not args.summary_only:
        for name in names:
            train(runs, name)
    done = [n for n in VARIANTS if (runs / n / "report" / "routing.json").is_file()]
    if "topk" not in done:
        print("topk has not finished: nothing to compare with yet")
        return
    results = {name: summarize(runs / name) for name in done}
    payload = {"machine": machine(), "config": CONFIG, "wall_s": time.time() - started, "results": results}
    write_json(f"{args.results}.json", payload)
    base = results["topk"].get("base_accuracy")
    text = (
        f"# Token routers on the quickstart (SmolLM2-135M-Instruct, CPU, {payload['machine']['date']})\n\n"
        f"Command: `python benchmarks/router_quickstart.py --runs {args.runs}`; one seed (0); "
        f"test set 6 tasks x 40 examples; base model accuracy {base if base is None else f'{base:.3f}'}.\n\n"
        + table(results)
        + "\n"
    )
    Path(f"{args.results}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
