"""ReMix's section of the recipe config (``rloo``): the RLOO estimator's number of selections.

A plain dataclass importing only the library, so the recipe config schema collects it
(`lomix.methods.modules("config")`) without importing the method's training hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lomix.methods.remix.rloo import check_samples
from lomix.typed import Section


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


SECTIONS = (Section("rloo", RlooConfig, "the RLOO estimator (used by routers that sample: remix)"),)

__all__ = ["SECTIONS", "RlooConfig"]
