"""The method sections of the recipe config not yet in a method package: few-shot starts (a method
package keeps its sections in its own ``config.py``). Plain dataclasses that import nothing from the
recipes, so the config schema (`lomix.recipes.config`) imports them without a cycle.
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


SECTIONS = (
    Section(
        "fewshot",
        FewshotConfig,
        "few-shot adaptation: start from a trained mixture (MHR-z, MHR-mu, continued training)",
    ),
)


__all__ = ["SECTIONS", "FewshotConfig", "Section"]
