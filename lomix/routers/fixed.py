"""A fixed route: every token uses the same user-given experts with the same weights.

This is a mixture "frozen to one expert set"; such a mixture is a single LoRA and can be exported
as one (docs/deploy.md, "Merge, compress, export").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..routing import RoutingContext, TokenRouting
from .base import Router, RouterConfig, register_router


@dataclass
class FixedRouterConfig(RouterConfig):
    """Route every token to the same experts with the same weights (no trainable parameters)."""

    experts: list[int] = field(default_factory=lambda: [0], metadata={"help": "expert ids every token uses"})
    weights: list[float] | None = field(
        default=None,
        metadata={"help": "gate of each listed expert, used as given; default: equal weights 1/len(experts)"},
    )

    def validate(self, num_experts: int) -> None:
        if not self.experts:
            raise ConfigError("router.experts", "must list at least one expert id")
        bad = [e for e in self.experts if not 0 <= e < num_experts]
        if bad:
            raise ConfigError("router.experts", f"ids must be in [0, {num_experts}), got {bad}")
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError("router.experts", f"must not repeat an expert, got {self.experts}")
        if self.weights is not None and len(self.weights) != len(self.experts):
            raise ConfigError(
                "router.weights",
                f"needs one weight per expert ({len(self.experts)}), got {len(self.weights)}",
            )


@register_router("fixed", FixedRouterConfig)
class FixedRouter(Router):
    def __init__(self, config: FixedRouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        weights = config.weights or [1.0 / len(config.experts)] * len(config.experts)
        # Buffers follow .to(device) and are not saved: the config holds them.
        self.register_buffer("expert_ids", torch.tensor(config.experts, dtype=torch.long), persistent=False)
        self.register_buffer("expert_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        n = x.numel() // self.d_in
        return TokenRouting(
            indices=self.expert_ids.expand(n, -1),
            gates=self.expert_weights.expand(n, -1),
        )
