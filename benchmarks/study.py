"""Multi-seed studies with confidence intervals: does a mixture beat one LoRA, by how much, and how sure.

    python benchmarks/study.py collapse --scale smoke --seeds 2          # every path in minutes (numbers mean nothing)
    python benchmarks/study.py collapse --scale cpu --seeds 3            # ~70 min on 2 CPU cores
    python benchmarks/study.py multitask --scale cpu --seeds 3           # ~2.5 h on 2 CPU cores
    python benchmarks/study.py multitask --scale gpu --seeds 3           # on a CUDA machine (used when present)
    python benchmarks/study.py multitask --scale cpu --seeds 3 --report  # the report of the finished cells only
    python benchmarks/study.py multitask --check-tasks 12                # the base model on candidate tasks

Studies: collapse (softmax top-k vs ReMix routing over training), multitask (every method vs PEFT
LoRA), fewshot (benchmarks/mhr_fewshot.py), library (benchmarks/glider_bigbench.py), merge
(benchmarks/merge_quality.py); benchmarks/gpu_study.sh runs all five on a GPU.

A study is a declarative `Study` (tasks, steps, batch, methods and their overrides, per scale a
`compare.Mode`); multitask's and collapse's methods are those of benchmarks/compare.py, run by its
own builders under the same data, sampler, warm-up, clipping and optimizer steps; fewshot, library
and merge start every cell of a seed from that seed's shared source runs. One CELL = (method, seed): the
seed sets the training seed (initialisation and sampler); the data split and the test set come
from ``data.bigbench.split_seed`` (fixed), so every cell is scored on the same test examples.

A finished cell is written atomically to OUT/<study>_<scale>/cells/<method>__s<seed>.json (per-example
correctness on the study's fixed ordered test ids, per-task accuracy, wall time, lomix commit,
balance-loss reduction); a rerun skips finished cells, so a study can span several sittings. An
interrupted cell leaves nothing but its scratch run folder, which the next attempt deletes.

The report (benchmarks/study_report.py: two-level bootstrap intervals over test examples and seeds,
paired differences to the study's baseline, minimum detectable effect) goes to
benchmarks/results/study_<study>_<scale>.{json,md,png} and to the study's section of docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import compare
import study_report
import torch
from compare import Mode
from glider_bigbench import TASKS as GLIDER_TASKS
from harness import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
DOC_INTRO = """# Study results

