"""A run's mixture answering prompts: what ``lomix chat`` and ``lomix generate`` run.

A prompt is formatted as evaluation formats an example's input (``data.prompt_template``, then the
tokenizer's chat template when the run trained with it), unless ``raw`` asks for the text as typed.
A run whose router routes by task (``RouterConfig.task_rows``) needs a task for every
prompt, by name or id from the run's ``tasks.json``; the task's description goes with it for
routers that route by description. Greedy decoding unless ``do_sample``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import lomix
from lomix.errors import ConfigError
from lomix.recipes.data import Example
from lomix.recipes.evaluation import whole_sequences
from lomix.recipes.runs import LoadedRun, load_run


@dataclass
class GenerationOptions:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0
    raw: bool = False
    """the prompt text as typed: neither the run's prompt template nor its chat template"""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError("--temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError("--top-k", f"must be >= 0 (0: no top-k filter), got {self.top_k}")


@dataclass(frozen=True)
class Route:
    """What a prompt is routed by: a task of the run (its id, the router's row, and name) and/or a
    task description (for routers that route by description)."""

    id: int | None
    name: str
    description: str | None


def run_folder(path: str | Path) -> Path:
    """The run folder of ``path``: RUN itself, or RUN for RUN/mixture."""
    path = Path(path)
    if (path / lomix.CONFIG_NAME).is_file() and (path.parent / "config.yaml").is_file():
        return path.parent
    return path


def open_run(path: str | Path, overrides: Sequence[str] = ()) -> LoadedRun:
    return load_run(run_folder(path), overrides)


def needs_task(run: LoadedRun) -> bool:
    return bool(run.model.lomix_state.config.router.task_rows)


def route(
    run: LoadedRun, task: str | int | None, field: str = "--task", description: str | None = None
) -> Route | None:
    """The `Route` of ``task`` (a name or an id of the run's tasks; its description from the run's
    tasks.json unless ``description`` is given), a description alone, or None when neither is given
    and the run's router does not route by task."""
    names = run.tasks.names
    if task is None or task == "":
        if needs_task(run):
            raise ConfigError(field, f"this run's router routes by task: name one of {', '.join(names)} (or its id)")
        return None if description is None else Route(None, "", description)
    text = str(task)
    if text in names:
        index = names.index(text)
    elif text.isdigit() and int(text) < len(names):
        index = int(text)
    else:
        known = f"{', '.join(names)} (or ids 0-{len(names) - 1})"
        raise ConfigError(field, f"unknown task {text!r}; this run's tasks are: {known}")
    name = names[index]
    return Route(index, name, description if description is not None else run.tasks.descriptions.get(name, name))


def _user_text(run: LoadedRun, text: str, task: Route | None, raw: bool) -> str:
    return text if raw else run.formatter.prompt_text(Example(task=task.name if task else "", input=text))


def prompt_ids(run: LoadedRun, text: str, task: Route | None, raw: bool = False) -> list[int]:
    """Token ids of one prompt, as evaluation formats it (or as typed with ``raw``)."""
    if raw:
        return run.tokenizer(text)["input_ids"]
    return run.formatter.encode(Example(task=task.name if task else "", input=text), None)[0]


def chat_ids(
    run: LoadedRun, turns: Sequence[tuple[str, str]], message: str, task: Route | None, raw: bool
) -> list[int]:
    """Token ids of a conversation (earlier (user, assistant) turns, then ``message``) ready for the
    assistant's answer: the tokenizer's chat template when it has one, else the turns one per line."""
    tok = run.tokenizer
    if getattr(tok, "chat_template", None):
        messages = []
        if run.cfg.data.system_prompt is not None:
            messages.append({"role": "system", "content": run.cfg.data.system_prompt})
        for user, answer in turns:
            messages += [
                {"role": "user", "content": _user_text(run, user, task, raw)},
                {"role": "assistant", "content": answer},
            ]
        messages.append({"role": "user", "content": _user_text(run, message, task, raw)})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    lines = [f"{_user_text(run, user, task, raw)}\n{answer}\n" for user, answer in turns]
    return tok("".join(lines) + _user_text(run, message, task, raw) + "\n")["input_ids"]


def _stop_ids(tokenizer: Any) -> list[int]:
    return [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]


@torch.no_grad()
def generate(
    run: LoadedRun,
    prompts: Sequence[list[int]],
    routes: Sequence[Route | None],
    options: GenerationOptions,
    streamer: Any = None,
) -> list[list[int]]:
    """New token ids for each prompt (one batch, left-padded), cut at the first end-of-sequence
    token. ``routes``: one per prompt, all None or none None."""
    tok, model = run.tokenizer, run.model
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    stop = _stop_ids(tok)
    settings: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens,
        "do_sample": options.do_sample,
        "use_cache": not whole_sequences(model),
        "pad_token_id": pad,
        "eos_token_id": stop or None,
        "streamer": streamer,
    }
    if options.do_sample:
        settings.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
        torch.manual_seed(options.seed)
    routing: dict[str, Any] = {}
    if routes and all(r is not None and r.id is not None for r in routes):
        routing["task_ids"] = [r.id for r in routes]
    if routes and all(r is not None and r.description is not None for r in routes):
        routing["task_descriptions"] = [r.description for r in routes]
    with lomix.routing_context(model, **routing):
        out = model.generate(input_ids=ids, attention_mask=mask, **settings)
    answers = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        answers.append(row[:end])
    return answers


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; each an object with a text ``prompt`` (and optionally ``task``,
    ``task_description``)."""
    if not path.is_file():
        raise ConfigError("--input", f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}", f"not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{path}:{number}", 'expected an object with a text "prompt" (and optionally "task")')
        rows.append(row)
    if not rows:
        raise ConfigError("--input", f"{path} holds no rows")
    return rows


def generate_rows(
    run: LoadedRun,
    rows: Sequence[dict[str, Any]],
    options: GenerationOptions,
    task: str | None,
    batch_size: int,
    description: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Each row with its ``completion`` (text) and ``new_tokens`` (count), in order; a row's ``task``
    and ``task_description`` override ``task`` and ``description``."""
    options.check()
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
    routes = [
        route(
            run,
            row.get("task", task),
            f"row {i + 1}: task" if "task" in row else "--task",
            row.get("task_description", description),
        )
        for i, row in enumerate(rows)
    ]
    if len({(r is None or r.id is None, r is None or r.description is None) for r in routes}) > 1:
        raise ConfigError(
            "task",
            "rows differ in what they route by: every row or none has a task (its own or --task), and the same "
            "for task descriptions",
        )
    encoded = [prompt_ids(run, row["prompt"], r, options.raw) for row, r in zip(rows, routes, strict=True)]
    for start in range(0, len(rows), batch_size):
        stop = start + batch_size
        answers = generate(run, encoded[start:stop], routes[start:stop], options)
        for row, answer in zip(rows[start:stop], answers, strict=True):
            text = run.tokenizer.decode(answer, skip_special_tokens=True)
            yield {**row, "completion": text, "new_tokens": len(answer)}


__all__ = [
    "GenerationOptions",
    "Route",
    "chat_ids",
    "generate",
    "generate_rows",
    "needs_task",
    "open_run",
    "prompt_ids",
    "read_prompts",
    "route",
    "run_folder",
]
