"""Data for the recipes: load, validate, normalise, tokenise and batch.

Every source (a local JSON/JSONL/CSV/TSV file, a hub dataset, or the BIG-bench builder) becomes a
list of `Example` (task, input, choices, label, target). Errors name the config key, the file and
the row. Training batches carry ``task_ids`` and ``task_descriptions``, which the wrapped model's
forward turns into the `RoutingContext` that every router sees.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lomix.errors import LomixError
from lomix.recipes.config import LOCAL_DATA_SUFFIXES, DataConfig

IGNORE_INDEX = -100


class DataError(LomixError, ValueError):
    """The data does not fit the config (missing column, empty file, bad label, unknown task)."""


@dataclass
class Example:
    """One normalised example. Multiple choice: ``choices`` and ``label`` (``target`` is the right
    choice); generative: ``target`` only."""

    task: str
    input: str
    choices: list[str] | None = None
    label: int | None = None
    target: str | None = None
    description: str = ""

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None


# ----------------------------------------------------------------------------------------------
# Reading


def _is_local(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_DATA_SUFFIXES or Path(source).is_file()


def read_rows(source: str, cfg: DataConfig, key: str, split: str) -> list[dict[str, Any]]:
    """Rows of a local file or a hub dataset split, as plain dicts (via the datasets library)."""
    import datasets

    datasets.disable_progress_bars()
    if _is_local(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{key}: no such file: {source}")
        if not path.read_text(errors="replace").strip():
            raise DataError(f"{key}: {source} is empty; it holds no examples")
        suffix = path.suffix.lower()
        builder = {".csv": "csv", ".tsv": "csv"}.get(suffix, "json")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for malformed files
            raise DataError(f"{key}: cannot read {source} as {builder.upper()} ({type(exc).__name__}: {exc})") from None
    else:
        try:
            ds = datasets.load_dataset(source, cfg.subset, split=split)
        except Exception as exc:
            raise DataError(
                f"{key}: cannot load hub dataset {source!r} (split {split!r}): {type(exc).__name__}: {exc}"
            ) from None
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{key}: {source} holds no examples")
    return rows


def _choices(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: choices must be a list (a JSON list in CSV), got {value!r}") from None
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
        raise DataError(f"{where}: choices must be a list of at least two strings, got {value!r}")
    return value


def normalise_rows(rows: list[dict[str, Any]], cfg: DataConfig, key: str, source: str) -> list[Example]:
    """Map columns to `Example` fields, checking every row."""
    cols = cfg.columns
    present = set(rows[0])
    if cols.input not in present:
        raise DataError(
            f"{key}: {source} has no column {cols.input!r} (data.columns.input); its columns are: "
            f"{', '.join(sorted(present))}"
        )
    has_choices, has_label, has_target = cols.choices in present, cols.label in present, cols.target in present
    if has_choices and not has_label:
        raise DataError(
            f"{key}: {source} has a {cols.choices!r} column but no column {cols.label!r} (data.columns.label) "
            f"with the index of the right choice; its columns are: {', '.join(sorted(present))}"
        )
    if not has_choices and not has_target:
        raise DataError(
            f"{key}: {source} has neither a {cols.choices!r} + {cols.label!r} pair (data.columns.choices, "
            f"data.columns.label) nor a {cols.target!r} column (data.columns.target); its columns are: "
            f"{', '.join(sorted(present))}"
        )
    examples = []
    for number, row in enumerate(rows, start=1):
        where = f"{key}: {source} row {number}"
        text = row.get(cols.input)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: {cols.input!r} must be non-empty text, got {text!r}")
        task = row.get(cols.task) if cols.task in present else None
        task = str(task) if task not in (None, "") else cfg.task
        description = row.get(cols.description) if cols.description in present else None
        example = Example(task=task, input=text, description=str(description or ""))
        raw_choices = row.get(cols.choices) if has_choices else None
        if raw_choices is not None:
            choices = _choices(raw_choices, where)
            label = row.get(cols.label)
            if isinstance(label, str) and label in choices:
                label = choices.index(label)
            elif isinstance(label, str) and label.strip().lstrip("-").isdigit():
                label = int(label)
            if not isinstance(label, int) or isinstance(label, bool):
                raise DataError(f"{where}: label must be the index of the right choice, got {label!r}")
            if not 0 <= label < len(choices):
                raise DataError(
                    f"{where}: label {label} is out of range for {len(choices)} choices "
                    f"(valid: 0..{len(choices) - 1}; data.columns.label={cols.label!r})"
                )
            example.choices, example.label, example.target = choices, label, choices[label]
        else:
            target = row.get(cols.target) if has_target else None
            if not isinstance(target, str) or not target.strip():
                raise DataError(
                    f"{where}: no choices and no target; a row needs {cols.choices!r} + {cols.label!r} or a "
                    f"non-empty {cols.target!r}"
                )
            example.target = target
        examples.append(example)
    return examples


@dataclass
class TaskSet:
    """The training tasks in a fixed order: a task's id is its index (the router's task id)."""

    names: list[str]
    descriptions: dict[str, str]

    def id(self, task: str) -> int:
        return self.names.index(task)

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.names, "descriptions": self.descriptions}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSet:
        return cls(list(data["tasks"]), dict(data["descriptions"]))


def task_set(train: Sequence[Example], cfg: DataConfig) -> TaskSet:
    names = sorted({e.task for e in train})
    descriptions = {}
    for name in names:
        found = next((e.description for e in train if e.task == name and e.description), "")
        descriptions[name] = cfg.task_descriptions.get(name) or found or name
    return TaskSet(names, descriptions)


def data_sources(cfg: DataConfig) -> tuple[str, str | None]:
    """(train source, test source or None): local paths or hub ids; builds BIG-bench when asked."""
    train_source, test_source = cfg.train, cfg.test
    if cfg.train == "bigbench":
        from lomix.recipes.bigbench import build

        train_path, test_path = build(cfg.bigbench)
        train_source, test_source = str(train_path), test_source or str(test_path)
    if test_source is None and not _is_local(train_source):
        test_source = train_source  # a hub dataset's test split
    return train_source, test_source


def load_examples(cfg: DataConfig) -> tuple[list[Example], list[Example] | None]:
    """(train, test) examples; test is None when there is no test set. Validates both."""
    train_source, test_source = data_sources(cfg)
    train = normalise_rows(read_rows(train_source, cfg, "data.train", cfg.train_split), cfg, "data.train", train_source)
    test = None
    if test_source is not None:
        test = load_test_examples(cfg, test_source)
        check_test_tasks({e.task for e in train}, test)
    return train, test


def load_test_examples(cfg: DataConfig, source: str | None = None) -> list[Example]:
    """The test examples alone (evaluation of a finished run)."""
    source = source or data_sources(cfg)[1]
    if source is None:
        raise DataError("data.test: this config has no test set; set data.test to a file or dataset")
    return normalise_rows(read_rows(source, cfg, "data.test", cfg.test_split), cfg, "data.test", source)


def check_test_tasks(known: set[str], test: Sequence[Example]) -> None:
    unknown = sorted({e.task for e in test} - known)
    if unknown:
        raise DataError(
            f"data.test: tasks {', '.join(repr(t) for t in unknown)} are not in the training data "
            f"(training tasks: {', '.join(sorted(known))}); routers know only the tasks they were trained on"
        )


# ----------------------------------------------------------------------------------------------
# Prompts and tokens


class Formatter:
    """Turns examples into token ids: the prompt (masked out of the loss) and the answer.

    With a chat template (``data.chat_template`` and the tokenizer has one) the prompt is the user
    turn plus the assistant header, and the answer is the assistant's text plus the end-of-turn
    marker, exactly as the template renders them; otherwise prompt + newline and answer + EOS.
    """

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.use_chat = bool(cfg.chat_template and getattr(tokenizer, "chat_template", None))

    def prompt_text(self, example: Example) -> str:
        choices = ", ".join(example.choices or [])
        return self.cfg.prompt_template.format(input=example.input, task=example.task, choices=choices)

    def _messages(self, example: Example) -> list[dict[str, str]]:
        messages = []
        if self.cfg.system_prompt is not None:
            messages.append({"role": "system", "content": self.cfg.system_prompt})
        messages.append({"role": "user", "content": self.prompt_text(example)})
        return messages

    def render(self, example: Example, answer: str | None) -> tuple[str, str]:
        """(prompt string, answer string including the end-of-turn or EOS marker)."""
        tok = self.tokenizer
        if self.use_chat:
            messages = self._messages(example)
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if answer is None:
                return prompt, ""
            full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
            if full.startswith(prompt) and full[len(prompt) :].startswith(answer):
                return prompt, full[len(prompt) :].rstrip()
            return prompt, answer + (tok.eos_token or "")
        return self.prompt_text(example) + "\n", "" if answer is None else answer + (tok.eos_token or "")

    def encode(self, example: Example, answer: str | None) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids), cut to ``data.max_length`` from the left of the prompt."""
        prompt, completion = self.render(example, answer)
        tok = self.tokenizer
        prompt_ids = tok(prompt, add_special_tokens=not self.use_chat)["input_ids"]
        answer_ids = tok(completion, add_special_tokens=False)["input_ids"] if completion else []
        limit = self.cfg.max_length
        if len(answer_ids) > limit - 1:
            answer_ids = answer_ids[: limit - 1]
        if len(prompt_ids) + len(answer_ids) > limit:
            prompt_ids = prompt_ids[len(prompt_ids) + len(answer_ids) - limit :]
        return prompt_ids, answer_ids


