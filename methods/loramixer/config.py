"""LoRA-Mixer's section of the recipe config (``loramixer``): its stages and plug-and-play adapters.

A plain dataclass importing only the library, so the recipe config schema collects it
(`lomix.methods.modules("config")`) without importing the method's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lomix.errors import ConfigError
from lomix.typed import Section


@dataclass
class LoramixerConfig:
    """LoRA-Mixer's stages (``lomix loramixer``; ignored by ``lomix train``)."""

    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "path": True,
            "help": "plug-and-play: PEFT LoRA adapters (folders or hub ids namespace/name[@rev]) as the frozen "
            "experts, expert j = adapters[j]; no hard stage, only the router trains. Empty: train the experts",
        },
    )
    hard_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps of the hard (label-routed) stage; null: train.max_steps"}
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "path": True,
            "help": "a finished hard stage (its run folder or mixture folder): skip the hard stage and start the "
            "soft stage from its experts (e.g. several soft-stage settings from one hard stage)",
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


SECTIONS = (
    Section(
        "loramixer",
        LoramixerConfig,
        "LoRA-Mixer's stages and plug-and-play adapters (lomix loramixer; ignored by lomix train)",
    ),
)

__all__ = ["SECTIONS", "LoramixerConfig"]
