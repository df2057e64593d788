"""A finished run folder, loaded for the tools that work on a trained mixture (inspect, merge, export).

A run folder (written by `lomix train`, or by `lomix merge`) holds ``config.yaml``, ``tasks.json``
and ``mixture/``. `load_run` gives back the base model with the mixture loaded, its tokenizer, the
prompt formatter and the task list; `run_examples` and `batches` turn the run's data (or another
file) into the same batches training used, with task ids and descriptions for the routers.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lomix
from lomix.errors import ConfigError
from lomix.recipes.config import FinetuneConfig, load_config
from lomix.recipes.data import Collator, Example, Formatter, TaskSet, tokenize

RUN_FILES = ("config.yaml", "tasks.json")


@dataclass
class LoadedRun:
    directory: Path
    cfg: FinetuneConfig
    tasks: TaskSet
    model: Any
    tokenizer: Any
    formatter: Formatter


def resolve_run_dir(path: str | Path) -> Path:
    """The run folder ``path`` names: itself, or the run that holds it when it is the run's mixture/
    folder (every verb takes RUN or RUN/mixture)."""
    path = Path(path)
    if not (path / "config.yaml").is_file() and (path / lomix.CONFIG_NAME).is_file():
        if all((path.parent / name).is_file() for name in RUN_FILES):
            return path.parent
    return path


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` (or the run holding it, `resolve_run_dir`) if it holds config.yaml, tasks.json and
    a saved mixture; else an error naming what is missing."""
    run_dir = resolve_run_dir(run_dir)
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise ConfigError(str(run_dir), f"not a lomix run folder: it has no {name} (written by `lomix train`)")
    if not (run_dir / "mixture" / lomix.CONFIG_NAME).is_file():
        raise ConfigError(str(run_dir / "mixture"), "holds no saved mixture; did training finish?")
    return run_dir


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> LoadedRun:
    """The run's base model with its mixture loaded (frozen, eval mode), tokenizer, formatter and tasks."""
    from lomix.recipes.assets import load_model_and_tokenizer

    run_dir = check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    tasks = TaskSet.from_dict(json.loads((run_dir / "tasks.json").read_text()))
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    lomix.load(model, run_dir / "mixture")
    return LoadedRun(run_dir, cfg, tasks, model.eval(), tokenizer, Formatter(tokenizer, cfg.data))


def run_examples(run: LoadedRun, data: str = "train", per_task: int | None = None) -> list[Example]:
    """The first ``per_task`` examples of each task of ``data``: ``train``, ``test`` (the run's own
    splits) or a data file in the run's column format. Its tasks must be the run's tasks."""
    from lomix.recipes.data import check_test_tasks, load_examples, load_test_examples, normalise_rows, read_rows

    if data == "train":
        examples = load_examples(run.cfg.data)[0]
    elif data == "test":
        examples = load_test_examples(run.cfg.data)
    else:
        if not Path(data).is_file():
            raise ConfigError("--data", f"expected 'train', 'test' or a data file, got {data!r} (no such file)")
        examples = normalise_rows(read_rows(data, run.cfg.data, "--data", "train"), run.cfg.data, "--data", data)
    check_test_tasks(set(run.tasks.names), examples)
    counts: Counter[str] = Counter()
    chosen = []
    for example in examples:
        if per_task is None or counts[example.task] < per_task:
            counts[example.task] += 1
            chosen.append(example)
    return chosen


def batches(run: LoadedRun, examples: Sequence[Example], batch_size: int) -> Iterator[dict[str, Any]]:
    """Training-format batches (prompt + answer, left-padded, with task ids and descriptions)."""
    features = tokenize(examples, run.formatter, run.tasks)
    collate = Collator(run.tokenizer.pad_token_id)
    device = next(run.model.parameters()).device
    for start in range(0, len(features), batch_size):
        batch = collate(features[start : start + batch_size])
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the wrapped model's forward (labels left out)."""
    keys = ("input_ids", "attention_mask", "position_ids", "task_ids", "task_descriptions")
    return {k: batch[k] for k in keys}


def copy_run_files(source: Path, target: Path) -> None:
    """config.yaml and tasks.json of a run into another folder (a merged run, an export)."""
    for name in RUN_FILES:
        shutil.copyfile(source / name, target / name)


__all__ = [
    "LoadedRun",
    "batches",
    "check_run_dir",
    "copy_run_files",
    "load_run",
    "model_inputs",
    "resolve_run_dir",
    "run_examples",
]
