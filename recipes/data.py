"""Data for the recipes: load, validate, normalise, tokenise and batch.

Every source (a local JSON/JSONL/CSV/TSV/Parquet/Arrow file, a hub dataset, or the BIG-bench
builder) becomes a list of `Example` (task, input, choices, label, target); chat ``messages``,
prompt/completion, Alpaca and raw ``text`` rows too (lomix.recipes.formats). Errors name the config
key, the file and the row. Training batches carry ``task_ids`` and ``task_descriptions``, which the
wrapped model's forward turns into the `RoutingContext` that every router sees.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lomix.recipes.config import DataConfig
from lomix.recipes.examples import DataError, Example, MissingSplitError
from lomix.recipes.formats import detect_format, format_example, missing_columns

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Reading

# Files read as data (the rest of a data.train/data.test value is a hub dataset id or a folder).
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow")


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
        suffix = path.suffix.lower()
        builder = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}.get(suffix, "json")
        if path.stat().st_size == 0 or (builder in ("csv", "json") and not path.read_text(errors="replace").strip()):
            raise DataError(f"{key}: {source} is empty; it holds no examples")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for malformed files
            raise DataError(f"{key}: cannot read {source} as {builder.upper()} ({type(exc).__name__}: {exc})") from None
    else:
        try:
            ds = datasets.load_dataset(source, cfg.subset, split=split)
        except ValueError as exc:
            if "Unknown split" not in str(exc):
                raise DataError(f"{key}: cannot load hub dataset {source!r} (split {split!r}): {exc}") from None
            raise MissingSplitError(
                f"{key}: hub dataset {source!r} has no split {split!r} ({exc}); name another split, or set "
                "data.validation=auto to hold out part of the training split"
            ) from None
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
    """Map columns to `Example` fields, checking every row (data.format decides how)."""
    cols = cfg.columns
    present = set(rows[0])
    fmt = detect_format(present, cfg)
    if fmt != "columns":
        missing = missing_columns(fmt, present)
        if missing:
            raise DataError(
                f"{key}: {source} has no column {missing[0]!r} that data.format={fmt} needs; its columns are: "
                f"{', '.join(sorted(present))}"
            )
        examples = []
        for number, row in enumerate(rows, start=1):
            task = row.get(cols.task) if cols.task in present else None
            description = row.get(cols.description) if cols.description in present else None
            task = str(task) if task not in (None, "") else cfg.task
            examples.append(format_example(fmt, row, f"{key}: {source} row {number}", task, str(description or "")))
        return examples
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
    """(train, test) examples; test is None when there is no test set. Validates both.

    With ``data.validation=auto`` and no test data, the test set is a seeded held-out share of the
    training rows (`hold_out`), which training then does not see.
    """
    train_source, test_source = data_sources(cfg)
    train = normalise_rows(read_rows(train_source, cfg, "data.train", cfg.train_split), cfg, "data.train", train_source)
    test = None
    if test_source is not None:
        try:
            rows = read_rows(test_source, cfg, "data.test", cfg.test_split)
            test = normalise_rows(rows, cfg, "data.test", test_source)
        except MissingSplitError:
            if cfg.validation != "auto":
                raise
    if test is None and cfg.validation == "auto":
        return hold_out(train, cfg.validation_fraction, cfg.validation_seed)
    if test is not None:
        check_test_tasks({e.task for e in train}, test)
    return train, test


def load_test_examples(cfg: DataConfig, source: str | None = None) -> list[Example]:
    """The test examples alone (evaluation of a finished run): the same held-out rows as training's
    when data.validation=auto made them."""
    if source is None:
        train_source, source = data_sources(cfg)
        if cfg.validation == "auto":
            if source is not None:
                try:
                    return normalise_rows(read_rows(source, cfg, "data.test", cfg.test_split), cfg, "data.test", source)
                except MissingSplitError:
                    pass
            rows = read_rows(train_source, cfg, "data.train", cfg.train_split)
            train = normalise_rows(rows, cfg, "data.train", train_source)
            return hold_out(train, cfg.validation_fraction, cfg.validation_seed)[1]
    if source is None:
        raise DataError(
            "data.test: this config has no test set; set data.test to a file or dataset, or "
            "data.validation=auto to hold out part of the training data"
        )
    return normalise_rows(read_rows(source, cfg, "data.test", cfg.test_split), cfg, "data.test", source)


def hold_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test): ``fraction`` of each task's examples (rounded, at least one of a task with two
    or more, never all) drawn with ``seed``; both keep the file order."""
    by_task: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_task.setdefault(example.task, []).append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for task in sorted(by_task):
        indices = by_task[task]
        count = min(max(round(len(indices) * fraction), 1), len(indices) - 1)
        held.update(rng.sample(indices, count) if count > 0 else [])
    if not held:
        raise DataError(
            "data.validation: auto needs at least two training examples of a task to hold one out; "
            "set data.test instead"
        )
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def check_test_tasks(known: set[str], test: Sequence[Example]) -> None:
    unknown = sorted({e.task for e in test} - known)
    if unknown:
        raise DataError(
            f"data.test: tasks {', '.join(repr(t) for t in unknown)} are not in the training data "
            f"(training tasks: {', '.join(sorted(known))}); routers know only the tasks they were trained on"
        )