def tokenize(examples: Sequence[Example], formatter: Formatter, tasks: TaskSet) -> list[dict[str, Any]]:
    """Training features: input ids, labels (-100 on the prompt), task id and description."""
    features = []
    for example in examples:
        prompt_ids, answer_ids = formatter.encode(example, example.target)
        features.append(
            {
                "input_ids": prompt_ids + answer_ids,
                "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                "task_id": tasks.id(example.task),
                "description": tasks.descriptions[example.task],
            }
        )
    return features


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class Collator:
    """Left-pads features into a batch the wrapped model's forward accepts directly.

    Left padding puts every answer in the last columns, so the model computes logits only there
    (``logits_to_keep``: the LM head is a fifth of a small model's FLOPs). ``position_ids`` count
    real tokens only, so a padded row computes what the row alone would.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, width - n :] = torch.tensor(f["input_ids"])
            labels[row, width - n :] = torch.tensor(f["labels"])
            mask[row, width - n :] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "labels": labels,
            "task_ids": torch.tensor([f["task_id"] for f in features], dtype=torch.long),
            "task_descriptions": [f["description"] for f in features],
        }


class EpochSampler(torch.utils.data.Sampler):
    """A fresh seeded permutation per epoch: the order of epoch e depends only on (seed, e).

    That is what makes resume exact: a checkpoint stores the epoch and the batches already taken,
    and the resumed run regenerates the same order without saving any sampler state. ``keep``
    trims each epoch to a whole number of global batches (the rest of the permutation waits for a
    later epoch's shuffle). With ``lengths`` and ``group`` > 0, each run of ``group`` global batches
    of the permutation is sorted by length, cut into global batches and those are shuffled: rows
    of a batch then have similar lengths and padding shrinks (HF's group_by_length, bounded).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        keep: int | None = None,
        lengths: Sequence[int] | None = None,
        group: int = 0,
        batch: int = 1,
    ):
        self.size, self.seed, self.epoch = size, seed, 0
        self.keep = size if keep is None else min(keep, size)
        self.lengths, self.group, self.batch = lengths, group, batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.keep

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: self.keep].tolist()
        if self.lengths is None or self.group <= 0:
            return iter(order)
        span = self.group * self.batch
        grouped = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: (self.lengths[i], i))
            batches = [chunk[i : i + self.batch] for i in range(0, len(chunk), self.batch)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[b]
        return iter(grouped)
