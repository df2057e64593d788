"""lomix beside the PEFT tools a user would otherwise pick, on identical data, steps, seeds and budget.

    python benchmarks/compare.py --quick    # 3 tasks, 16 steps of 4: under 20 minutes on 2 CPU cores
    python benchmarks/compare.py            # 6 tasks, 96 steps of 8: about 2.5 hours on 2 CPU cores (estimated)

SmolLM2-135M-Instruct (frozen, fp32) and the offline BIG-bench multi-task set of the quickstart; all
seven projections of every layer adapted; E = number of tasks experts of rank r = 8, top-k = 2.

  peft-lora      PEFT LoRA, ONE adapter of rank k*r = 16 (the mixtures' ACTIVE expert rank per token)
  peft-poly      PEFT's Poly tuner: E skills of rank r, one routing row per task (n_splits 1)
  peft-xlora     PEFT X-LoRA over E per-task LoRAs (the LoRA-Mixer hard stage's experts, exported as
                 PEFT adapters), only its scaling classifier trains
  lomix-topk     softmax top-k router, Switch balance loss 0.01
  lomix-mhr      Multi-Head Routing: E skills, 8 heads, one routing row per task and head
  lomix-remix    ReMix: equal weights over k Gumbel-top-k experts, router trained by RLOO (M = 4)
  lomix-loramixer LoRA-Mixer: hard stage (expert j on task j), then the soft router stage; top-k inference
  lomix-glider   GLIDER: one single-task expert per task + PHATGOOSE gates, global routing by the task
                 descriptions (alpha 100, held-in), top-k

Budget: every method takes the same number S of optimizer steps of the same batch size over the same
data (the finetune recipe's sampler and seed; AdamW, linear warm-up over S/10 and decay, clipping at
1.0); two-stage methods split it: LoRA-Mixer and X-LoRA spend S/2 on the shared hard stage and S/2 on
their router, GLIDER S/2 on its single-task experts and S/2 on their gates, shared out over the tasks.
All mixtures hold the same adapter parameters (E experts of rank r). Learning rates: experts and
LoRAs 1e-3; Poly/MHR routing rows 0.1 (lomix's default, Ponti et al.); LoRA-Mixer's router and
X-LoRA's classifier 1e-2 (recipes/configs/loramixer.yaml); GLIDER's gates 1e-2 constant
(`lomix library add`); top-k and ReMix routers 1e-3. PEFT Poly's B factors train at 2r x the rate,
which is exactly PEFT Poly with the alpha/r scale of the others (PEFT's Poly divides by r).

Measured per method, in this one process: mean and per-task test accuracy (multiple choice by choice
log-likelihood, the recipes' evaluator), adapter and active-per-token parameters, the effective
support of the routing (||g||_1^2/||g||_2^2 of each token's expert weights on each task's first test
examples, mean over layers and tasks; PEFT LoRA: 1), training-step and forward time as ratios to
PEFT LoRA on one training batch (alternating rounds, median and IQR, benchmarks/harness.py's protocol), and
the extra peak resident memory of two more training steps on that batch over what is resident
before them (steady state: AdamW's state already exists; the kernel's high-water mark reset first).

Writes benchmarks/results/compare_<mode>_cpu.{json,md,png}; run folders go under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from glider_bigbench import TASKS as GLIDER_TASKS
from harness import machine, ratio_table, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICKSTART = ROOT / "recipes" / "configs" / "quickstart.yaml"
EXPERT_CONFIG = ROOT / "recipes" / "configs" / "glider_expert.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# GLIDER's global router embeds the task descriptions of benchmarks/glider_bigbench.py
TASK_DESCRIPTIONS = {
    task: GLIDER_TASKS[task]
    for task in (
        "date_understanding",
        "intent_recognition",
        "multiemo/hotels_sentence_en",
        "color/hex",
        "metaphor_boolean",
        "sports_understanding",
    )
}  # the quickstart's six tasks
# every task a comparison may train on, with the description GLIDER's global router embeds
DESCRIPTIONS = dict(GLIDER_TASKS)
METHODS = [
    "peft-lora",
    "peft-poly",
    "peft-xlora",
    "lomix-topk",
    "lomix-mhr",
    "lomix-remix",
    "lomix-loramixer",
    "lomix-glider",
]


@dataclasses.dataclass(frozen=True)
class Mode:
    """One size of the comparison."""

    tasks: tuple[str, ...]
    steps: int  # optimizer steps per method (split between the stages of two-stage methods)
    batch: int
    train_per_task: int
    test_per_task: int
    max_length: int
    rounds: int  # timing rounds (after the warm-up rounds)
    warmup: int = 2
    rank: int = 8
    k: int = 2
    seed: int = 0  # training seed (init and sampler); the test split has its own (data.bigbench.split_seed)
    extra: tuple[str, ...] = ()  # config overrides of every lomix run (benchmarks/study.py's studies)


MODES = {
    "quick": Mode(
        tasks=("color/hex", "date_understanding", "intent_recognition"),
        steps=16,
        batch=4,
        train_per_task=48,
        test_per_task=12,
        max_length=128,
        rounds=3,
        warmup=1,
    ),
    # every code path in a few minutes; its numbers mean nothing
    "smoke": Mode(
        tasks=("color/hex", "date_understanding", "intent_recognition", "sports_understanding"),
        steps=4,
        batch=2,
        train_per_task=8,
        test_per_task=2,
        max_length=96,
        rounds=2,
    ),
    "full": Mode(
        tasks=tuple(TASK_DESCRIPTIONS),
        steps=96,
        batch=8,
        train_per_task=300,
        test_per_task=40,
        max_length=192,
        rounds=20,
    ),
}


# ----------------------------------------------------------------------------------------------
# Configs: the quickstart recipe with the comparison's settings


def overrides(mode: Mode, out: Path, steps: int, *extra: str, tasks: tuple[str, ...] | None = None) -> list[str]:
    tasks = tasks or mode.tasks
    descriptions = {t: DESCRIPTIONS[t] for t in tasks}
    return [
        f"data.bigbench.tasks=[{', '.join(tasks)}]",
        f"data.bigbench.train_per_task={mode.train_per_task}",
        f"data.bigbench.test_per_task={mode.test_per_task}",
        f"data.task_descriptions={json.dumps(descriptions)}",
        f"data.max_length={mode.max_length}",
        f"mixture.num_experts={len(mode.tasks)}",
        f"mixture.rank={mode.rank}",
        f"mixture.alpha={2 * mode.rank}",
        f"train.max_steps={steps}",
        f"train.batch_size={mode.batch}",
        f"train.warmup_steps={max(1, math.ceil(steps / 10))}",
        f"train.log_every={max(1, steps // 4)}",
        "train.progress=false",
        "train.save_every=0",
        "eval.before_training=false",
        f"eval.max_examples_per_task={mode.test_per_task}",
        f"output_dir={out}",
        f"seed={mode.seed}",
        *mode.extra,
        *extra,
    ]


def load(config: Path, items: list[str]):
    from lomix.recipes.config import load_config

    return load_config(config, items)


def finished(run: Path) -> dict | None:
    path = run / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def lomix_run(cfg, runner=None) -> dict:
    """A lomix recipe in this process (accelerate's global state reset after it)."""
    from accelerate.state import AcceleratorState

    from lomix.recipes import finetune

    try:
        return (runner or finetune.run)(cfg)
    finally:
        AcceleratorState._reset_state(True)


# ----------------------------------------------------------------------------------------------
# PEFT models behind the recipes' model interface


class PeftCausalLM(torch.nn.Module):
    """A PEFT model called like a lomix-wrapped model by the recipes' loss and evaluator: task ids go
    to PEFT's Poly tuner (the only tuner here that reads them), task descriptions are dropped, and the
    KV cache keyword follows the base model's name for it."""

    def __init__(self, peft_model: torch.nn.Module, *, task_ids: bool = False, cache: bool = True):
        super().__init__()
        self.peft_model = peft_model
        self.uses_task_ids = task_ids
        self.cache = cache  # X-LoRA's scaling pass would fill a KV cache twice: score whole sequences

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        task_ids: torch.Tensor | None = None,
        task_descriptions: list[str] | None = None,
    ):
        extra = {"task_ids": task_ids} if self.uses_task_ids else {}
        if cache is not None:
            extra["cache"] = cache
        return self.peft_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=bool(use_cache) and self.cache,
            logits_to_keep=logits_to_keep,
            **extra,
        )


