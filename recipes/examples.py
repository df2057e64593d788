"""The normalised example every data format becomes, and the error for data that does not fit."""

from __future__ import annotations

from dataclasses import dataclass

from lomix.errors import LomixError


class DataError(LomixError, ValueError):
    """The data does not fit the config (missing column, empty file, bad label, unknown task)."""


class MissingSplitError(DataError):
    """A hub dataset has no split of the asked name (data.validation=auto then holds rows out)."""


@dataclass
class Example:
    """One normalised example. Multiple choice: ``choices`` and ``label`` (``target`` is the right
    choice); generative: ``target`` only; a conversation: ``messages`` (the loss covers every
    assistant turn; ``target`` is the last one); raw text: ``text`` (the loss covers every token)."""

    task: str
    input: str
    choices: list[str] | None = None
    label: int | None = None
    target: str | None = None
    description: str = ""
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None

    @property
    def is_text(self) -> bool:
        """Raw text: nothing to score it against, only a language-model loss."""
        return self.text is not None