Each section below is one study of `benchmarks/study.py`, run over several training seeds on a fixed
test set. Accuracy is multiple-choice accuracy by choice log-likelihood; every interval is a 95%
bootstrap interval over test examples and seeds (two levels), and the paired column is the difference
to the study's baseline on the same examples and seeds, with its own interval (in `multitask` the
baseline is one PEFT LoRA of the mixtures' active rank; each section names its own). MDE (minimum
detectable effect) is the smallest true difference the study would detect (two-sided 5% test, 80%
power): a difference whose interval holds 0, or one below the MDE, is not evidence either way.
Each section names its command, machine, versions, seeds and wall time, and is generated from the
JSON file of the same name in benchmarks/results/ (a test checks that they agree).
"""

# ----------------------------------------------------------------------------------------------
# Studies


@dataclasses.dataclass(frozen=True)
class Study:
    """One named study: what trains, how long at each scale, what is recorded."""

    name: str
    description: str  # one paragraph for the report
    methods: tuple[str, ...]
    scales: dict[str, Mode]
    config: Path = compare.QUICKSTART  # the recipe every lomix run starts from
    probe_every: dict[str, int] = dataclasses.field(default_factory=dict)  # routing curves: every N steps
    probe_per_task: int = 4  # test prompts per task in the routing curves' probe batch
    baseline: str | dict[str, str] = "peft-lora"  # the paired differences are to this method (or per method)
    cell: Callable | None = None  # computes one cell; None: the method's entry in CELLS (compare.py's methods)
    needs_data: bool = True  # the cells take compare.prepare_data of the quickstart with the scale's tasks


# Multiple-choice BIG-bench tasks with a few hundred examples and short inputs, with the one-line
# description GLIDER's global router embeds (the multitask study runs lomix-glider on them).
CANDIDATES = {
    "navigate": compare.DESCRIPTIONS["navigate"],
    "disambiguation_qa": compare.DESCRIPTIONS["disambiguation_qa"],
    "causal_judgment": "Answer a question about whether one event caused another in a short story.",
    "hyperbaton": "Pick the sentence whose adjectives are in the correct English order.",
    "ruin_names": "Find the humorous one-letter edit of an artist or movie name.",
    "movie_recommendation": "Recommend the movie most similar to a list of movies.",
    "snarks": "Tell which of two nearly identical sentences is sarcastic.",
    "implicatures": "Decide whether a reply to a question means yes or no.",
    "presuppositions_as_nli": "Decide whether a sentence entails, contradicts or is neutral to another.",
    "winowhy": "Judge whether the reason given for a pronoun's referent is correct.",
    "logical_fallacy_detection": "Decide whether an argument is logically valid or a fallacy.",
    "emoji_movie": "Name the movie that a sequence of emojis describes.",
    "analogical_similarity": "Name the kind of analogy that relates two described situations.",
    "epistemic_reasoning": "Decide whether one sentence entails another about what people know or believe.",
    "formal_fallacies_syllogisms_negation": "Decide whether a syllogism with negations is deductively valid.",
    "timedial": "Pick the duration or time expression that fits a gap in a dialog.",
}


compare.DESCRIPTIONS.update(CANDIDATES)  # compare.overrides writes every trained task's description

# The lomix methods trained by the finetune recipe alone, with their router overrides.
ROUTERS = {
    "lomix-topk": ("router={name: topk, k: 2}",),
    "lomix-mhr": ("router={name: mhr, n_heads: 8}",),
    "lomix-remix": ("router={name: remix, k: 2}", "mixture.balance.switch=0.0", "rloo.samples=4"),
}
QUICKSTART_TASKS = tuple(compare.TASK_DESCRIPTIONS)
# The quickstart's six and six more, chosen with `python benchmarks/study.py multitask --check-tasks 12`
# (the frozen base model on 12 test examples of each of 16 candidates, 2026-11-30, 1.8 CPU-minutes; table
# in benchmarks/results/study_task_check_cpu.md). Rule: not solved (accuracy < 0.9), not a constant
# answer, not at the majority-class prior (the model would only echo the class balance: implicatures,
# winowhy, formal_fallacies, presuppositions_as_nli), at least 150 training examples (emoji_movie has 88),
# and the longest prompt within the cpu scale's 128 tokens (causal_judgment, analogical_similarity and
# timedial run to 520-800 tokens). Of the eight left, the six with 300 training examples were kept
# (snarks, 169, and epistemic_reasoning, nearest its prior, were not). Whether each moves with training
# is not measured here: the multitask study's per-task tables show it.
MULTITASK_TASKS = (
    *QUICKSTART_TASKS,
    "navigate",
    "disambiguation_qa",
    "hyperbaton",
    "ruin_names",
    "movie_recommendation",
    "logical_fallacy_detection",
)

COLLAPSE_REMIX = (  # recipes/configs/remix.yaml's router: each selected expert weighs as top-2's equal gates
    "router={name: remix, k: 2, granularity: sequence, omega: lora, omega_alpha: 16}",
    "mixture.balance.switch=0.0",
    "rloo.samples=4",
)
COLLAPSE_METHODS = {"lomix-topk": ROUTERS["lomix-topk"], "lomix-remix": COLLAPSE_REMIX}
# 8 experts as in the quickstart (room to collapse), the FFN projections only (the cpu budget)
COLLAPSE_EXTRA = ("mixture.num_experts=8", "mixture.target_modules=[gate_proj, up_proj, down_proj]")


def check_tasks(candidates: dict[str, str], per_task: int, max_length: int) -> list[dict]:
    """The frozen base model on the first ``per_task`` test examples of each candidate: accuracy,
    chance, majority-class prior, how many distinct answers it gives (1 = a constant answer),
    the training examples available (up to 300) and the longest test prompt in tokens."""
    from lomix.recipes.evaluation import predict, select_examples, summarise

    compare.DESCRIPTIONS.update(candidates)
    mode = Mode(tuple(candidates), 1, 1, 300, per_task, max_length, rounds=0, extra=("data.max_truncated=1.0",))
    data = compare.prepare_data(compare.load(compare.QUICKSTART, compare.overrides(mode, Path("unused"), 1)))
    model = compare.base_model(data).eval()
    examples = select_examples(data.test, data.cfg.eval)
    records = predict(model, data.formatter, examples, data.tasks, data.cfg.eval)
    summary = summarise(records, data.cfg.eval)["tasks"]
    rows = []
    for task in candidates:
        mine = [r for r, e in zip(records, examples, strict=True) if e.task == task]
        prompts = [len(data.tokenizer(e.input)["input_ids"]) for e in examples if e.task == task]
        rows.append(
            summary[task]
            | {
                "task": task,
                "distinct_answers": len({r["prediction"] for r in mine}),
                "train": sum(1 for f in data.features if f["task_id"] == data.tasks.id(task)),
                "longest_prompt": max(prompts),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Routing curves (collapse): the routers' outputs on a fixed probe batch every N optimizer steps


def probe_batch(data: compare.Data, per_task: int) -> dict:
    """The first ``per_task`` test examples of every task as one padded batch (never trained on)."""
    from lomix.recipes.data import Collator, tokenize

    rows = [e for task in data.tasks.names for e in [x for x in data.test if x.task == task][:per_task]]
    return Collator(data.tokenizer.pad_token_id)(tokenize(rows, data.formatter, data.tasks))


def layer_figures(summary: dict, num_experts: int) -> dict[str, float]:
    """One layer's routing figures from `lomix.stats.LayerStats.summary`: effective support of the
    gates and of the router distribution, and the load entropy (entropy of the mean gate share over
    the experts, divided by log E)."""
    from lomix.stats import entropy

    figures = {"effective_support": summary["effective_support"]}
    if "prob_support" in summary:
        figures["prob_support"] = summary["prob_support"]
    share = torch.tensor(summary["gate_share"], dtype=torch.float64)[None]
    figures["load_entropy"] = float(entropy(share)[0]) / math.log(num_experts)
    return figures


class RoutingCurves:
    """Records `layer_figures` of every mixture layer on a probe batch at step 0 and every
    ``every`` optimizer steps (and the last), through torch's global optimizer-step hook; the
    probe runs in eval mode without gradients, the RNG state restored after it, so the training
    run is the one it would be without probing."""

    def __init__(self, batch: dict, every: int, total: int):
        self.batch, self.every, self.total = batch, every, total
        self.model: torch.nn.Module | None = None
        self.steps: list[int] = []
        self.layers: dict[str, dict[str, list[float]]] = {}
        self.step = 0
        self._handle = None

    def build(self, inner: Callable) -> Callable:
        """A recipe ``build`` that injects the mixture with ``inner`` and then starts recording."""

        from torch.optim.optimizer import register_optimizer_step_post_hook

        def build(model, cfg, tasks, data_tasks):
            inner(model, cfg, tasks, data_tasks)
            self.model = model
            self.record()
            self._handle = register_optimizer_step_post_hook(self._after_step)
            return None

        return build

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self.step % self.every == 0 or self.step == self.total:
            self.record()

    def record(self) -> None:
        import lomix
        from lomix.stats import RoutingStats

        model = self.model
        state = torch.get_rng_state()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), RoutingStats(model) as stats:
                model(**compare.model_inputs(self.batch), use_cache=False)
        finally:
            model.train(was_training)
            torch.set_rng_state(state)
        experts = {name: layer.router.num_experts for name, layer in lomix.mixture_layers(model)}
        self.steps.append(self.step)
        for name, summary in stats.summary().items():
            for metric, value in layer_figures(summary, experts[name]).items():
                self.layers.setdefault(name, {}).setdefault(metric, []).append(round(value, 5))

    def result(self) -> dict:
        """{"steps", "layers": {layer: {metric: [per step]}}, "mean"/"min": {metric: [per step]}}."""
        metrics = sorted({m for layer in self.layers.values() for m in layer})
        over = {"mean": lambda v: sum(v) / len(v), "min": min}
        out = {"steps": self.steps, "layers": self.layers}
        for label, reduce in over.items():
            out[label] = {
                m: [round(reduce([layer[m][i] for layer in self.layers.values()]), 5) for i in range(len(self.steps))]
                for m in metrics
            }
        return out


# ----------------------------------------------------------------------------------------------
# Cells


def lomix_cell(study: Study, mode: Mode, method: str, scale: str, data: compare.Data, scratch: Path) -> dict:
    """A lomix method trained by the finetune recipe (no evaluation inside it), then its saved
    mixture loaded into a fresh base model and evaluated example by example."""
    import lomix
    from lomix.recipes import finetune
    from lomix.recipes.hooks import build_mixture

    routers = COLLAPSE_METHODS if study.name == "collapse" else ROUTERS
    run = scratch / method
    cfg = compare.load(
        study.config, compare.overrides(mode, run, mode.steps, *routers[method], "eval.after_training=false")
    )
    curves = None
    if study.probe_every.get(scale):
        per_task = min(study.probe_per_task, mode.test_per_task)
        curves = RoutingCurves(probe_batch(data, per_task), study.probe_every[scale], mode.steps)
        try:
            compare.lomix_run(cfg, lambda c: finetune.run(c, build=curves.build(build_mixture)))
        finally:
            curves.close()
    else:
        compare.lomix_run(cfg)
    model = compare.base_model(data)
    lomix.load(model, run / "mixture")
    adapter, active = compare.lomix_counts(model)
    result = compare.evaluate(model, data) | {"adapter_params": adapter, "active_params": active}
    result["balance_reduction"] = cfg.mixture.balance.reduction
    if curves is not None:
        result["curves"] = curves.result()
    return result


def compare_cell(method: str, builder: Callable, run_folder: str | None) -> Callable:
    """A cell from one of compare.py's method builders; a lomix run whose evaluation came from its
    recipe (no per-example records) is evaluated again from its saved mixture."""

    def cell(study: Study, mode: Mode, method_: str, scale: str, data: compare.Data, scratch: Path) -> dict:
        import lomix

        trained = builder(data, mode, scratch)
        result = dict(trained.eval)
        if "per_example" not in result and run_folder is not None:
            model = compare.base_model(data)
            lomix.load(model, scratch / run_folder / "mixture")
            result = compare.evaluate(model, data)
        result |= {"adapter_params": trained.adapter_params, "active_params": trained.active_params}
        result["notes"] = trained.notes
        result["balance_reduction"] = data.cfg.mixture.balance.reduction
        return result

    return cell


CELLS: dict[str, Callable] = {
    "peft-lora": compare_cell("peft-lora", compare.peft_lora, None),
    "peft-poly": compare_cell("peft-poly", compare.peft_poly, None),
    "peft-xlora": compare_cell("peft-xlora", compare.peft_xlora, None),
    "lomix-topk": lomix_cell,
    "lomix-mhr": lomix_cell,
    "lomix-remix": lomix_cell,
    "lomix-loramixer": compare_cell("lomix-loramixer", compare.lomix_loramixer, "lomix-loramixer/soft"),
    "lomix-glider": compare_cell("lomix-glider", compare.lomix_glider, "lomix-glider"),
}


# ----------------------------------------------------------------------------------------------
# Studies over shared per-seed runs (fewshot, library, merge): each seed's source runs are trained
# once into OUT/<study>_<scale>/shared (a run folder counts when its mixture is saved; lomix saves it
# atomically), and every cell of the seed starts from them.


def shared_folder(scratch: Path) -> Path:
    return scratch.parent.parent / "shared"


def train_once(config: Path, items: list[str], run: Path) -> Path:
    """A finetune run without evaluation, trained unless its mixture is already saved."""
    if not (run / "mixture").is_dir():
        compare.lomix_run(compare.load(config, [*items, f"output_dir={run}", "eval.after_training=false"]))
    return run


def evaluate_run(run_dir: Path, per_task: int) -> dict:
    """A saved run's mixture on the run's own test split, example by example."""
    from lomix.recipes.runs import load_run, run_examples

    run = load_run(run_dir)
    eval_cfg = dataclasses.replace(run.cfg.eval, max_examples_per_task=per_task)
    test = run_examples(run, "test", per_task)
    result = compare.evaluate_examples(run.model, run.formatter, test, run.tasks, eval_cfg)
    return result | {"balance_reduction": run.cfg.mixture.balance.reduction}


def data_items(mode: Mode) -> list[str]:
    return [
        f"data.bigbench.test_per_task={mode.test_per_task}",
        f"eval.max_examples_per_task={mode.test_per_task}",
        f"data.max_length={mode.max_length}",
        f"train.batch_size={mode.batch}",
        "train.progress=false",
        "train.save_every=0",
        "eval.before_training=false",
        f"seed={mode.seed}",
    ]


# fewshot: benchmarks/mhr_fewshot.py's multi-task sources and few-shot methods
FEWSHOT_SHOTS = (16, 64, 256)
FEWSHOT_EPOCHS = 4  # every shot is seen this many times: steps = ceil(epochs * shots * tasks / batch)


def fewshot_methods() -> dict[str, tuple[str, str, int]]:
    from mhr_fewshot import FEWSHOT

    return {
        f"{name}@{shots}": (*FEWSHOT[name], shots)
        for shots in FEWSHOT_SHOTS
        for name in ("lora-ft", "poly-z", "mhr-z", "mhr-mu")
    }


def fewshot_cell(study: Study, mode: Mode, method: str, scale: str, data, scratch: Path) -> dict:
    """Multi-task source (recipes/configs/mhr_multitask.yaml, mode.steps steps; shared per seed),
    then few-shot adaptation to the held-out tasks of recipes/configs/mhr_fewshot.yaml."""
    from mhr_fewshot import CONFIGS, MULTITASK

    source, how, shots = fewshot_methods()[method]
    common = data_items(mode)
    origin = train_once(
        CONFIGS / "mhr_multitask.yaml",
        [
            *MULTITASK[source],
            *common,
            f"train.max_steps={mode.steps}",
            f"train.warmup_steps={max(1, mode.steps // 10)}",
            f"train.log_every={mode.steps}",
            f"data.bigbench.train_per_task={mode.train_per_task}",
        ],
        shared_folder(scratch) / f"multitask-{source}-s{mode.seed}",
    )
    tasks = compare.load(CONFIGS / "mhr_fewshot.yaml", []).data.bigbench.tasks
    steps = math.ceil(FEWSHOT_EPOCHS * shots * len(tasks) / mode.batch)
    run = train_once(
        CONFIGS / "mhr_fewshot.yaml",
        [
            *common,
            f"fewshot.init_from={origin}",
            f"fewshot.method={how}",
            f"data.bigbench.train_per_task={shots}",
            f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, steps // 10)}",
            f"train.log_every={steps}",
        ],
        scratch / "fewshot",
    )
    return evaluate_run(run, mode.test_per_task) | {"steps": steps, "shots": shots}


# library: benchmarks/glider_bigbench.py's experts and settings
LIBRARY_ALPHAS = (0.0, 3.0, 100.0)


def library_methods() -> list[str]:
    routers = [f"glider-a{alpha:g}" for alpha in LIBRARY_ALPHAS] + ["arrow"]
    return ["base"] + [f"{r}-held-{split}" for split in ("in", "out") for r in routers]


def library_cell(study: Study, mode: Mode, method: str, scale: str, data, scratch: Path) -> dict:
    """One expert per GLIDER task (recipes/configs/glider_expert.yaml, mode.steps steps each) with
    its PHATGOOSE gates (shared per seed), then the library routed by GLIDER at one alpha or by
    Arrow, over all experts (held-in) or without the query task's own expert (held-out)."""
    result = library_evaluation(mode, method, data, shared_folder(scratch) / f"library-s{mode.seed}")
    return result | {"balance_reduction": data.cfg.mixture.balance.reduction}