@dataclasses.dataclass
class Data:
    """The data every method sees: the same examples, tasks, tokenization and test split."""

    cfg: Any  # FinetuneConfig of the quickstart with the mode's overrides
    tokenizer: Any
    formatter: Any
    tasks: Any
    features: list
    test: list


def prepare_data(cfg) -> Data:
    """The finetune recipe's data for ``cfg`` (a FinetuneConfig)."""
    from lomix.recipes.assets import load_model_and_tokenizer
    from lomix.recipes.data import Formatter, load_examples, task_set, tokenize

    train, test = load_examples(cfg.data)
    _, tokenizer = load_model_and_tokenizer(cfg.model)
    tasks = task_set(train, cfg.data)
    formatter = Formatter(tokenizer, cfg.data)
    return Data(cfg, tokenizer, formatter, tasks, tokenize(train, formatter, tasks), test)


def device() -> torch.device:
    """Where the PEFT models train and every model here evaluates: the GPU when there is one, as
    the lomix recipes' runs (accelerate) train there."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_model(data: Data) -> torch.nn.Module:
    from lomix.recipes.assets import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(data.cfg.model)
    return model.to(device())


def loader(data: Data, steps: int):
    """The finetune recipe's batches (same sampler, grouping and seed), epoch after epoch."""
    from lomix.recipes.data import Collator, EpochSampler, ListDataset

    train = data.cfg.train
    keep = len(data.features) // train.batch_size * train.batch_size
    sampler = EpochSampler(
        len(data.features),
        data.cfg.seed,
        keep=keep,
        lengths=[len(f["input_ids"]) for f in data.features],
        group=train.group_by_length,
        batch=train.batch_size,
    )
    batches = torch.utils.data.DataLoader(
        ListDataset(data.features),
        batch_size=train.batch_size,
        sampler=sampler,
        collate_fn=Collator(data.tokenizer.pad_token_id),
        drop_last=True,
        generator=torch.Generator().manual_seed(data.cfg.seed),
    )
    epoch, done = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        for batch in batches:
            yield batch
            done += 1
            if done == steps:
                return
        epoch += 1


