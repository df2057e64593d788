"""Poly/MHR's section of the recipe config (``fewshot``): start a run from a trained mixture.

A plain dataclass importing only the library, so the recipe config schema collects it
(`lomix.methods.modules("config")`) without importing the method's training hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lomix.typed import Section


@dataclass
class FewshotConfig:
    """Start from a trained mixture instead of a fresh one (few-shot adaptation to new tasks)."""

    init_from: str | None = field(
        default=None,
        metadata={
            "path": True,
            "help": "a finished run folder (its mixture/) or a lomix mixture folder to start from; null: a fresh "
            "mixture. When set, the mixture and router sections come from that mixture (yours are ignored)",
        },
    )
    method: Literal["mhr_z", "mhr_mu", "continue"] = field(
        default="mhr_z",
        metadata={
            "help": "mhr_z: fresh routing rows for new tasks, only they train (needs a poly/mhr mixture); mhr_mu: the "
            "mean of the skills as one LoRA, fine-tuned; continue: train everything further"
        },
    )


SECTIONS = (
    Section(
        "fewshot",
        FewshotConfig,
        "few-shot adaptation: start from a trained mixture (MHR-z, MHR-mu, continued training)",
    ),
)

__all__ = ["SECTIONS", "FewshotConfig"]