def library_evaluation(mode: Mode, method: str, data, shared: Path) -> dict:
    """`library_cell`'s evaluation of one router setting over the seed's library in ``shared``."""
    from glider_bigbench import TASKS, train_experts

    import lomix
    from lomix.methods.glider.config import LibraryConfig
    from lomix.methods.glider.library import Library, load_library, set_glider
    from lomix.methods.glider.recipe import add_run, expert_name

    settings = argparse.Namespace(
        train_per_task=mode.train_per_task, test_per_task=mode.test_per_task, max_length=mode.max_length,
        expert_steps=mode.steps, batch_size=mode.batch, expert_lr=1e-3, seed=mode.seed,
    )  # fmt: skip
    runs = train_experts(settings, shared)
    library = Library.open(shared / "library", create=True)
    for task, run in runs.items():
        if expert_name(task) not in library.names():
            add_run(library, run, LibraryConfig(gate_steps=mode.steps), batch_size=mode.batch)
    model = compare.base_model(data)
    eval_cfg = data.cfg.eval
    if method == "base":
        return compare.evaluate_examples(model, data.formatter, data.test, data.tasks, eval_cfg)
    router, split = method.rsplit("-held-", 1)

    def attach(exclude: list[str]) -> None:
        if router == "arrow":
            load_library(model, library, router=lomix.router_config("arrow", k=mode.k), exclude=exclude)
        else:
            alpha = float(router.removeprefix("glider-a"))
            load_library(model, library, alpha=alpha, k=mode.k, exclude=exclude)
            set_glider(model, alpha=alpha)

    if split == "in":
        attach([])
        return compare.evaluate_examples(model, data.formatter, data.test, data.tasks, eval_cfg)
    parts = []
    for task in TASKS:  # held out: each task's own expert left out while its rows are scored
        attach([expert_name(task)])
        rows = [e for e in data.test if e.task == task]
        parts.append(compare.evaluate_examples(model, data.formatter, rows, data.tasks, eval_cfg))
        lomix.eject(model)
    return merge_parts(parts)