# ----------------------------------------------------------------------------------------------
# Prompts and tokens


@dataclass
class Truncation:
    """How many training examples ``data.max_length`` cut, and where (`tokenize` counts them)."""

    examples: int = 0
    prompts: int = 0  # prompts (or a conversation's first turns) cut from the left
    targets: int = 0  # answers (or assistant turns) cut
    texts: int = 0  # raw texts cut at the end (without data.packing)
    cut: set[int] = field(default_factory=set)  # indices of the cut examples

    def report(self, cfg: DataConfig, what: str = "training examples") -> str | None:
        """A log line when anything was cut; raises `DataError` above ``data.max_truncated``."""
        if not self.cut:
            return None
        share = len(self.cut) / max(self.examples, 1)
        parts = [(self.prompts, "prompts"), (self.targets, "answers"), (self.texts, "texts")]
        detail = ", ".join(f"{n} {name}" for n, name in parts if n)
        line = f"data.max_length={cfg.max_length} cut {len(self.cut)} of {self.examples} {what} ({share:.0%}: {detail})"
        if share > cfg.max_truncated:
            raise DataError(
                f"data.max_length: {line}, above data.max_truncated={cfg.max_truncated}; raise data.max_length, "
                "shorten the data, or raise data.max_truncated to accept it"
            )
        return f"lomix: {line}"