def train_peft(model: torch.nn.Module, data: Data, steps: int, groups: list[dict]) -> list[float]:
    """The finetune recipe's loop for a PEFT model: summed answer-token loss over answer tokens,
    AdamW, linear warm-up and decay, gradient clipping. Returns the per-step losses."""
    from lomix.recipes.finetune import answer_loss_sum, answer_tokens, forward, lr_factor
    from lomix.recipes.quantization import fusable

    train = dataclasses.replace(data.cfg.train, max_steps=steps, warmup_steps=max(1, math.ceil(steps / 10)))
    # the recipe's optimizer (recipes/quantization.build_optimizer): the same kernel for every method
    optimizer = torch.optim.AdamW(groups, weight_decay=train.weight_decay, fused=fusable(groups))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train))
    params = [p for group in groups for p in group["params"]]
    losses = []
    model.train()
    for batch in loader(data, steps):
        batch = {k: v.to(device()) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = answer_loss_sum(*forward(model, batch)) / max(answer_tokens(batch), 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_batches(data: Data, size: int) -> list[dict]:
    """One batch of the first ``size`` test examples of each task (prompts and answers), for the
    routing-support figure: every task counts, and no method has trained on these rows."""
    from lomix.recipes.data import Collator, tokenize

    collate = Collator(data.tokenizer.pad_token_id)
    batches = []
    for task in data.tasks.names:
        rows = [e for e in data.test if e.task == task][:size]
        batches.append(collate(tokenize(rows, data.formatter, data.tasks)))
    return batches


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# The methods: each trains (all its stages), evaluates, and returns what the measurements need


@dataclasses.dataclass
class Trained:
    """A trained method: its evaluation, parameter counts, and a probe for the timing phase."""

    name: str
    eval: dict
    adapter_params: int
    active_params: int
    probe: Callable[[], Probe]  # loads the trained model ready to time (called once, then freed)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Probe:
    model: torch.nn.Module
    step: Callable[[dict], None] | None  # one optimizer step of the method's last stage on a batch
    support: Callable[[dict], float]  # effective support of the routing on a batch


def evaluate(model: torch.nn.Module, data: Data, whole_sequences: bool = False) -> dict:
    """The recipes' evaluation of ``data``'s test set; see `evaluate_examples`."""
    eval_cfg = dataclasses.replace(data.cfg.eval, reuse_prompt_cache=not whole_sequences)
    return evaluate_examples(model, data.formatter, data.test, data.tasks, eval_cfg)


def evaluate_examples(model: torch.nn.Module, formatter, examples: list, tasks, eval_cfg) -> dict:
    """The recipes' evaluation (``evaluate_model``'s summary) plus ``per_example``: the test examples'
    ids ("task/i", the i-th selected example of the task, a fixed order) and their 0/1 correctness,
    so two methods or seeds can be paired example by example."""
    from lomix.recipes.evaluation import predict, select_examples, summarise

    examples = select_examples([e for e in examples if not e.is_text], eval_cfg)
    was_training = model.training
    model.eval()
    try:
        records = predict(model, formatter, examples, tasks, eval_cfg)
    finally:
        model.train(was_training)
    result = summarise(records, eval_cfg)
    seen: dict[str, int] = {}
    ids = []
    for record in records:
        ids.append(f"{record['task']}/{seen.get(record['task'], 0)}")
        seen[record["task"]] = seen.get(record["task"], 0) + 1
    correct = [int(r["prediction"] == r["reference"]) for r in records]
    return result | {"per_example": {"ids": ids, "correct": correct}}


def optimizer_step(model: torch.nn.Module, loss_fn: Callable[[dict], torch.Tensor], lr: float = 1e-3):
    optimizer = torch.optim.AdamW(trainable(model), lr=lr)

    def step(batch: dict) -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        optimizer.step()

    return step


def answer_loss(model: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    import lomix
    from lomix.recipes.finetune import answer_loss_sum, answer_tokens, forward

    def loss(batch: dict) -> torch.Tensor:
        value = answer_loss_sum(*forward(model, batch)) / max(answer_tokens(batch), 1)
        return value + lomix.aux_loss(model) if getattr(model, "lomix_state", None) is not None else value

    return loss


def peft_lora(data: Data, mode: Mode, out: Path) -> Trained:
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model

    rank = mode.k * mode.rank
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)

    def build() -> PeftCausalLM:
        return PeftCausalLM(get_peft_model(base_model(data), config))

    set_seed(data.cfg.seed)
    model = build()
    train_peft(model, data, mode.steps, [{"params": trainable(model), "lr": data.cfg.train.lr}])
    result = evaluate(model, data)
    count = sum(p.numel() for p in trainable(model))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

    def probe() -> Probe:
        fresh = build()
        fresh.load_state_dict(state, strict=False)
        return Probe(fresh, optimizer_step(fresh, answer_loss(fresh)), lambda batch: 1.0)

    return Trained("peft-lora", result, count, count, probe)


def poly_support(model: PeftCausalLM, batch: dict) -> float:
    """Mean over Poly layers and the batch's rows of the effective support of the skill weights."""
    from peft.tuners.poly.layer import Linear as PolyLinear

    from lomix.stats import effective_support

    values = []
    for module in model.modules():
        if isinstance(module, PolyLinear):
            router = module.poly_router["default"]
            router.eval()
            with torch.no_grad():
                weights = router(task_ids=batch["task_ids"], input_ids=batch["input_ids"])  # (B, splits, skills)
            values.append(effective_support(weights.reshape(-1, weights.shape[-1])).mean())
    return float(torch.stack(values).mean())


def peft_poly(data: Data, mode: Mode, out: Path) -> Trained:
    from accelerate.utils import set_seed
    from peft import PolyConfig, get_peft_model

    config = PolyConfig(
        task_type="CAUSAL_LM",
        r=mode.rank,
        target_modules=TARGETS,
        n_tasks=len(mode.tasks),
        n_skills=len(mode.tasks),
        n_splits=1,
    )

    def build() -> PeftCausalLM:
        return PeftCausalLM(get_peft_model(base_model(data), config), task_ids=True)

    set_seed(data.cfg.seed)
    model = build()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    routers = [p for n, p in named if "poly_router" in n]
    a_factors = [p for n, p in named if "poly_lora_A" in n]
    b_factors = [p for n, p in named if "poly_lora_B" in n]
    # PEFT's Poly divides its output by r where every other adapter here scales by alpha/r = 2, i.e.
    # 2r = 16x less. With B starting at zero and Adam (no weight decay), training B at 16x the rate is
    # exactly the same model as scaling it by alpha/r: B' = 16 B keeps every output and A's gradient.
    # The routers train at 0.1, lomix's Poly/MHR default (Ponti et al.).
    lr = data.cfg.train.lr
    groups = [
        {"params": a_factors, "lr": lr},
        {"params": b_factors, "lr": lr * 2 * mode.rank},
        {"params": routers, "lr": 0.1},
    ]
    train_peft(model, data, mode.steps, groups)
    result = evaluate(model, data)
    count = sum(p.numel() for p in trainable(model))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "poly_" in k}

    def probe() -> Probe:
        fresh = build()
        fresh.load_state_dict(state, strict=False)
        return Probe(fresh, optimizer_step(fresh, answer_loss(fresh)), lambda batch: poly_support(fresh, batch))

    # Poly mixes all skills into one rank-r LoRA per task: every skill parameter acts on each token
    notes = [
        f"B factors at {2 * mode.rank}x the rate: the same model as PEFT Poly with the alpha/r = 2 scale of the others"
    ]
    return Trained("peft-poly", result, count, count, probe, notes)


def hard_stage(data: Data, mode: Mode, out: Path) -> tuple[Path, list[str]]:
    """LoRA-Mixer's hard stage (S/2 steps, expert j on task j), shared by LoRA-Mixer and X-LoRA,
    and its experts exported as standalone PEFT adapters (one per task)."""
    from lomix.methods.loramixer.recipe import build_hard, stage_config
    from lomix.recipes import export, finetune

    run = out / "lomix-loramixer"
    if not (run / "hard" / "mixture").is_dir():
        cfg = load(QUICKSTART, overrides(mode, run, mode.steps // 2, *LORAMIXER, "eval.after_training=false"))
        lomix_run(stage_config(cfg, "hard", mode.steps // 2, run / "hard"), lambda c: finetune.run(c, build=build_hard))
    adapters = []
    for task in sorted(mode.tasks):
        folder = out / "peft-experts" / task.replace("/", "_")
        if not (folder / "adapter_config.json").is_file():
            export.run(run / "hard", "peft", folder, task)
        adapters.append(str(folder))
    return run / "hard", adapters


ROUTER_LR = 1.0e-2  # LoRA-Mixer's router and X-LoRA's classifier over frozen experts
LORAMIXER = [
    "router={name: loramixer, k: 2, inference: topk}",
    "mixture.balance.switch=0.0",
    "loramixer.targets=mixture",  # the comparison's seven projections, as for every method
    f"train.router_lr={ROUTER_LR}",  # recipes/configs/loramixer.yaml
]


def lomix_loramixer(data: Data, mode: Mode, out: Path) -> Trained:
    from lomix.methods.loramixer.recipe import run as loramixer_run

    hard, _ = hard_stage(data, mode, out)
    run = out / "lomix-loramixer"
    if finished(run / "soft") is None:
        items = overrides(mode, run, mode.steps - mode.steps // 2, *LORAMIXER, f"loramixer.init_from={hard}")
        lomix_run(load(QUICKSTART, items), loramixer_run)
    return lomix_trained("lomix-loramixer", run / "soft", data, mode, soft_stage=True)


def peft_xlora(data: Data, mode: Mode, out: Path) -> Trained:
    from accelerate.utils import set_seed
    from peft import XLoraConfig, get_peft_model

    _, adapters = hard_stage(data, mode, out)
    # PEFT 0.21.2 loads X-LoRA's adapters under the names "0", "1", ... but activates the dict's keys:
    # any other names fail with KeyError in disable_adapter_layers, so the keys are those indices.
    notes = ["X-LoRA adapters named 0..E-1 (PEFT 0.21.2 KeyError with other names); scoring without KV cache"]

    def build() -> PeftCausalLM:
        model = base_model(data)
        model.config.use_cache = False
        config = XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=model.config.hidden_size,
            adapters={str(i): path for i, path in enumerate(adapters)},
            xlora_depth=1,
            xlora_dropout_p=0.0,  # lomix's routers have no dropout
        )
        return PeftCausalLM(get_peft_model(model, config), cache=False)

    set_seed(data.cfg.seed)
    model = build()
    steps = mode.steps - mode.steps // 2
    # the classifier trains at LoRA-Mixer's router rate (recipes/configs/loramixer.yaml): the same job
    train_peft(model, data, steps, [{"params": trainable(model), "lr": ROUTER_LR}])
    result = evaluate(model, data, whole_sequences=True)
    classifier = sum(p.numel() for p in trainable(model))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "internal_xlora_classifier" in k}

    def probe() -> Probe:
        fresh = build()
        fresh.load_state_dict(state, strict=False)

        def support(batch: dict) -> float:
            from lomix.stats import effective_support

            with torch.no_grad():
                fresh.eval()
                fresh(**model_inputs(batch))
            scalings = fresh.peft_model.get_latest_scalings()  # (B, T, layers, adapters)
            keep = batch["attention_mask"].bool()
            return float(effective_support(scalings[keep].reshape(-1, scalings.shape[-1])).mean())

        return Probe(fresh, optimizer_step(fresh, answer_loss(fresh)), support)

    # dense softmax scalings: every adapter acts on every token
    return Trained("peft-xlora", result, experts + classifier, experts + classifier, probe, notes)


def model_inputs(batch: dict) -> dict:
    from lomix.recipes.runs import model_inputs as inputs

    return inputs(batch)


def lomix_finetune(name: str, router: list[str], data: Data, mode: Mode, out: Path) -> Trained:
    run = out / name
    if finished(run) is None:
        lomix_run(load(QUICKSTART, overrides(mode, run, mode.steps, *router)))
    return lomix_trained(name, run, data, mode)


def split(total: int, parts: int) -> list[int]:
    """``total`` steps over ``parts`` runs, as equal as whole steps allow (each at least 1)."""
    return [max(1, total // parts + (i < total % parts)) for i in range(parts)]


def lomix_glider(data: Data, mode: Mode, out: Path) -> Trained:
    from lomix.methods.glider.config import LibraryConfig
    from lomix.methods.glider.library import Library
    from lomix.methods.glider.recipe import add_run, expert_name
    from lomix.methods.glider.recipe import run as glider_run

    # S/2 expert steps and S/2 gate steps in all, shared out over the tasks (the first get the remainder)
    per_expert = split(mode.steps // 2, len(mode.tasks))
    per_gates = split(mode.steps - mode.steps // 2, len(mode.tasks))
    library = Library.open(out / "glider-library", create=True)
    for task, expert_steps, gate_steps in zip(mode.tasks, per_expert, per_gates, strict=True):
        run = out / "glider-experts" / expert_name(task)
        if not (run / "mixture").is_dir():
            items = overrides(
                mode, run, expert_steps, "mixture.num_experts=1", "eval.after_training=false", tasks=(task,)
            )
            lomix_run(load(EXPERT_CONFIG, items))
        if expert_name(task) not in library.names():
            add_run(library, run, LibraryConfig(gate_steps=gate_steps), batch_size=mode.batch)
    run = out / "lomix-glider"
    if finished(run) is None:
        items = overrides(
            mode, run, 1, f"library.path={library.path}", "router={name: glider, k: 2, alpha: 100.0}"
        )  # held-in tasks: alpha 100 (the paper's)
        cfg = load(ROOT / "recipes" / "configs" / "glider.yaml", items)
        lomix_run(cfg, glider_run)
    trained = lomix_trained("lomix-glider", run, data, mode, trains=False)
    trained.notes.append(
        f"expert steps {per_expert} and gate steps {per_gates} per task (gates: AdamW at 1e-2, constant, their own "
        "sampler, as `lomix library add`); no training after assembly, so no step time"
    )
    return trained


def lomix_trained(
    name: str, run: Path, data: Data, mode: Mode, *, soft_stage: bool = False, trains: bool = True
) -> Trained:
    """A lomix run's evaluation, parameter counts and timing probe."""
    import lomix

    result = finished(run)
    if result is None:
        raise RuntimeError(f"{run} has no eval.json: its recipe did not evaluate")
    model = base_model(data)
    lomix.load(model, run / "mixture")
    adapter, active = lomix_counts(model)
    del model

    def probe() -> Probe:
        from lomix.methods.loramixer.library import freeze_experts
        from lomix.methods.remix.hooks import rloo_loss
        from lomix.stats import RoutingStats

        fresh = base_model(data)
        lomix.load(fresh, run / "mixture", trainable=trains)
        if soft_stage:
            freeze_experts(fresh)
        config = fresh.lomix_state.config
        if config.router.name == "remix":
            samples = load(run / "config.yaml", []).rloo.samples

            def loss(batch: dict) -> torch.Tensor:
                token_sum, surrogate = rloo_loss(fresh, batch, samples)
                return (token_sum + surrogate) / max(int((batch["labels"] != -100).sum()), 1)

        else:
            loss = answer_loss(fresh)

        def support(batch: dict) -> float:
            values = []
            for task in range(len(data.tasks.names)):  # per task: task-level routers mix per task
                rows = (batch["task_ids"] == task).nonzero().flatten().tolist()
                if not rows:
                    continue
                part = {k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in batch.items()}
                fresh.eval()
                with torch.no_grad(), RoutingStats(fresh) as stats:
                    fresh(**model_inputs(part), use_cache=False)
                values += [layer_support(s) for s in stats.summary().values()]
            return sum(values) / len(values)

        return Probe(fresh, optimizer_step(fresh, loss) if trains else None, support)

    return Trained(name, result, adapter, active, probe)


def layer_support(summary: dict) -> float:
    """A layer's effective support: per token for token routers, of the task's mixing row otherwise."""
    from lomix.stats import effective_support

    if "effective_support" in summary:
        return summary["effective_support"]
    mixing = torch.tensor(summary["mean_mixing"])  # (heads, E), one task: the task's own row
    return float(effective_support(mixing).mean())


def lomix_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(adapter parameters, parameters acting on one token): token routers use k of E experts."""
    import lomix

    adapter = active = 0
    for _, layer in lomix.mixture_layers(model):
        experts = sum(p.numel() for p in layer.experts.parameters())
        router = sum(p.numel() for p in layer.router.parameters())
        config = layer.router.config
        k, count = getattr(config, "k", None), model.lomix_state.config.num_experts
        share = 1.0 if config.name in ("poly", "mhr") or not k else min(k, count) / count
        adapter += experts + router
        active += round(experts * share) + router
    return adapter, active


# ----------------------------------------------------------------------------------------------
# Timing and memory


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def step_memory_mib(step: Callable[[], None]) -> float | None:
    """Extra resident memory (MiB) two calls of ``step`` need over what is resident before them:
    freed heap handed back to the system first, then the kernel's high-water mark reset."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        return None
    before = _status_kib("VmRSS")
    step()
    step()
    return (_status_kib("VmHWM") - before) / 1024


def measure(trained: Trained, baseline: Probe, batch: dict, task_batches: list[dict], mode: Mode) -> dict:
    """Support on the test batches of each task, before any step; then the alternating timing
    rounds; then the memory of two more steps (steady state: the first steps of a process allocate
    one-time buffers that would swamp a small batch's figure, so AdamW's state is not included)."""
    from lomix.recipes.finetune import forward

    probe = trained.probe() if trained.name != "peft-lora" else baseline
    support = sum(probe.support(b) for b in task_batches) / len(task_batches)

    def forward_of(model):
        def run() -> None:
            model.eval()
            with torch.no_grad():
                forward(model, batch)

        return run

    name = trained.name if trained.name != "peft-lora" else "peft-lora "
    fwd = ratio_table(
        {"peft-lora": forward_of(baseline.model), name: forward_of(probe.model)},
        "peft-lora",
        rounds=mode.rounds,
        warmup=mode.warmup,
    )[name]
    step = memory = None
    if probe.step is not None:
        step = ratio_table(
            {"peft-lora": lambda: baseline.step(batch), name: lambda: probe.step(batch)},
            "peft-lora",
            rounds=mode.rounds,
            warmup=mode.warmup,
        )[name]
        memory = step_memory_mib(lambda: probe.step(batch))
    forward_memory = step_memory_mib(forward_of(probe.model))
    return {
        "forward": fwd,
        "step": step,
        "step_memory_mib": memory,
        "forward_memory_mib": forward_memory,
        "support": support,
    }


# ----------------------------------------------------------------------------------------------
# Report


def markdown(results: dict) -> str:
    rows = results["methods"]
    tasks = sorted(results["base"]["tasks"])
    short = {t: t.split("/")[0].split("_")[0] for t in tasks}

    def ratio(entry):
        return "—" if entry is None else f"{entry['median']:.2f} ({entry['p25']:.2f}-{entry['p75']:.2f})"

    def mib(value):
        return "—" if value is None else f"{value:.0f}"

    header = [
        "method",
        "mean acc",
        *[short[t] for t in tasks],
        "adapter params",
        "active params",
        "step time / LoRA",
        "forward / LoRA",
        "step memory MiB",
        "routing support",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results["base"]
    lines.append(
        "| base model (frozen) | "
        + " | ".join([f"{base['mean']['score']:.3f}", *[f"{base['tasks'][t]['score']:.3f}" for t in tasks]])
        + " | 0 | 0 | | | | |"
    )
    for name, row in rows.items():
        ev, m = row["eval"], row["measure"]
        cells = [
            f"**{ev['mean']['score']:.3f}**",
            *[f"{ev['tasks'][t]['score']:.3f}" for t in tasks],
            f"{row['adapter_params'] / 1e6:.2f}M",
            f"{row['active_params'] / 1e6:.2f}M",
            ratio(m["step"]),
            ratio(m["forward"]),
            mib(m["step_memory_mib"]),
            f"{m['support']:.2f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    settings = results["settings"]
    n = base["tasks"][tasks[0]]["n"]
    lines += [
        "",
        f"{settings['steps']} optimizer steps of {settings['batch']} examples per method, {n} test examples per task "
        f"(one example = {100 / n:.1f} points of a task, {100 / (n * len(tasks)):.1f} of the mean), seed "
        f"{settings['seed']}. Step time, forward time: median ratio to PEFT LoRA (IQR) over {settings['rounds']} "
        "alternating rounds on one training batch. Step memory: extra peak resident memory of two training "
        "steps after the timing rounds (AdamW state not included). Routing support: on each task's first "
        "test examples.",
    ]
    notes = [f"{name}: {note}" for name, row in rows.items() for note in row["notes"]]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, row in results["methods"].items():  # a legend, not labels: equal scores would overlap
        timing = row["measure"]["step"] or row["measure"]["forward"]
        x, y = timing["median"], row["eval"]["mean"]["score"]
        marker = "s" if name.startswith("peft") else "o"
        axes.errorbar([x], [y], xerr=[[x - timing["p25"]], [timing["p75"] - x]], fmt=marker, ms=7, capsize=3,
                      label=name + (" (forward)" if row["measure"]["step"] is None else ""))  # fmt: skip
    axes.axhline(results["base"]["mean"]["score"], color="grey", linestyle=":", linewidth=1, label="base model")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    axes.set_xlabel("training-step time / PEFT LoRA (median, IQR)")
    axes.set_ylabel("mean test accuracy")
    axes.set_title(f"SmolLM2-135M, {len(results['base']['tasks'])} BIG-bench tasks ({results['mode']} mode, CPU)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 tasks, 16 steps of 4 (< 20 min on 2 CPU cores)")
    parser.add_argument("--smoke", action="store_true", help="every code path in minutes (numbers mean nothing)")
    parser.add_argument("--out", default=None, help="run folders (default runs/compare-<mode>); reruns reuse them")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON, markdown and PNG")
    parser.add_argument("--redraw", metavar="JSON", help="only rewrite the markdown and PNG of a finished run's JSON")
    args = parser.parse_args(argv)
    if args.redraw:
        results = json.loads(Path(args.redraw).read_text())
        write_report(results, Path(args.redraw).parent)
        return results
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    out = Path(args.out or f"runs/compare-{name}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))))
    started = time.perf_counter()

    data = prepare_data(load(QUICKSTART, overrides(mode, out / "data", mode.steps)))
    builders = {
        "peft-lora": peft_lora,
        "peft-poly": peft_poly,
        "peft-xlora": peft_xlora,
        "lomix-topk": lambda d, m, o: lomix_finetune("lomix-topk", ["router={name: topk, k: 2}"], d, m, o),
        "lomix-mhr": lambda d, m, o: lomix_finetune("lomix-mhr", ["router={name: mhr, n_heads: 8}"], d, m, o),
        "lomix-remix": lambda d, m, o: lomix_finetune(
            "lomix-remix", ["router={name: remix, k: 2}", "mixture.balance.switch=0.0", "rloo.samples=4"], d, m, o
        ),
        "lomix-loramixer": lomix_loramixer,
        "lomix-glider": lomix_glider,
    }
    print(f"compare ({name}): {len(data.features)} training examples in {len(mode.tasks)} tasks", flush=True)
    base = evaluate(base_model(data), data)
    methods = ["peft-lora", *[m for m in args.methods if m != "peft-lora"]]  # the baseline of every ratio
    trained: dict[str, Trained] = {}
    for method in methods:
        start = time.perf_counter()
        trained[method] = builders[method](data, mode, out)
        score = trained[method].eval["mean"]["score"]
        print(f"[{method}] mean accuracy {score:.3f}, {time.perf_counter() - start:.0f} s", flush=True)

    batch = next(loader(data, 1))
    task_batches = test_batches(data, mode.batch)
    baseline = trained["peft-lora"].probe()
    rows = {}
    for method, item in trained.items():
        start = time.perf_counter()
        measured = measure(item, baseline, batch, task_batches, mode)
        rows[method] = {
            "eval": item.eval,
            "adapter_params": item.adapter_params,
            "active_params": item.active_params,
            "measure": measured,
            "notes": item.notes,
        }
        gc.collect()
        print(f"[{method}] measured in {time.perf_counter() - start:.0f} s: {json.dumps(measured)}", flush=True)

    results = {
        "mode": name,
        "settings": dataclasses.asdict(mode) | {"seed": data.cfg.seed, "lr": data.cfg.train.lr},
        "machine": machine() | {"load_average_end": os.getloadavg()},
        "minutes": (time.perf_counter() - started) / 60,
        "command": "python benchmarks/compare.py" + ("" if name == "full" else f" --{name}"),
        "base": base,
        "methods": rows,
    }
    folder = Path(args.results)
    write_json(folder / f"compare_{name}_cpu.json", results)
    print(write_report(results, folder), flush=True)
    print(f"compare: {results['minutes']:.1f} min; wrote {folder}/compare_{name}_cpu.{{json,md,png}}", flush=True)
    return results


def write_report(results: dict, folder: Path) -> str:
    """compare_<mode>_cpu.md and .png beside the JSON; returns the table."""
    name, table = results["mode"], markdown(results)
    (folder / f"compare_{name}_cpu.md").write_text(
        f"# lomix vs PEFT ({name} mode)\n\n`{results['command']}` — {results['minutes']:.1f} min on "
        f"{results['machine']['processor']}, {results['machine']['threads']} threads, torch "
        f"{results['machine']['torch']}, {results['machine']['date']}\n\n{table}\n"
    )
    chart(results, folder / f"compare_{name}_cpu.png")
    return table


if __name__ == "__main__":
    main()
