"""Evaluate a base model or a trained mixture: accuracy and exact match per task, and their mean.

    lomix eval RUN_DIR [key=value ...]            # the run's final mixture on its test data
    python -m lomix.recipes.evaluation RUN_DIR    # the same, without the CLI

Multiple-choice examples are scored by the summed log-likelihood of each choice's answer tokens
(the answer text plus the chat template's end-of-turn marker, exactly what training optimises);
the prediction is the best-scored choice. With ``eval.reuse_prompt_cache`` the prompt runs once and
every choice continues from its KV cache. Generative examples are decoded greedily and compared by
exact match. Metrics come from the ``evaluate`` library through metric modules lomix ships (it
cannot fetch hub metrics offline); a bare metric name that lomix does not ship still goes to the hub.

Besides each task's score the table shows two baselines: chance (1 / number of choices) and the
majority-class prior (the share of the task's test examples whose answer is its most common one).
(This file is not named evaluate.py: a copy run as a script would shadow the evaluate library.)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import lomix
from lomix.atomic import atomic_file
from lomix.errors import ConfigError
from lomix.recipes.assets import cpu_processes, load_model_and_tokenizer
from lomix.recipes.config import EvalConfig, FinetuneConfig, load_config
from lomix.recipes.data import Example, Formatter, TaskSet, check_test_tasks, load_test_examples

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def shipped_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def resolve_metric(name: str) -> str:
    """What ``evaluate.load`` is given: the absolute folder of a metric lomix ships (``accuracy``), an
    absolute metric folder path, or a bare name left for evaluate to fetch from the hub (online)."""
    if "/" not in name and (METRICS_DIR / name / f"{name}.py").is_file():
        return str(METRICS_DIR / name)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


def load_metric(name: str, key: str):
    import evaluate

    resolved = resolve_metric(name)
    try:
        return evaluate.load(resolved)
    except Exception as exc:
        hint = "" if Path(resolved).is_absolute() else "; a bare name is fetched from the hub and needs the network"
        raise ConfigError(
            key,
            f"cannot load metric {name!r} ({type(exc).__name__}: {exc}); lomix ships: "
            f"{', '.join(shipped_metrics())}{hint}",
        ) from None


def _routing(model: torch.nn.Module, task_id: int, description: str):
    if getattr(model, "lomix_state", None) is None:
        return contextlib.nullcontext()
    return lomix.routing_context(model, task_ids=[task_id], task_descriptions=[description])


def whole_sequences(model: torch.nn.Module) -> bool:
    """True when a router of the model routes on whole sequences (`needs_whole_sequences`): a
    KV-cached continuation would route its new tokens alone, so such models score and generate
    without a cache."""
    return any(layer.router.config.needs_whole_sequences for _, layer in lomix.mixture_layers(model))


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers 5.24 renamed past_key_values to cache; accept both generations of the API.
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def rows_selectable(cache) -> bool:
    """True when ``cache`` can gather its rows (``batch_select_indices``), every layer of it included:
    transformers' recurrent-state layers (Mamba's) lack it."""
    layers = getattr(cache, "layers", None) or []
    return hasattr(cache, "batch_select_indices") and all(hasattr(layer, "batch_select_indices") for layer in layers)


@torch.no_grad()
def score_batch(
    model: torch.nn.Module,
    formatter: Formatter,
    items: Sequence[tuple[Example, int, str]],
    reuse_prompt_cache: bool = True,
) -> list[list[float]]:
    """Summed log-likelihood of every choice's answer tokens, for (example, task id, description) items.

    With ``reuse_prompt_cache`` the prompts run once, left-padded in one batch, and every choice
    continues from its prompt's KV cache (gathered per choice); otherwise each choice is a full
    sequence. Both give the same scores as scoring each choice alone.
    """
    device = next(model.parameters()).device
    pad = formatter.tokenizer.pad_token_id
    prompts, answers, owner = [], [], []
    for index, (example, _, _) in enumerate(items):
        encoded = [formatter.encode(example, choice) for choice in example.choices]
        prompt = min((p for p, _ in encoded), key=len)  # the prompt cut to fit the longest answer
        prompts.append(prompt)
        answers += [a[: formatter.cfg.max_length - len(prompt)] for _, a in encoded]
        owner += [index] * len(encoded)
    rows = torch.tensor(owner, device=device)
    width = max(len(a) for a in answers)
    answer_ids = torch.full((len(answers), width), pad, dtype=torch.long, device=device)
    answer_mask = torch.zeros_like(answer_ids)
    for row, ids in enumerate(answers):
        answer_ids[row, : len(ids)] = torch.tensor(ids)
        answer_mask[row, : len(ids)] = 1
    task_ids = torch.tensor([task_id for _, task_id, _ in items], device=device)
    descriptions = [description for _, _, description in items]
    choice_routing = {"task_ids": task_ids[rows], "task_descriptions": [descriptions[i] for i in owner]}
    if reuse_prompt_cache:
        length = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(prompts), length), pad, dtype=torch.long, device=device)
        prompt_mask = torch.zeros_like(prompt_ids)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends at the same column
            prompt_ids[row, length - len(ids) :] = torch.tensor(ids)
            prompt_mask[row, length - len(ids) :] = 1
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
            task_ids=task_ids,
            task_descriptions=descriptions,
        )
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        if not rows_selectable(cache):  # a state-space (Mamba) cache cannot be copied per choice
            return score_batch(model, formatter, items, reuse_prompt_cache=False)
        cache.batch_select_indices(rows)  # one copy of its prompt's cache per choice
        lengths = prompt_mask.sum(-1)[rows]
        rest = model(
            input_ids=answer_ids,
            attention_mask=torch.cat([prompt_mask[rows], answer_mask], dim=1),
            position_ids=lengths[:, None] + torch.arange(width, device=device),
            use_cache=True,
            **{_cache_kwarg(model): cache},
            **choice_routing,
        )
        logits = torch.cat([out.logits[rows, -1:], rest.logits[:, :-1]], dim=1)
    else:
        sequences = [prompts[i] + answers[row] for row, i in enumerate(owner)]
        ids = torch.full((len(sequences), max(map(len, sequences))), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        all_logits = model(input_ids=ids, attention_mask=mask, **choice_routing).logits
        starts = torch.tensor([len(prompts[i]) - 1 for i in owner], device=device)
        take = (starts[:, None] + torch.arange(width, device=device)).clamp(max=ids.shape[1] - 1)
        logits = all_logits.gather(1, take[..., None].expand(-1, -1, all_logits.shape[-1]))
    logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
    totals = (logprobs * answer_mask).sum(dim=1).tolist()
    scores: list[list[float]] = [[] for _ in items]
    for row, index in enumerate(owner):
        scores[index].append(totals[row])
    return scores


def score_choices(
    model: torch.nn.Module,
    formatter: Formatter,
    example: Example,
    task_id: int,
    description: str,
    reuse_prompt_cache: bool = True,
) -> list[float]:
    """Summed log-likelihood of each choice's answer tokens given the prompt (one example)."""
    return score_batch(model, formatter, [(example, task_id, description)], reuse_prompt_cache)[0]