class Formatter:
    """Turns examples into token ids: the prompt (masked out of the loss) and the answer.

    With a chat template (``data.chat_template`` and the tokenizer has one) the prompt is the user
    turn plus the assistant header, and the answer is the assistant's text plus the end-of-turn
    marker, exactly as the template renders them; otherwise prompt + newline and answer + EOS.
    A conversation (``messages``) needs the chat template; a raw text needs none.
    """

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.use_chat = bool(cfg.chat_template and getattr(tokenizer, "chat_template", None))

    def prompt_text(self, example: Example) -> str:
        choices = ", ".join(example.choices or [])
        return self.cfg.prompt_template.format(input=example.input, task=example.task, choices=choices)

    def _messages(self, example: Example) -> list[dict[str, str]]:
        if example.messages is not None:  # a conversation: up to its last assistant turn
            last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
            return self._with_system(example.messages[:last])
        return self._with_system([{"role": "user", "content": self.prompt_text(example)}])

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.cfg.system_prompt is None or (messages and messages[0]["role"] == "system"):
            return list(messages)
        return [{"role": "system", "content": self.cfg.system_prompt}, *messages]

    def _check_chat(self, example: Example) -> None:
        if example.messages is not None and not self.use_chat:
            why = "data.chat_template is false" if not self.cfg.chat_template else "the tokenizer has no chat template"
            raise DataError(f"data.format: conversation rows (messages) need a chat template, but {why}")

    def render(self, example: Example, answer: str | None) -> tuple[str, str]:
        """(prompt string, answer string including the end-of-turn or EOS marker)."""
        tok = self.tokenizer
        self._check_chat(example)
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

    def _encode(self, example: Example, answer: str | None) -> tuple[list[int], list[int], bool, bool]:
        """(prompt ids, answer ids, prompt cut, answer cut)."""
        prompt, completion = self.render(example, answer)
        tok = self.tokenizer
        prompt_ids = tok(prompt, add_special_tokens=not self.use_chat)["input_ids"]
        answer_ids = tok(completion, add_special_tokens=False)["input_ids"] if completion else []
        limit = self.cfg.max_length
        answer_cut = len(answer_ids) > limit - 1
        if answer_cut:
            answer_ids = answer_ids[: limit - 1]
        prompt_cut = len(prompt_ids) + len(answer_ids) > limit
        if prompt_cut:
            prompt_ids = prompt_ids[len(prompt_ids) + len(answer_ids) - limit :]
        return prompt_ids, answer_ids, prompt_cut, answer_cut

    def encode(self, example: Example, answer: str | None) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids), cut to ``data.max_length`` from the left of the prompt."""
        return self._encode(example, answer)[:2]

    def conversation_segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """A conversation rendered by the chat template, as (text, in the loss) pieces in order: each
        assistant turn's text plus its end-of-turn marker is in the loss, everything else is not.

        The pieces come from rendering growing prefixes of the conversation; a template that
        renders earlier turns differently once later ones follow (it drops their reasoning, say)
        cannot be cut this way and is refused.
        """
        tok = self.tokenizer
        full = tok.apply_chat_template(messages, tokenize=False)
        pieces, done = [], 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            through = tok.apply_chat_template(messages[: index + 1], tokenize=False)
            if not (len(before) >= done and full.startswith(before) and full.startswith(through)):
                raise DataError(
                    "data.format: the tokenizer's chat template renders earlier turns differently once later ones "
                    "follow, so the assistant turns cannot be masked; train on one exchange per row instead"
                )
            answer = through[len(before) :].rstrip()
            pieces += [(full[done : len(before)], False), (answer, True)]
            done = len(before) + len(answer)
        tail = full[done:]  # after the last answer: the template's trailing newline, or a last user turn
        return [*pieces, (tail, False)] if tail.strip() else pieces

    def encode_conversation(self, example: Example) -> tuple[list[int], list[int], bool, bool]:
        """(input ids, labels, start cut, assistant turn cut): labels are -100 outside assistant turns;
        a conversation over ``data.max_length`` loses its first tokens (its last answer stays)."""
        self._check_chat(example)
        ids: list[int] = []
        labels: list[int] = []
        for text, learned in self.conversation_segments(self._with_system(example.messages)):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        excess = len(ids) - self.cfg.max_length
        if excess <= 0:
            return ids, labels, False, False
        answer_cut = any(label != IGNORE_INDEX for label in labels[:excess])
        return ids[excess:], labels[excess:], True, answer_cut

    def text_ids(self, example: Example) -> list[int]:
        """A raw text's ids (with the tokenizer's own special tokens) and EOS: every one is learned."""
        tok = self.tokenizer
        ids = tok(example.text)["input_ids"]
        return ids + ([tok.eos_token_id] if tok.eos_token_id is not None and ids[-1:] != [tok.eos_token_id] else [])


def _feature(ids: list[int], labels: list[int], task_id: int, description: str) -> dict[str, Any]:
    return {"input_ids": ids, "labels": labels, "task_id": task_id, "description": description}


def tokenize(
    examples: Sequence[Example], formatter: Formatter, tasks: TaskSet, truncation: Truncation | None = None
) -> list[dict[str, Any]]:
    """Training features: input ids, labels (-100 where there is no loss), task id and description.

    Prompt/answer examples learn the answer; conversations their assistant turns; raw texts every
    token (with ``data.packing`` each task's texts are concatenated and cut into ``data.max_length``
    blocks, which come after the other features). ``truncation`` counts what ``data.max_length`` cut.
    """
    truncation = truncation if truncation is not None else Truncation()
    truncation.examples += len(examples)
    limit, packing = formatter.cfg.max_length, formatter.cfg.packing
    features, streams = [], {}
    for index, example in enumerate(examples):
        task_id, description = tasks.id(example.task), tasks.descriptions[example.task]
        if example.is_text:
            ids = formatter.text_ids(example)
            if packing:
                streams.setdefault(example.task, []).extend(ids)
                continue
            if len(ids) > limit:
                truncation.texts += 1
                truncation.cut.add(index)
            features.append(_feature(ids[:limit], ids[:limit], task_id, description))
            continue
        if example.messages is not None:
            ids, labels, prompt_cut, answer_cut = formatter.encode_conversation(example)
        else:
            prompt_ids, answer_ids, prompt_cut, answer_cut = formatter._encode(example, example.target)
            ids, labels = prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        truncation.prompts += prompt_cut and not answer_cut
        truncation.targets += answer_cut
        if prompt_cut or answer_cut:
            truncation.cut.add(index)
        features.append(_feature(ids, labels, task_id, description))
    for task in sorted(streams):
        stream, task_id = streams[task], tasks.id(task)
        for start in range(0, len(stream), limit):
            block = stream[start : start + limit]
            features.append(_feature(block, list(block), task_id, tasks.descriptions[task]))
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
