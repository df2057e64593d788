"""Token routers on the quickstart's tasks and budget: accuracy, experts per token, load balance.

    python benchmarks/router_quickstart.py --runs runs/routers [--only topk,topp-0.5] [--summary-only]

Trains the quickstart (SmolLM2-135M-Instruct, 6 BIG-bench tasks, E=8 experts of rank 8 on the seven
projections, 48 steps of batch 8) once per router variant with `lomix train`, then runs
`lomix inspect RUN --data test` for the routing statistics of the trained mixture on the test split.
Every variant differs from the quickstart only in the overrides listed in VARIANTS, or, for a variant
in VARIANT_CONFIGS, is another recipe on the same model, data, budget and seed (quickstart_moe.yaml:
block routing over the feed-forward projections, the form that exports as a Mixtral checkpoint). A variant whose
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
- the training throughput of each run (median tokens/s of its log records) is kept in the JSON but not
  tabulated: the runs are sequential, not alternating, so on a shared machine it carries the load of
  the moment. The step-time ratios to topk come from benchmarks/router_step.py (alternating rounds).

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
    # quickstart_moe.yaml: one router per block over LoRA'd feed-forwards (exports as Mixtral)
    "block-topk": [],
}
# Variants trained from another recipe config than CONFIG (same model, data, steps, batch and seed).
VARIANT_CONFIGS = {"block-topk": "recipes/configs/quickstart_moe.yaml"}


def lomix(*args: str) -> None:
    command = [sys.executable, "-m", "lomix.cli", *args]
    print("+", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def train(runs: Path, name: str) -> Path:
    out = runs / name
    if not (out / "eval.json").is_file():
        before = "true" if name == "topk" else "false"  # the base model's accuracy once is enough
        config = VARIANT_CONFIGS.get(name, CONFIG)
        lomix("train", config, f"output_dir={out}", f"eval.before_training={before}", *VARIANTS[name])
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
        # fraction of tokens using 0, 1, ..., E experts, averaged over the layers
        "experts_per_token_histogram": [
            statistics.fmean(column)
            for column in zip(*(v["experts_per_token_histogram"] for v in layers.values()), strict=True)
        ],
    }


def accuracy(eval_json: dict) -> tuple[float, int]:
    """(mean score over tasks, number of test examples) from a run's eval.json."""
    return eval_json["mean"]["score"], eval_json["mean"]["n"]


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
        "config": VARIANT_CONFIGS.get(run.name, CONFIG),
    }
    for base in ("eval_base.json", "eval_before.json"):  # the base model's result (older runs: eval_before)
        if (run / base).is_file():
            out["base_accuracy"] = accuracy(json.loads((run / base).read_text()))[0]
            break
    return out


def overrides_text(result: dict) -> str:
    config = result.get("config", CONFIG)
    text = " ".join(result["overrides"]) or "(as shipped)"
    return text if config == CONFIG else f"{Path(config).name} {text}"


def table(results: dict[str, dict]) -> str:
    ref = results["topk"]
    lines = [
        "| router | overrides | accuracy (95% CI) | vs topk | experts/token eval (train) | "
        "eff. support eval (train) | load CV per layer eval: mean / max (train mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        e, t = r["eval"], r["train_last_window"]
        lines.append(
            f"| {name} | {overrides_text(r)} | {r['accuracy']:.3f} (+-{r['ci95']:.3f}) | "
            f"{r['accuracy'] - ref['accuracy']:+.3f} | {e['experts_per_token']:.2f} ({t['experts_per_token']:.2f}) | "
            f"{e['effective_support']:.2f} ({t['effective_support']:.2f}) | "
            f"{e['load_cv_mean']:.2f} / {e['load_cv_max']:.2f} ({t['load_cv_mean']:.2f}) |"
        )
    caption = "Experts per token: fraction of tokens using 0, 1, 2, ... (mean over layers; at evaluation, and in"
    lines += ["", caption + " training where it differs)", ""]
    width = len(ref["eval"]["experts_per_token_histogram"])
    lines.append("| router | " + " | ".join(str(i) for i in range(width)) + " |")
    lines.append("|---|" + "---|" * width)
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{f:.3f}" for f in r["eval"]["experts_per_token_histogram"]) + " |")
        train = r["train_last_window"]["experts_per_token_histogram"]
        if max(abs(a - b) for a, b in zip(train, r["eval"]["experts_per_token_histogram"], strict=True)) > 0.05:
            lines.append(f"| {name} (training) | " + " | ".join(f"{f:.3f}" for f in train) + " |")
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
        f"test set 6 tasks x 40 examples; base model accuracy {base if base is None else f'{base:.3f}'}. "
        "The interval is the test-set noise of one run (normal approximation): differences smaller than it "
        "are not evidence either way.\n\n" + table(results) + "\n"
    )
    md = Path(f"{args.results}.md")
    # Sections other benchmarks appended (router_step.py's "### Training step per router") stay.
    appended = md.read_text().partition("\n### ") if md.is_file() else ("", "", "")
    md.write_text(text + ("\n### " + appended[2] if appended[1] else ""))
    print(text)


if __name__ == "__main__":
    main()
