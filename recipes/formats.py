"""Row formats other than lomix's own columns: chat ``messages``, TRL's prompt/completion, Alpaca
and raw ``text``. Each becomes the same `Example` as a columns row, so routing, batching and
evaluation do not care where a row came from.

    messages            {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    prompt_completion   {"prompt": ..., "completion": ...}  (strings, or lists of messages as in TRL)
    alpaca              {"instruction": ..., "input": "" or more context, "output": ...}
    text                {"text": ...}
"""

from __future__ import annotations

from typing import Any

from lomix.recipes.config import DataConfig
from lomix.recipes.examples import DataError, Example

ROLES = ("system", "user", "assistant", "tool")

# What `detect_format` looks for: format -> the columns a row of it has.
SIGNATURES = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}


def detect_format(present: set[str], cfg: DataConfig) -> str:
    """The format of rows with columns ``present``: data.format, or recognised from the columns.

    Alpaca is tried before lomix's columns because its rows also have an ``input`` column; ``text``
    last, so a file with an input column and a text column stays a columns file.
    """
    if cfg.format != "auto":
        return cfg.format
    for name, columns in SIGNATURES.items():
        if all(c in present for c in columns):
            return name
    if cfg.columns.input in present or "text" not in present:
        return "columns"  # its checks name the missing columns
    return "text"


def _text(row: dict[str, Any], column: str, where: str, *, required: bool = True) -> str:
    value = row.get(column)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"{where}: {column!r} must be non-empty text, got {value!r}")
    return value


def check_messages(value: Any, where: str, column: str = "messages") -> list[dict[str, str]]:
    """A conversation: a list of {role, content} with at least one assistant turn after a user turn."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {column!r} must be a non-empty list of {{role, content}} messages, got {value!r}")
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {column} message {number} must be {{role, content}} with text, got {message!r}")
        if message.get("role") not in ROLES:
            raise DataError(
                f"{where}: {column} message {number} has role {message.get('role')!r}; expected {', '.join(ROLES)}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {column!r} has no assistant message: nothing to learn from it")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: {column!r} starts with an assistant message; a conversation starts with a user turn")
    return messages


def conversation_example(messages: list[dict[str, str]], task: str, description: str) -> Example:
    """A conversation as an `Example`: input/target are its last user and assistant turns (what
    evaluation prompts with and compares against)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return Example(
        task=task,
        input=users[-1] if users else "",
        target=messages[last]["content"],
        description=description,
        messages=messages,
    )


def format_example(fmt: str, row: dict[str, Any], where: str, task: str, description: str) -> Example:
    """One row of format ``fmt`` (not ``columns``) as an `Example`."""
    if fmt == "messages":
        return conversation_example(check_messages(row.get("messages"), where), task, description)
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
            if not isinstance(prompt, list) or not isinstance(completion, list):
                raise DataError(f"{where}: 'prompt' and 'completion' must both be text or both lists of messages")
            messages = check_messages(prompt + completion, where, "prompt + completion")
            return conversation_example(messages, task, description)
        return Example(
            task, _text(row, "prompt", where), target=_text(row, "completion", where), description=description
        )
    if fmt == "alpaca":
        instruction, context = _text(row, "instruction", where), _text(row, "input", where, required=False)
        prompt = f"{instruction}\n\n{context}" if context.strip() else instruction
        return Example(task, prompt, target=_text(row, "output", where), description=description)
    if fmt == "text":
        text = _text(row, "text", where)
        return Example(task, text, description=description, text=text)
    raise DataError(f"{where}: unknown data.format {fmt!r}")


def missing_columns(fmt: str, present: set[str]) -> list[str]:
    """The columns format ``fmt`` needs that the data lacks."""
    needed = {**SIGNATURES, "text": ("text",)}.get(fmt, ())
    return [c for c in needed if c not in present]
