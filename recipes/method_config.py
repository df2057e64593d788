"""The method sections of the recipe config not yet in a method package: few-shot starts and the
RLOO estimator (a method package keeps its sections in its own ``config.py``). Plain dataclasses
that import nothing from the recipes, so the config schema (`lomix.recipes.config`) imports them
without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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


SECTIONS = (
    Section(
        "fewshot",
        FewshotConfig,
        "few-shot adaptation: start from a trained mixture (MHR-z, MHR-mu, continued training)",
    ),
    Section("rloo", RlooConfig, "the RLOO estimator (used by routers that sample: remix)"),
)


__all__ = ["SECTIONS", "FewshotConfig", "RlooConfig", "Section"]
