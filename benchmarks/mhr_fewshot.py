"""Held-in and few-shot held-out accuracy: one LoRA vs Poly vs MHR at equal adapter parameters.

    python benchmarks/mhr_fewshot.py                         # the full measurement (3 seeds; hours on a CPU)
    python benchmarks/mhr_fewshot.py --seeds 0 --multitask-steps 32 --fewshot-steps 12 \\
        --held-out date_understanding --fewshot-methods lora-ft poly-z mhr-z mhr-mu   # the reduced run of issue 5

Multi-task training (recipes/configs/mhr_multitask.yaml: SmolLM2-135M-Instruct, 4 held-in
BIG-bench tasks, all 7 projections) of three mixtures with the same adapter parameters:
  lora  one LoRA of rank 16 (one expert, fixed route, alpha 32: scale 2 like the others)
  poly  4 skills of rank 4, one routing row per task (Poly = MHR with one head)
  mhr   4 skills of rank 4, 8 heads
Then few-shot adaptation to held-out tasks (recipes/configs/mhr_fewshot.yaml) with K examples per
task, K in --shots, each from its multi-task run:
  lora-ft   the LoRA, trained further
  poly-z    a fresh routing row per new task; only it trains (router lr 0.1)
  mhr-z     the same for MHR
  mhr-mu    the mean of MHR's skills as one LoRA, fine-tuned
  mhr-ft    MHR, experts and routers trained further (new tasks get fresh rows)
Accuracy is multiple-choice accuracy by choice log-likelihood on each task's fixed test split
(the same test examples for every K). Run folders go under --out (kept: rerunning skips finished
runs); the tables go to benchmarks/results/mhr_fewshot_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"
RESULTS = ROOT / "benchmarks" / "results"

MULTITASK = {
    "lora": ["mixture.num_experts=1", "mixture.rank=16", "mixture.alpha=32", "router={name: fixed}"],
    "poly": ["router={name: poly}"],
    "mhr": ["router={name: mhr, n_heads: 8}"],
}
FEWSHOT = {  # method: (multi-task run it starts from, fewshot.method)
    "lora-ft": ("lora", "continue"),
    "poly-z": ("poly", "mhr_z"),
    "mhr-z": ("mhr", "mhr_z"),
    "mhr-mu": ("mhr", "mhr_mu"),
    "mhr-ft": ("mhr", "continue"),
}


def train(config: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    """Run the finetune recipe once (skipped when ``out`` already holds its evaluation)."""
    if (out / "eval.json").is_file():
        return json.loads((out / "eval.json").read_text())
    from accelerate.state import AcceleratorState

    from lomix.recipes import finetune
    from lomix.recipes.config import load_config

    cfg = load_config(config, [*overrides, f"output_dir={out}", "train.progress=false"])
    start = time.perf_counter()
    try:
        result = finetune.run(cfg)
    finally:
        AcceleratorState._reset_state(True)
    print(f"[{out.name}] {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    if result["before"] is not None:
        (out / "eval_base.json").write_text(json.dumps(result["before"], indent=2) + "\n")
    return result["after"]


def adapter_parameters(run: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts = {"experts": 0, "routers": 0}
    with safe_open(str(run / "mixture" / "lomix_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            counts["routers" if ".router." in key else "experts"] += math.prod(handle.get_slice(key).get_shape())
    return counts


def mean_over_seeds(results: list[dict[str, Any]]) -> dict[str, float]:
    tasks = results[0]["tasks"]
    scores = {task: sum(r["tasks"][task]["score"] for r in results) / len(results) for task in tasks}
    scores["mean"] = sum(r["mean"]["score"] for r in results) / len(results)
    return scores


def table(title: str, rows: dict[str, list[dict[str, Any]]], base: dict[str, Any] | None) -> str:
    first = next(iter(rows.values()))[0]
    tasks = list(first["tasks"])
    lines = [f"### {title}", "", "| method | " + " | ".join([*tasks, "mean"]) + " |", "|---" * (len(tasks) + 2) + "|"]
    chance = [first["tasks"][t]["chance"] for t in tasks]
    majority = [first["tasks"][t]["majority"] for t in tasks]
    lines.append("| chance | " + " | ".join(f"{c:.3f}" for c in chance) + f" | {sum(chance) / len(chance):.3f} |")
    lines.append(
        "| majority | " + " | ".join(f"{m:.3f}" for m in majority) + f" | {sum(majority) / len(majority):.3f} |"
    )
    if base is not None:
        cells = [f"{base['tasks'][t]['score']:.3f}" for t in tasks]
        lines.append("| base model | " + " | ".join(cells) + f" | {base['mean']['score']:.3f} |")
    for method, results in rows.items():
        scores = mean_over_seeds(results)
        lines.append(
            f"| {method} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + f" | **{scores['mean']:.3f}** |"
        )
    n = first["tasks"][tasks[0]]["n"]
    lines += ["", f"{n} test examples per task; the mean of {len(next(iter(rows.values())))} seed(s)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mhr_bench", help="folder of the run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, nargs="+", default=[16, 64], help="training examples per held-out task")
    parser.add_argument("--multitask-steps", type=int, default=48)
    parser.add_argument("--fewshot-steps", type=int, default=16)
    parser.add_argument("--held-out", nargs="+", default=None, help="held-out tasks (default: mhr_fewshot.yaml's)")
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fewshot-methods", nargs="+", default=list(FEWSHOT), choices=list(FEWSHOT), help="few-shot methods to run"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [f"data.bigbench.test_per_task={args.test_per_task}"]
    held_out = [f"data.bigbench.tasks=[{', '.join(args.held_out)}]"] if args.held_out else []

    held_in: dict[str, list] = {m: [] for m in MULTITASK}
    fewshot: dict[int, dict[str, list]] = {k: {m: [] for m in args.fewshot_methods} for k in args.shots}
    base_in = base_out = None
    params: dict[str, dict[str, int]] = {}
    for seed in args.seeds:
        for method, overrides in MULTITASK.items():
            run = out / f"multitask-{method}-s{seed}"
            first = seed == args.seeds[0] and method == "lora"
            extra = [f"seed={seed}", f"train.max_steps={args.multitask_steps}", f"eval.before_training={first}"]
            held_in[method].append(train(CONFIGS / "mhr_multitask.yaml", [*overrides, *common, *extra], run))
            params[method] = adapter_parameters(run)
            if first and (run / "eval_base.json").is_file():
                base_in = json.loads((run / "eval_base.json").read_text())
        for shots in args.shots:
            for method in args.fewshot_methods:
                source, how = FEWSHOT[method]
                run = out / f"fewshot{shots}-{method}-s{seed}"
                first = seed == args.seeds[0] and shots == args.shots[0] and method == args.fewshot_methods[0]
                extra = [
                    f"seed={seed}",
                    f"fewshot.init_from={out / f'multitask-{source}-s{seed}'}",
                    f"fewshot.method={how}",
                    f"data.bigbench.train_per_task={shots}",
                    f"train.max_steps={args.fewshot_steps}",
                    f"eval.before_training={first}",
                ]
                fewshot[shots][method].append(train(CONFIGS / "mhr_fewshot.yaml", [*held_out, *common, *extra], run))
                if first and (run / "eval_base.json").is_file():
                    base_out = json.loads((run / "eval_base.json").read_text())

    sections = [
        "## One LoRA vs Poly vs MHR (SmolLM2-135M-Instruct, BIG-bench, CPU)",
        "",
        "Adapter parameters per mixture: "
        + ", ".join(f"{m} {p['experts']:,} (+{p['routers']:,} router)" for m, p in params.items()),
        "",
        table(f"Held-in tasks, {args.multitask_steps} multi-task steps", held_in, base_in),
    ]
    for shots in args.shots:
        sections += [
            "",
            table(f"Held-out tasks, {shots} examples per task, {args.fewshot_steps} steps", fewshot[shots], base_out),
        ]
    text = "\n".join(sections) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mhr_fewshot_cpu.md").write_text(text)
    payload = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "adapter_parameters": params,
        "held_in": held_in,
        "held_out": {str(k): v for k, v in fewshot.items()},
        "base_held_in": base_in,
        "base_held_out": base_out,
    }
    (RESULTS / "mhr_fewshot_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