@torch.no_grad()
def generate_answer(
    model: torch.nn.Module,
    formatter: Formatter,
    example: Example,
    task_id: int,
    description: str,
    max_new_tokens: int,
    cfg: EvalConfig | None = None,
) -> str:
    tok = formatter.tokenizer
    prompt, _ = formatter.encode(example, None)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    stop = [t for t in {tok.eos_token_id, tok.pad_token_id} if t is not None]
    settings = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "use_cache": not whole_sequences(model),
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": stop or None,
    }
    with _routing(model, task_id, description):
        if rerouting(model, cfg):
            out = lomix.reroute.generate(
                model, ids, steps=cfg.reroute_steps, lr=cfg.reroute_lr, every=cfg.reroute_every, **settings
            )
        else:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def rerouting(model: torch.nn.Module, cfg: EvalConfig | None) -> bool:
    """True when ``cfg`` asks for test-time rerouting and the model holds a mixture to reroute."""
    return cfg is not None and cfg.reroute_steps > 0 and getattr(model, "lomix_state", None) is not None


def score_rerouted(
    model: torch.nn.Module, formatter: Formatter, item: tuple[Example, int, str], cfg: EvalConfig, reuse_cache: bool
) -> list[float]:
    """The choices' scores of one example with router-logit offsets fitted to its prompt (`lomix.reroute`)."""
    example, task_id, description = item
    prompt, _ = formatter.encode(example, None)
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    routing = {"task_ids": torch.tensor([task_id], device=ids.device), "task_descriptions": [description]}
    with lomix.reroute.rerouted(model, ids, steps=cfg.reroute_steps, lr=cfg.reroute_lr, **routing):
        return score_batch(model, formatter, [item], reuse_cache)[0]


