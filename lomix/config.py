"""`MixtureConfig`: what a mixture is, saved beside its weights as ``lomix_config.json``."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .kernels import BACKENDS
from .layout import MergedLayout
from .routers import RouterConfig, router_config
from .typed import from_dict, to_dict

REDUCTIONS = ("mean", "sum")
ROUTING_SCOPES = ("layer", "block")


@dataclass
class BalanceConfig:
    """Auxiliary balance losses, computed per mixture layer and reduced over layers by `lomix.aux_loss(model)`."""

    switch: float = field(
        default=0.01,
        metadata={"help": "coefficient of the Switch load-balancing loss E * sum_i f_i * P_i (0 disables it)"},
    )
    z_loss: float = field(
        default=0.0, metadata={"help": "coefficient of the router z-loss mean(logsumexp(logits)^2) (0 disables it)"}
    )

    reduction: str = field(
        default="mean",
        metadata={
            "help": "how the layers' balance losses (Switch, z-loss and a router's own, e.g. LoRA-Mixer's) "
            "combine: mean over the mixture layers (a coefficient means the same on any depth, as in the "
            "papers and transformers' MoE models) or sum (lomix's earlier behaviour, ~200x stronger on "
            "SmolLM2's 210 layers)"
        },
    )

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ConfigError("balance.reduction", f"must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        for name in ("switch", "z_loss"):
            if getattr(self, name) < 0:
                raise ConfigError(f"balance.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class MixtureConfig:
    """A mixture of LoRA experts over a frozen model's linear layers."""

    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={
            "help": "modules to wrap: a list of names, each matching a module whose full name equals it or "
            "ends with '.<name>', or one regular expression matched against the full name"
        },
    )
    exclude_modules: list[str] = field(
        default_factory=list, metadata={"help": "names (same matching as target_modules) never wrapped"}
    )
    num_experts: int = field(default=8, metadata={"help": "LoRA experts per wrapped layer"})
    rank: int = field(default=8, metadata={"help": "rank r of every expert"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the delta is scaled by alpha / rank"})
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(rank) instead (rsLoRA)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the experts' input (not the router's)"})
    router: RouterConfig = field(
        default_factory=lambda: router_config("topk"),
        metadata={"help": "the router: a registered name plus that router's own fields"},
    )
    routing_scope: str = field(
        default="layer",
        metadata={
            "help": "layer: every wrapped linear has its own router; block: one router per feed-forward module "
            "(the parent of the block_modules targets, e.g. a decoder block's mlp) reads that module's input "
            "(Llama: the post-attention-norm hidden state) and picks k experts per token, each expert being the "
            "whole feed-forward with its LoRA on every wrapped projection, mixed by the gates (MixLoRA; a "
            "softmax top-k router then exports as a native MoE checkpoint: lomix export --format moe)"
        },
    )
    block_modules: list[str] = field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        metadata={
            "help": "with routing_scope block: the targets (same matching as target_modules) that share their "
            "parent module's router; the first of each parent, in model order, must read the parent's input"
        },
    )
    layer_router: RouterConfig | None = field(
        default=None,
        metadata={
            "help": "with routing_scope block: the router of each target outside block_modules (e.g. attention "
            "projections: {name: fixed, experts: [0], weights: [1.0]}, one non-routed LoRA); null: every target "
            "must be a block module"
        },
    )
    balance: BalanceConfig | None = field(
        default=None,
        metadata={
            "help": "balance losses; null: the generic defaults, or the router's own where it needs others "
            "(RouterConfig.mixture_defaults, e.g. no Switch loss)"
        },
    )
    kernel: str = field(
        default="auto",
        metadata={"help": "kernel backend: auto (Triton on CUDA, torch on CPU), torch or triton"},
    )
    merged: MergedLayout | None = field(
        default=None,
        metadata={
            "help": "set by `lomix merge` (MC-SMoE): how the router's experts map onto each layer's merged bank; "
            "null for a mixture as trained"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig.from_config_dict(self.router)
        if isinstance(self.layer_router, dict):
            self.layer_router = RouterConfig.from_config_dict(self.layer_router, "layer_router")
        if self.balance is None:  # unset: the router's needs are its defaults (RouterConfig.mixture_defaults)
            self.balance = from_dict(BalanceConfig, self.router.mixture_defaults().get("balance", {}), "balance")
        if isinstance(self.balance, dict):
            self.balance = from_dict(BalanceConfig, self.balance, "balance")
        if isinstance(self.merged, dict):
            self.merged = from_dict(MergedLayout, self.merged, "merged")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ConfigError("target_modules", f"invalid regular expression: {exc}") from None
        elif not self.target_modules:
            raise ConfigError("target_modules", "must name at least one module")
        if self.num_experts < 1:
            raise ConfigError("num_experts", f"must be >= 1, got {self.num_experts}")
        if self.rank <= 0:
            raise ConfigError("rank", f"must be a positive integer, got {self.rank}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError("alpha", f"must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.kernel not in BACKENDS:
            raise ConfigError("kernel", f"must be one of {', '.join(BACKENDS)}, got {self.kernel!r}")
        if self.routing_scope not in ROUTING_SCOPES:
            raise ConfigError(
                "routing_scope", f"must be one of {', '.join(ROUTING_SCOPES)}, got {self.routing_scope!r}"
            )
        if self.routing_scope == "block" and not self.block_modules:
            raise ConfigError("block_modules", "must name at least one module when routing_scope is block")
        self.router.validate(self.num_experts)
        if self.layer_router is not None:
            self.layer_router.validate(self.num_experts)
        if self.merged is not None:
            self.merged.validate(self.num_experts)
        self.router.validate_mixture(self)  # the router's rules on other mixture fields

    @property
    def scale(self) -> float:
        """The LoRA scale s in y = W x + s * sum_e g_e B_e A_e x."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "target_modules": to_dict(self.target_modules),
            "exclude_modules": list(self.exclude_modules),
            "num_experts": self.num_experts,
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "dropout": self.dropout,
            "router": self.router.to_dict(),
            "balance": to_dict(self.balance),
            "kernel": self.kernel,
        }
        if self.routing_scope != "layer":  # per-layer mixtures keep the files they always had
            data["routing_scope"] = self.routing_scope
            data["block_modules"] = list(self.block_modules)
            data["layer_router"] = None if self.layer_router is None else self.layer_router.to_dict()
        if self.merged is not None:  # unmerged mixtures keep the files they always had
            data["merged"] = self.merged.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixtureConfig:
        return from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MixtureConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MixtureConfig:
        return cls.from_json(Path(path).read_text())
