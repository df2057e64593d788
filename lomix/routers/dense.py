"""Dense softmax routing: every token uses every expert, weighted by softmax(W_r x).

The soft stage of LoRA-Mixer's hard-soft routing and the densest point of the top-k family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..routing import RoutingContext, TokenRouting
from .base import RouterConfig, register_router
from .topk import LinearGate


@dataclass
class DenseRouterConfig(RouterConfig):
    """Dense softmax routing over all experts."""

    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of the router weight (E x d_in)"})

    def validate(self, num_experts: int) -> None:
        if self.init_std < 0:
            raise ConfigError("router.init_std", f"must be >= 0, got {self.init_std}")


@register_router("dense", DenseRouterConfig)
class DenseRouter(LinearGate):
    def softmax_topk_mismatch(self) -> str:
        return "dense routing weighs every expert by its softmax probability, without a top-k"

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        return self.route_logits(self.logits(x), x, context)

    def route_logits(self, logits: torch.Tensor, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        probs = logits.softmax(dim=-1)
        indices = torch.arange(self.num_experts, device=logits.device).expand(probs.shape[0], -1)
        return TokenRouting(indices=indices, gates=probs, probs=probs, logits=logits)