def select_examples(examples: Sequence[Example], cfg: EvalConfig) -> list[Example]:
    """The first ``max_examples_per_task`` test examples of each task, in file order."""
    counts: Counter[str] = Counter()
    chosen = []
    for example in examples:
        if cfg.max_examples_per_task is None or counts[example.task] < cfg.max_examples_per_task:
            counts[example.task] += 1
            chosen.append(example)
    return chosen


def predict(
    model: torch.nn.Module, formatter: Formatter, examples: Sequence[Example], tasks: TaskSet, cfg: EvalConfig, bar=None
) -> list[dict[str, Any]]:
    """One record per example (in order): task, kind, prediction and reference."""
    records: list[dict[str, Any] | None] = [None] * len(examples)
    choice = [i for i, e in enumerate(examples) if e.is_multiple_choice]
    reuse_cache = cfg.reuse_prompt_cache and not whole_sequences(model)
    for start in range(0, len(choice), cfg.batch_size):
        batch = choice[start : start + cfg.batch_size]
        items = [(examples[i], tasks.id(examples[i].task), tasks.descriptions[examples[i].task]) for i in batch]
        if rerouting(model, cfg):  # offsets are fitted per prompt: one example at a time
            batch_scores = [score_rerouted(model, formatter, item, cfg, reuse_cache) for item in items]
        else:
            batch_scores = score_batch(model, formatter, items, reuse_cache)
        for i, scores in zip(batch, batch_scores, strict=True):
            example = examples[i]
            records[i] = {
                "task": example.task,
                "kind": "choice",
                "prediction": max(range(len(scores)), key=scores.__getitem__),
                "reference": example.label,
                "answer": example.target,
                "num_choices": len(example.choices),
            }
        if bar is not None:
            bar.update(len(batch))
    for i, example in enumerate(examples):
        if example.is_multiple_choice:
            continue
        task_id, description = tasks.id(example.task), tasks.descriptions[example.task]
        text = generate_answer(model, formatter, example, task_id, description, cfg.max_new_tokens, cfg)
        records[i] = {"task": example.task, "kind": "generate", "prediction": text, "reference": example.target.strip()}
        if bar is not None:
            bar.update(1)
    return records


