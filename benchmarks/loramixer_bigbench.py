"""LoRA-Mixer on BIG-bench with SmolLM2-135M (issue 7's measurements), printed as markdown tables.

    python benchmarks/loramixer_bigbench.py --out runs/loramixer-bench             # reduced (the issue note)
    python benchmarks/loramixer_bigbench.py --out runs/loramixer-full --scale full  # the issue's sizes

1. Hard stage once (expert j trains on domain j, recipes/configs/loramixer.yaml).
2. Soft stage from it three times: no balance loss, SBL with the sharpening entropy sign, SBL with
   the flattening sign (same alpha, lambda). For each: per-domain expert-activation histograms on the
   test prompts+answers (top-1 share and mean router probability per expert, averaged over layers)
   and the mean routing entropy.
3. Plug-and-play: the hard stage's experts exported as three standalone PEFT adapters
   (`lomix export --format peft --task T`), loaded frozen; only the router trains, on router-training
   sets of growing size (one epoch each); accuracy per size.

Writes OUT/results-all.json (or results-PART.json with --part) and prints the tables. Seed 0 only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "loramixer.yaml"
SCALES = {
    # test examples per task, batch, hard/soft steps, training examples per task of the hard and soft
    # stages (pool), router-training sizes in plug-and-play (examples per task; one
    # epoch each; accuracy on the first pnp_eval test examples per task). "reduced" fits a shared 2-core
    # machine under heavy load (~1 hour at ~3 tokens/s); its numbers are a smoke test, not evidence.
    "reduced": {
        "test": 8,
        "batch": 4,
        "hard_steps": 8,
        "soft_steps": 3,
        "sizes": [4, 8],
        "max_length": 160,
        "pnp_eval": 5,
        "pool": 16,
    },
    "full": {
        "test": 40,
        "batch": 8,
        "hard_steps": 48,
        "soft_steps": 48,
        "sizes": [83, 167, 333, 667],
        "max_length": 192,
        "pnp_eval": 40,
        "pool": 667,
    },
}


def lomix_cli(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("lomix")), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def histograms(run_dir: Path) -> dict:
    """Per domain: top-1 share and mean probability per expert (mean over layers), mean entropy."""
    from lomix.methods.loramixer.library import expert_histogram, set_router
    from lomix.recipes.routing_report import collect
    from lomix.recipes.runs import load_run, run_examples

    run = load_run(run_dir)
    set_router(run.model, k=1)  # top-1 selection: which expert each token would use alone
    _, per_task = collect(run, run_examples(run, "test"))
    out = {}
    for task, stats in per_task.items():
        summary = stats.summary()
        probs = torch.tensor([s["mean_prob"] for s in summary.values()]).mean(0).tolist()
        entropy = sum(s["entropy"] for s in summary.values()) / len(summary)
        out[task] = {"top1_share": expert_histogram(summary), "mean_prob": probs, "entropy": entropy}
    return out


def accuracy(run_dir: Path) -> dict:
    return accuracy_of(run_dir / "eval.json")


def accuracy_of(path: Path) -> dict:
    result = json.loads(path.read_text())
    return {"mean": result["mean"]["score"], **{t: v["score"] for t, v in result["tasks"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/loramixer-bench")
    parser.add_argument("--scale", choices=sorted(SCALES), default="reduced")
    parser.add_argument("--sbl-alpha", type=float, default=0.01)
    parser.add_argument("--sbl-lambda", type=float, default=0.1)
    parser.add_argument(
        "--part",
        choices=["all", "balance", "sizes"],
        default="all",
        help="balance: parts 1 and 2; sizes: part 3 (needs part 1's hard stage); each writes OUT/results-PART.json",
    )
    args = parser.parse_args()
    scale = SCALES[args.scale]
    out = Path(args.out)
    common = [
        f"data.bigbench.test_per_task={scale['test']}",
        f"data.bigbench.train_per_task={scale['pool']}",  # hard and soft stages (pnp sets its own)
        f"data.max_length={scale['max_length']}",
        f"train.batch_size={scale['batch']}",
        "train.progress=false",
        "train.save_every=0",
    ]
    results: dict = {"scale": args.scale, "settings": scale, "sbl": [args.sbl_alpha, args.sbl_lambda]}
    started = time.time()

    # 1 + 2: hard stage once, soft stage with three balance settings
    variants = {
        "none": ["router.sbl_alpha=0", "router.sbl_lambda=0"],
        "sharpen": [
            f"router.sbl_alpha={args.sbl_alpha}",
            f"router.sbl_lambda={args.sbl_lambda}",
            "router.entropy_sign=sharpen",
        ],
        "flatten": [
            f"router.sbl_alpha={args.sbl_alpha}",
            f"router.sbl_lambda={args.sbl_lambda}",
            "router.entropy_sign=flatten",
        ],
    }
    steps = [f"loramixer.hard_steps={scale['hard_steps']}", f"loramixer.soft_steps={scale['soft_steps']}"]
    first = out / "balance-none"
    if args.part == "sizes" and not (first / "hard" / "mixture").is_dir():
        # the size curve needs only the hard stage: one soft step instead of the balance run's soft stage
        first = out / "hard-only"
        steps[1:] = ["loramixer.soft_steps=1", "train.warmup_steps=1"]
    if not (first / ("hard" if args.part == "sizes" else "soft") / "mixture").is_dir():
        lomix_cli(
            "loramixer", str(CONFIG), *common, *steps, *variants["none"], "eval.before_training=false",
            "eval.after_training=false", f"output_dir={first}",
        )  # fmt: skip
    results["balance"] = {}
    for name, overrides in variants.items() if args.part != "sizes" else ():
        run = (first if name == "none" else out / f"balance-{name}") / "soft"
        if not (run / "mixture").is_dir():
            lomix_cli(
                "loramixer", str(CONFIG), *common, *steps, *overrides, f"loramixer.init_from={first / 'hard'}",
                "eval.after_training=false", f"output_dir={run.parent}",
            )  # fmt: skip
        results["balance"][name] = {"routing": histograms(run)}
        print(json.dumps({name: results["balance"][name]}, indent=1), flush=True)

    # 3: plug-and-play over router-training set sizes
    if args.part != "balance":
        names = json.loads((first / "hard" / "tasks.json").read_text())["tasks"]
        adapters = []
        for task in names:
            folder = out / "peft" / task.replace("/", "_")
            if not folder.is_dir():
                lomix_cli("export", str(first / "hard"), "--format", "peft", "--task", task, "--out", str(folder))
            adapters.append(str(folder))
        results["sizes"] = {}
        for i, per_task in enumerate(scale["sizes"]):
            run = out / f"pnp-{per_task}"
            total = per_task * len(names)
            if not (run / "soft" / "eval.json").is_file():
                lomix_cli(
                    "loramixer", str(CONFIG), *common, f"data.bigbench.train_per_task={per_task}",
                    f"loramixer.adapters=[{', '.join(adapters)}]",
                    f"loramixer.soft_steps={max(1, total // scale['batch'])}", "train.warmup_steps=1",
                    f"eval.before_training={str(i == 0).lower()}", f"eval.max_examples_per_task={scale['pnp_eval']}",
                    f"output_dir={run}",
                )  # fmt: skip
            if i == 0:
                results["base"] = accuracy_of(run / "soft" / "eval_base.json")
            results["sizes"][total] = accuracy(run / "soft")
    results["minutes"] = (time.time() - started) / 60
    (out / f"results-{args.part}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))


def report(results: dict) -> str:
    lines = [f"base model mean accuracy {results['base']['mean']:.3f}" if "base" in results else "", ""]
    lines += [
        "| soft stage | domain | entropy | top-1 share per expert | mean prob per expert |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["balance"].items():
        for task, r in entry["routing"].items():
            share = " ".join(f"{v:.2f}" for v in r["top1_share"])
            prob = " ".join(f"{v:.2f}" for v in r["mean_prob"])
            lines.append(f"| {name} | {task} | {r['entropy']:.3f} | {share} | {prob} |")
    if "sizes" in results:
        lines += ["", "| router-training examples | mean accuracy | per task |", "|---|---|---|"]
        for total, acc in results["sizes"].items():
            per = ", ".join(f"{t} {v:.2f}" for t, v in acc.items() if t != "mean")
            lines.append(f"| {total} | {acc['mean']:.3f} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