def merge_parts(parts: list[dict]) -> dict:
    """One evaluation from evaluations of disjoint task subsets."""
    tasks = {t: v for part in parts for t, v in part["tasks"].items()}
    return {
        "tasks": tasks,
        "mean": {
            "score": sum(t["score"] for t in tasks.values()) / len(tasks),
            "n": sum(t["n"] for t in tasks.values()),
        },
        "per_example": {
            "ids": [i for part in parts for i in part["per_example"]["ids"]],
            "correct": [c for part in parts for c in part["per_example"]["correct"]],
        },
    }


# merge: benchmarks/merge_quality.py's MC-SMoE merge of a quickstart run, with and without recovery
MERGE_LRS = (1e-5, 3e-5, 1e-4)


def merge_methods() -> list[str]:
    merged = [f"mcsmoe-{n}" for n in (4, 2)]
    recovered = [f"mcsmoe-{n}+rec{lr:g}" for n in (4, 2) for lr in MERGE_LRS]
    return ["unmerged-8", *merged, *recovered]


def merge_cell(study: Study, mode: Mode, method: str, scale: str, data, scratch: Path) -> dict:
    """The quickstart's top-2 of 8 (mode.steps steps; shared per seed), merged by MC-SMoE to 4 or 2
    experts per layer (frequency-weighted; lomix.recipes.merge), optionally recovered by distillation
    from the unmerged mixture for mode.steps // 4 steps at one learning rate."""
    from lomix.merge import MergeOptions
    from lomix.recipes.merge import calibrate, merge_run
    from lomix.recipes.runs import load_run, run_examples

    shared = shared_folder(scratch) / f"source-s{mode.seed}"
    items = compare.overrides(mode, shared, mode.steps, *ROUTERS["lomix-topk"], "mixture.num_experts=8")
    source = train_once(compare.QUICKSTART, items, shared)
    if method == "unmerged-8":
        return evaluate_run(source, mode.test_per_task)
    merged, _, lr = method.removeprefix("mcsmoe-").partition("+rec")
    teacher = load_run(source)
    stats = calibrate(teacher, 16, mode.batch)
    student = load_run(source)
    report = merge_run(
        student, MergeOptions(experts=float(merged)), stats=stats, teacher=teacher.model,
        recover_steps=mode.steps // 4 if lr else 0, recover_lr=float(lr or 0), batch_size=mode.batch, seed=mode.seed,
    )  # fmt: skip
    eval_cfg = dataclasses.replace(student.cfg.eval, max_examples_per_task=mode.test_per_task)
    test = run_examples(student, "test", mode.test_per_task)
    result = compare.evaluate_examples(student.model, student.formatter, test, student.tasks, eval_cfg)
    merge = {k: report[k] for k in ("experts_after", "bytes_before", "bytes_after")}
    return result | {"merge": merge, "balance_reduction": student.cfg.mixture.balance.reduction}