def summarise(records: Sequence[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """Per-task metric (through the evaluate modules), chance, majority-class prior, and their means."""
    metrics: dict[str, Any] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for task in sorted({r["task"] for r in records}):
        rows = [r for r in records if r["task"] == task]
        kind = rows[0]["kind"]
        if any(r["kind"] != kind for r in rows):
            raise ValueError(f"task {task!r} mixes multiple-choice and generative examples; split it into two tasks")
        if kind == "choice":
            name, key = "accuracy", ("eval.accuracy_metric", cfg.accuracy_metric)
            answers = [r["answer"] for r in rows]
            chance = sum(1.0 / r["num_choices"] for r in rows) / len(rows)
        else:
            name, key = "exact_match", ("eval.exact_match_metric", cfg.exact_match_metric)
            answers = [r["reference"] for r in rows]
            chance = None
        if key not in metrics:
            metrics[key] = load_metric(key[1], key[0])
        result = metrics[key].compute(
            predictions=[r["prediction"] for r in rows], references=[r["reference"] for r in rows]
        )
        score = float(next(iter(result.values())))
        majority = Counter(answers).most_common(1)[0][1] / len(rows)
        tasks[task] = {"metric": name, "score": score, "n": len(rows), "chance": chance, "majority": majority}
    mean = {
        "score": sum(t["score"] for t in tasks.values()) / len(tasks) if tasks else 0.0,
        "majority": sum(t["majority"] for t in tasks.values()) / len(tasks) if tasks else 0.0,
        "n": sum(t["n"] for t in tasks.values()),
    }
    chances = [t["chance"] for t in tasks.values() if t["chance"] is not None]
    mean["chance"] = sum(chances) / len(chances) if len(chances) == len(tasks) and tasks else None
    return {"tasks": tasks, "mean": mean}


def evaluate_model(
    model: torch.nn.Module,
    formatter: Formatter,
    examples: Sequence[Example],
    tasks: TaskSet,
    cfg: EvalConfig,
    accelerator=None,
    progress: bool = True,
    label: str = "eval",
) -> dict[str, Any]:
    """Evaluate ``examples`` (shared out across processes when an accelerator is given)."""
    from tqdm.auto import tqdm

    examples = select_examples(examples, cfg)
    was_training = model.training
    model.eval()
    main = accelerator is None or accelerator.is_main_process
    try:
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            with accelerator.split_between_processes(list(range(len(examples)))) as mine:
                bar = tqdm(total=len(mine), desc=label, disable=not (progress and main), dynamic_ncols=True)
                part = predict(model, formatter, [examples[i] for i in mine], tasks, cfg, bar)
                bar.close()
            records = gather_object(part)
        else:
            bar = tqdm(total=len(examples), desc=label, disable=not progress, dynamic_ncols=True)
            records = predict(model, formatter, examples, tasks, cfg, bar)
            bar.close()
    finally:
        model.train(was_training)
    return summarise(records, cfg)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per task plus the mean, one score column per named result."""
    first = next(iter(columns.values()))
    names = list(columns)
    header = ["task", "metric", "n", "chance", "majority", *names]
    if len(names) == 2:
        header.append("change")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label: str, info: dict[str, Any], scores: list[float], metric: str) -> str:
        cells = [label, metric, str(info["n"]), _fmt(info["chance"]), _fmt(info["majority"]), *map(_fmt, scores)]
        if len(scores) == 2:
            cells.append(f"{scores[1] - scores[0]:+.3f}")
        return "| " + " | ".join(cells) + " |"

    for task, info in first["tasks"].items():
        lines.append(row(task, info, [c["tasks"][task]["score"] for c in columns.values()], info["metric"]))
    lines.append(row("**mean**", first["mean"], [c["mean"]["score"] for c in columns.values()], ""))
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_file(path) as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")


# A run folder's results: the mixture's, and the base model's (mixture off). Runs written before the
# names were unified hold the base model's training-time result as eval_before.json: still read.
RESULTS = "eval.json"
BASE_RESULTS = ("eval_base.json", "eval_before.json")


def base_results(run_dir: str | Path) -> Path | None:
    """The base model's result file of a run folder (either name), or None."""
    return next((Path(run_dir) / n for n in BASE_RESULTS if (Path(run_dir) / n).is_file()), None)


def results_path(run_dir: Path, base: bool, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Where a new evaluation goes without losing an earlier one: ``out`` when given (an existing
    file only with ``overwrite``); else eval.json / eval_base.json, or the first free eval-N.json /
    eval_base-N.json when that exists (``overwrite``: the plain name, replaced)."""
    if out is not None:
        path = Path(out)
        if path.exists() and not overwrite:
            raise ConfigError("--out", f"{path} exists; pass --overwrite to replace it, or choose another file")
        return path
    stem = Path(BASE_RESULTS[0] if base else RESULTS).stem
    path, number = run_dir / f"{stem}.json", 2
    while path.exists() and not overwrite:
        path, number = run_dir / f"{stem}-{number}.json", number + 1
    return path


def run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    base: bool = False,
    checkpoint: str | Path | None = None,
    task_descriptions: Sequence[str] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate a finished (or checkpointed) run on its test data; writes RUN_DIR/eval*.json.

    An earlier result is never replaced unless ``overwrite`` (`results_path`): a second evaluation
    of the mixture writes eval-2.json, of the base model eval_base-2.json, or ``out``.

    ``task_descriptions`` ("TEXT" for every test task, or "TASK=TEXT") replace the routers' task
    descriptions; a described test task the run never trained on is evaluated as a held-out task
    (routers that route by task description need nothing else).
    """
    from accelerate import Accelerator

    from lomix.recipes.runs import resolve_run_dir

    run_dir = resolve_run_dir(run_dir)  # RUN or RUN/mixture
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(str(run_dir), "not a lomix run folder (it has no config.yaml)")
    cfg = load_config(config_path, overrides)
    tasks_path = run_dir / "tasks.json"
    if not tasks_path.is_file():
        raise ConfigError(str(run_dir), "has no tasks.json; was its training started?")
    tasks = TaskSet.from_dict(json.loads(tasks_path.read_text()))
    mixture_dir = Path(checkpoint) / "mixture" if checkpoint else run_dir / "mixture"
    if not base and not (mixture_dir / lomix.CONFIG_NAME).is_file():
        raise ConfigError(str(mixture_dir), "holds no saved mixture (did training finish? pass --checkpoint DIR)")
    path = results_path(run_dir, base, out, overwrite)  # before the work: a taken --out fails now
    accelerator = Accelerator(cpu=cpu_processes())
    with accelerator.main_process_first():
        test = [e for e in load_test_examples(cfg.data) if not e.is_text]  # raw text has no answer to score
        if not test:
            raise ConfigError("data.test", "holds raw text only: nothing to score (train.eval_every logs its loss)")
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    tasks = describe_tasks(tasks, task_descriptions, sorted({e.task for e in test}))
    check_test_tasks(set(tasks.names), test)
    if not base:
        lomix.load(model, mixture_dir)
        tasks = mixture_task_set(model, tasks)  # a task router's saved names decide the task ids
        set_eval_router(model, cfg)  # router fields of the run's config that apply at evaluation
    model.to(accelerator.device)
    results = evaluate_model(
        model, Formatter(tokenizer, cfg.data), test, tasks, cfg.eval, accelerator, cfg.train.progress, "eval"
    )
    if accelerator.is_main_process:
        write_json(path, results)
        print(results_table({"base" if base else "mixture": results}))
        print(f"wrote {path}")
    return results


def mixture_task_set(model: torch.nn.Module, tasks: TaskSet) -> TaskSet:
    """Task ids for evaluating a loaded mixture: its task router's rows when it names them
    (`RouterConfig.task_rows`)."""
    state = getattr(model, "lomix_state", None)
    names = state.config.router.task_rows if state is not None else []
    if not names:
        return tasks
    return TaskSet(list(names), {n: tasks.descriptions.get(n, n) for n in names})


def set_eval_router(model: torch.nn.Module, cfg: FinetuneConfig) -> None:
    """The run config's router fields that apply at evaluation (`RouterConfig.evaluation_changes`)."""
    state = getattr(model, "lomix_state", None)
    if state is None:
        return
    changes = cfg.mixture.router.evaluation_changes(state.config.router, state.config.num_experts)
    if changes:
        lomix.update_router(model, **changes)


def describe_tasks(tasks: TaskSet, given: Sequence[str], test_tasks: Sequence[str]) -> TaskSet:
    """``tasks`` with the descriptions ``given`` as "TEXT" (every test task) or "TASK=TEXT"; a test task
    the run does not know joins the task set (a held-out task) when it is described."""
    if not given:
        return tasks
    names, descriptions = list(tasks.names), dict(tasks.descriptions)
    for item in given:
        task, sep, text = item.partition("=")
        targets = [task.strip()] if sep and task.strip() in test_tasks else list(test_tasks)
        text = text if sep and task.strip() in test_tasks else item
        if not text.strip():
            raise ConfigError("--task-description", f"{item!r} gives an empty description")
        for name in targets:
            descriptions[name] = text.strip()
            if name not in names:
                names.append(name)
    return TaskSet(names, descriptions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder written by the finetune recipe")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.max_examples_per_task=20")
    parser.add_argument("--base", action="store_true", help="evaluate the base model without the mixture")
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint's mixture instead")
    parser.add_argument(
        "--task-description", action="append", default=[], help="TEXT or TASK=TEXT (held-out tasks); repeatable"
    )
    parser.add_argument("--out", "-o", default=None, help="the result file; default: the next free eval[-N].json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing result instead of numbering")
    args = parser.parse_args(argv)
    run(
        args.run_dir,
        args.overrides,
        base=args.base,
        checkpoint=args.checkpoint,
        task_descriptions=args.task_description,
        out=args.out,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