STUDIES = {
    "collapse": Study(
        name="collapse",
        description=(
            "Softmax top-2 (Switch balance loss 0.01) vs ReMix (k = 2 equal weights, RLOO, M = 4) over a long run "
            "on the quickstart's six tasks, 8 experts of rank 8 on the FFN projections (gate, up, down). Every "
            "few steps, per mixture layer on a fixed probe batch of test prompts: the effective support of the "
            "gates (||g||_1^2/||g||_2^2 per token, mean; k = 2 when equal, 1 when one expert takes all), the "
            "effective support of the router's full distribution, and the expert-load entropy (entropy of the "
            "mean gate share over the experts / log E; 1 = all experts used equally). ReMix's gate support is 2 "
            "by construction; the paper's claim is that softmax top-k collapses toward 1-2 experts. ReMix routes "
            "whole sequences (the paper's granularity), so its load entropy comes from 2 selections per probe "
            "sequence (4 per task): about 0.96 would be reached by uniformly random selections of that count."
        ),
        methods=tuple(COLLAPSE_METHODS),
        scales={
            "smoke": Mode(QUICKSTART_TASKS[:3], 4, 2, 8, 2, 96, rounds=0, extra=COLLAPSE_EXTRA),
            # cpu: smoke timing on the 2-core machine (loaded, scaled to an idle one): a top-k step of 4 at length 128
            # ~3.5 s with its share of the probes, a ReMix step ~3x (M = 4 replicas), evaluation of 120 test
            # examples and model loading ~75 s per cell: 3 seeds x (90 x (3.5 + 10.5) s + 2 x 75 s) = ~70 min
            "cpu": Mode(QUICKSTART_TASKS, 90, 4, 300, 20, 128, rounds=0, extra=COLLAPSE_EXTRA),
            "gpu": Mode(QUICKSTART_TASKS, 200, 8, 300, 40, 192, rounds=0, extra=COLLAPSE_EXTRA),  # gpu_study.sh
        },
        probe_every={"smoke": 2, "cpu": 10, "gpu": 20},
        baseline="lomix-topk",
    ),
    "multitask": Study(
        name="multitask",
        description=(
            "Every lomix method vs PEFT LoRA (one adapter of the mixtures' active rank k*r = 16), PEFT Poly and PEFT "
            "X-LoRA (benchmarks/compare.py's methods and budget rules) on 12 BIG-bench tasks: the quickstart's six "
            "and six the frozen base model does not solve (`--check-tasks`). E = 12 experts of rank 8, top-2, all "
            "seven projections; the same data, sampler, seed, warm-up, clipping and optimizer steps for every method."
        ),
        methods=tuple(compare.METHODS),
        scales={
            "smoke": Mode(("color/hex", "navigate", "ruin_names"), 4, 2, 8, 2, 96, rounds=0),
            # cpu (estimate, idle 2 cores): a step of 4 at length 128 on all seven projections ~4 s (compare.py
            # --quick: 8 methods x 16 steps in 19.5 min); per seed in step-equivalents of 32 steps: LoRA 32, Poly 32,
            # X-LoRA 16 + 16 x 1.9, top-k 32 x 1.2, MHR 32 x 1.3, ReMix 32 x 4.2, LoRA-Mixer 32, GLIDER 32 + its
            # 12 expert runs' loading = ~420 x 4 s = 28 min; evaluation 8 x 240 examples x ~0.6 s = 19 min;
            # model loading ~4 min: ~51 min per seed, 3 seeds = ~2.5 h
            "cpu": Mode(MULTITASK_TASKS, 32, 4, 300, 20, 128, rounds=0),
            "gpu": Mode(MULTITASK_TASKS, 100, 8, 300, 20, 192, rounds=0),  # gpu_study.sh
        },
    ),
    "fewshot": Study(
        name="fewshot",
        description=(
            "Few-shot adaptation to held-out tasks (recipes/configs/mhr_fewshot.yaml's) from multi-task sources "
            "(recipes/configs/mhr_multitask.yaml: one LoRA r=16, Poly and MHR of 4 skills r=4, equal adapter "
            "parameters): LoRA fine-tuned further, Poly-z and MHR-z (a fresh routing row per new task, only it "
            "trains), MHR-mu (the skills' mean as one LoRA, fine-tuned), with 16/64/256 shots per task and "
            f"ceil({FEWSHOT_EPOCHS} x shots x tasks / batch) steps (every shot seen {FEWSHOT_EPOCHS} times). Paired "
            "differences are to LoRA at the same shots. Steps below: the multi-task sources'."
        ),
        methods=tuple(fewshot_methods()),
        scales={
            "smoke": Mode((), 2, 2, 8, 2, 96, rounds=0),
            "cpu": Mode((), 48, 8, 300, 20, 128, rounds=0),
            "gpu": Mode((), 100, 8, 300, 40, 192, rounds=0),
        },
        baseline={m: f"lora-ft@{m.rsplit('@', 1)[1]}" for m in fewshot_methods()},
        cell=fewshot_cell,
        needs_data=False,
    ),
    "library": Study(
        name="library",
        description=(
            "GLIDER over a library of one LoRA expert per task (benchmarks/glider_bigbench.py's 8 tasks, "
            "recipes/configs/glider_expert.yaml) with PHATGOOSE gates, at alpha 0 (PHATGOOSE), 3 and 100, and Arrow "
            "(k = 2), held-in (every expert) and held-out (the query task's own expert left out), beside the frozen "
            "base model (the paired baseline). Steps below: each expert's and each gate's."
        ),
        methods=tuple(library_methods()),
        scales={
            "smoke": Mode(tuple(GLIDER_TASKS), 2, 2, 8, 2, 96, rounds=0),
            "cpu": Mode(tuple(GLIDER_TASKS), 48, 8, 300, 20, 128, rounds=0),
            "gpu": Mode(tuple(GLIDER_TASKS), 50, 8, 300, 40, 192, rounds=0),
        },
        baseline="base",
        cell=library_cell,
    ),
    "merge": Study(
        name="merge",
        description=(
            "MC-SMoE merging (frequency-weighted, lomix.recipes.merge) of the quickstart's top-2 of 8 experts to 4 "
            "and 2 experts per layer, without and with recovery (distillation from the unmerged mixture, steps/4 "
            "steps, learning rate 1e-5, 3e-5 or 1e-4); paired differences to the unmerged mixture."
        ),
        methods=tuple(merge_methods()),
        scales={
            "smoke": Mode(QUICKSTART_TASKS[:3], 4, 2, 8, 2, 96, rounds=0),
            "cpu": Mode(QUICKSTART_TASKS, 48, 4, 300, 20, 128, rounds=0),
            "gpu": Mode(QUICKSTART_TASKS, 100, 8, 300, 40, 192, rounds=0),
        },
        baseline="unmerged-8",
        cell=merge_cell,
        needs_data=False,
    ),
}


# ----------------------------------------------------------------------------------------------
# The runner: cells, resume, progress


def lomix_commit() -> str:
    """``git rev-parse HEAD`` of this checkout, + "-dirty" when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_atomic(path: Path, payload: dict) -> None:
    """The file appears whole or not at all (a temporary beside it, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def cell_path(folder: Path, method: str, seed: int) -> Path:
    return folder / "cells" / f"{method}__s{seed}.json"


def run_cells(
    folder: Path,
    methods: list[str],
    seeds: list[int],
    compute: Callable[[str, int, Path], dict],
    log: Callable[[str], None] = print,
    keep_runs: bool = False,
) -> list[dict]:
    """Every (method, seed) cell, seed by seed (a partial study holds all methods of its first
    seeds): a finished cell's file is read, never recomputed; a missing one is computed by
    ``compute(method, seed, scratch)`` in a fresh scratch folder and written atomically. One line
    per cell with the ETA of the rest (from the cells computed in this sitting)."""
    todo = [(m, s) for s in seeds for m in methods]
    done_here: list[float] = []
    cells = []
    for index, (method, seed) in enumerate(todo, 1):
        path = cell_path(folder, method, seed)
        if path.is_file():
            cells.append(json.loads(path.read_text()))
            log(f"[{index}/{len(todo)}] {method} seed {seed}: finished before, skipped")
            continue
        scratch = folder / "runs" / f"{method}__s{seed}"
        if scratch.exists():  # an interrupted attempt: nothing in it is kept
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        start = time.perf_counter()
        result = compute(method, seed, scratch)
        wall = time.perf_counter() - start
        result = result | {"method": method, "seed": seed, "wall_s": wall}
        write_atomic(path, result)
        if not keep_runs:
            shutil.rmtree(scratch, ignore_errors=True)
        cells.append(result)
        done_here.append(wall)
        left = sum(1 for m, s in todo[index:] if not cell_path(folder, m, s).is_file())
        eta = left * sum(done_here) / len(done_here)
        score = result.get("mean", {}).get("score")
        shown = f"accuracy {score:.3f}, " if score is not None else ""
        log(
            f"[{index}/{len(todo)}] {method} seed {seed}: {shown}{wall / 60:.1f} min; ETA {eta / 60:.0f} min",
        )
    return cells


def check_same_budget(cells: list[dict], folder: Path) -> None:
    """Refuse a report over cells trained under different settings (a study definition changed
    between sittings): their differences would not be the methods'."""
    budgets: dict[str, list[str]] = {}
    for cell in cells:
        settings = {k: v for k, v in cell.get("settings", {}).items() if k != "seed"}
        budgets.setdefault(json.dumps(settings, sort_keys=True), []).append(f"{cell['method']}__s{cell['seed']}")
    if len(budgets) > 1:
        groups = "; ".join(", ".join(names) for names in budgets.values())
        raise SystemExit(
            f"{folder}/cells: cells trained with different settings ({groups}); delete the stale cell files "
            "or choose another --out"
        )


def device_name() -> str:
    """The device the cells trained on (compare.device(): the GPU when there is one)."""
    return torch.cuda.get_device_name() if compare.device().type == "cuda" else "cpu"


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def study_cell(study: Study, scale: str) -> Callable[[str, int, Path], dict]:
    """compute(method, seed, scratch) of the runner for ``study`` at ``scale``."""
    prepared: dict[int, compare.Data] = {}

    def compute(method: str, seed: int, scratch: Path) -> dict:
        mode = dataclasses.replace(study.scales[scale], seed=seed)
        if study.needs_data and seed not in prepared:
            prepared.clear()
            cfg = compare.load(study.config, compare.overrides(mode, scratch / "data", mode.steps))
            prepared[seed] = compare.prepare_data(cfg)
        result = (study.cell or CELLS[method])(study, mode, method, scale, prepared.get(seed), scratch)
        return result | {
            "study": study.name,
            "scale": scale,
            "commit": lomix_commit(),
            "settings": dataclasses.asdict(mode),
        }

    return compute


# ----------------------------------------------------------------------------------------------
# Report


def curves_summary(cells: list[dict]) -> dict:
    """Per method: the layer-mean and layer-min curves of each seed and their final values (mean over seeds)."""
    out: dict[str, dict] = {}
    for cell in sorted(cells, key=lambda c: (c["method"], c["seed"])):
        if "curves" not in cell:
            continue
        entry = out.setdefault(cell["method"], {"steps": cell["curves"]["steps"], "seeds": {}})
        entry["seeds"][str(cell["seed"])] = {"mean": cell["curves"]["mean"], "min": cell["curves"]["min"]}
    for entry in out.values():
        seeds = list(entry["seeds"].values())
        metrics = seeds[0]["mean"]
        entry["final"] = {
            m: {k: sum(s[k][m][-1] for s in seeds) / len(seeds) for k in ("mean", "min")} for m in metrics
        }
    return out


def plot(results: dict, path: Path) -> None:
    """Accuracy with 95% intervals per method; for a study with routing curves, the curves too."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curves = results.get("curves") or {}
    metrics = [
        m
        for m in ("effective_support", "prob_support", "load_entropy")
        if any(m in e["final"] for e in curves.values())
    ]
    figure, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 + 4.5 * len(metrics), 4.2), squeeze=False)
    axes = axes[0]
    methods = results["summary"]["methods"]
    names = list(methods)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        entry = methods[name]["overall"]
        error = [[entry["mean"] - entry["low"]], [entry["high"] - entry["mean"]]]
        marker = "s" if name.startswith("peft") else "o"
        axes[0].errorbar([i], [entry["mean"]], yerr=error, fmt=marker, color=colours[i % len(colours)], capsize=4)
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("test accuracy (mean, 95% bootstrap CI)")
    axes[0].grid(alpha=0.3)
    for axis, metric in zip(axes[1:], metrics, strict=True):
        for name, entry in curves.items():
            colour = colours[names.index(name) % len(colours)] if name in names else "grey"
            seeds = [s for s in entry["seeds"].values() if metric in s["mean"]]
            for s in seeds:
                axis.plot(entry["steps"], s["mean"][metric], color=colour, linewidth=0.6, alpha=0.5)
                axis.plot(entry["steps"], s["min"][metric], color=colour, linewidth=0.6, alpha=0.5, linestyle=":")
            if seeds:
                mean = [sum(s["mean"][metric][i] for s in seeds) / len(seeds) for i in range(len(entry["steps"]))]
                low = [sum(s["min"][metric][i] for s in seeds) / len(seeds) for i in range(len(entry["steps"]))]
                axis.plot(entry["steps"], mean, color=colour, linewidth=2, label=f"{name} (layer mean)")
                axis.plot(entry["steps"], low, color=colour, linewidth=2, linestyle="--", label=f"{name} (min layer)")
        axis.set_xlabel("optimizer step")
        axis.set_title(metric.replace("_", " "), fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"study {results['study']} ({results['scale']} scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(
    study: Study, scale: str, cells: list[dict], command: str, device: str, folder: Path, doc: Path | None
) -> dict:
    """study_<name>_<scale>.{json,md,png} in ``folder`` and the study's section of ``doc``."""
    results = {
        "study": study.name,
        "scale": scale,
        "description": study.description,
        "meta": {
            "command": command,
            "machine": machine(),
            "device": device,
            "versions": versions(),
            "commits": sorted({c["commit"] for c in cells}),
            "seeds": sorted({c["seed"] for c in cells}),
            "balance_reductions": sorted({c.get("balance_reduction", "n/a") for c in cells}),
            "wall_minutes": sum(c["wall_s"] for c in cells) / 60,
            "settings": _settings(study.scales[scale]),
        },
        "summary": study_report.summarise(cells, study.baseline),
        "cells": [{k: v for k, v in c.items() if k != "curves"} for c in cells],
    }
    curves = curves_summary(cells)
    if curves:
        results["curves"] = curves
        results["curves_per_layer"] = {
            f"{c['method']}__s{c['seed']}": c["curves"]["layers"] for c in cells if "curves" in c
        }
    name = f"study_{study.name}_{scale}"
    write_atomic(folder / f"{name}.json", results)
    body = study_report.section(results)
    (folder / f"{name}.md").write_text(body + "\n")
    plot(results, folder / f"{name}.png")
    if doc is not None:
        study_report.update_document(doc, DOC_INTRO, results)
    return results


def _settings(mode: Mode) -> str:
    return (
        f"{len(mode.tasks)} tasks, {mode.steps} optimizer steps of {mode.batch}, {mode.train_per_task} training and "
        f"{mode.test_per_task} test examples per task, max length {mode.max_length}, rank {mode.rank}, k {mode.k}"
        + (f", overrides {' '.join(mode.extra)}" if mode.extra else "")
    )


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--scale", choices=["smoke", "cpu", "gpu"], default="smoke")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the study's methods")
    parser.add_argument("--out", default="runs/study", help="cells and scratch runs go to OUT/<study>_<scale>")
    parser.add_argument("--results", default=str(RESULTS), help="folder of study_<name>_<scale>.{json,md,png}")
    parser.add_argument("--doc", default=str(DOC), help="markdown file of the summaries ('' for none)")
    parser.add_argument("--report", action="store_true", help="only the report of the cells already finished")
    parser.add_argument("--keep-runs", action="store_true", help="keep each cell's run folders")
    parser.add_argument(
        "--check-tasks",
        type=int,
        metavar="N",
        default=0,
        help="only the base model on N test examples of each candidate task",
    )
    args = parser.parse_args(argv)
    if args.check_tasks:
        rows = check_tasks(CANDIDATES, args.check_tasks, 192)
        print("| task | n | base accuracy | chance | majority | distinct answers | train examples | longest prompt |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['task']} | {r['n']} | {r['score']:.3f} | {r['chance']:.3f} | {r['majority']:.3f} | "
                f"{r['distinct_answers']} | {r['train']} | {r['longest_prompt']} |"
            )
        return {"check_tasks": rows}
    study = STUDIES[args.study]
    methods = args.methods or list(study.methods)
    unknown = [m for m in methods if m not in study.methods]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not in study {study.name} ({', '.join(study.methods)})")
    folder = Path(args.out) / f"{study.name}_{args.scale}"
    seeds = list(range(args.seeds))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))))
    command = " ".join(["python benchmarks/study.py", *(argv if argv is not None else sys.argv[1:])])
    if args.report:
        cells = [
            json.loads(cell_path(folder, m, s).read_text())
            for s in seeds
            for m in methods
            if cell_path(folder, m, s).is_file()
        ]
    else:
        print(
            f"study {study.name} ({args.scale}): {len(methods)} methods x {len(seeds)} seeds into {folder}", flush=True
        )
        cells = run_cells(folder, methods, seeds, study_cell(study, args.scale), keep_runs=args.keep_runs)
    if not cells:
        raise SystemExit(f"study {study.name}: no finished cells in {folder}")
    check_same_budget(cells, folder)
    results = report(
        study, args.scale, cells, command, device_name(), Path(args.results), Path(args.doc) if args.doc else None
    )
    print(study_report.tables(results["summary"]), flush=True)
    return results


if __name__ == "__main__":
    main()
