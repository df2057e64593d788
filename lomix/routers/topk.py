"""Softmax top-k token routing with renormalised gates (MoLoRA / MixLoRA baseline).

METHODS.md section 6: p = softmax(W_r x), keep the k largest, gates = p_topk / sum(p_topk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..routing import RoutingContext, TokenRouting
from .base import Router, RouterConfig, register_router


@dataclass
class TopKRouterConfig(RouterConfig):
    """Softmax top-k routing: each token uses its k most probable experts."""

    k: int = field(default=2, metadata={"help": "experts per token (1 <= k <= num_experts)"})
    renormalize: bool = field(
        default=True, metadata={"help": "divide the k kept probabilities by their sum (MixLoRA); else raw"}
    )
    jitter: float = field(
        default=0.0,
        metadata={
            "help": "multiplicative jitter eps on the router input during training, x * U(1-eps, 1+eps) "
            "(Switch Transformer); 0 disables it"
        },
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of the router weight (E x d_in)"})

    def validate(self, num_experts: int) -> None:
        if not 1 <= self.k <= num_experts:
            raise ConfigError("router.k", f"must be between 1 and num_experts={num_experts}, got {self.k}")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError("router.jitter", f"must be in [0, 1), got {self.jitter}")
        if self.init_std < 0:
            raise ConfigError("router.init_std", f"must be >= 0, got {self.init_std}")


class LinearGate(Router):
    """A router whose logits are a linear map of the token, computed in fp32. Shared base of the
    softmax routers."""

    def __init__(self, config: RouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, d_in))
        nn.init.normal_(self.weight, std=getattr(config, "init_std", 0.02))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (N, E) float32 router logits."""
        flat = x.reshape(-1, self.d_in)
        jitter = getattr(self.config, "jitter", 0.0)
        if self.training and jitter > 0:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - jitter, 1.0 + jitter)
        if flat.dtype in (torch.float16, torch.bfloat16):
            # Cast the small weight, not the activations: an fp32 copy of x costs more than routing.
            # The product accumulates in fp32 either way; the logits are rounded once to x's dtype.
            return F.linear(flat, self.weight.to(flat.dtype)).float()
        return F.linear(flat.to(self.weight.dtype), self.weight).float()


@register_router("topk", TopKRouterConfig)
class TopKRouter(LinearGate):
    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        return self.route_logits(self.logits(x), x, context)

    def route_logits(self, logits: torch.Tensor, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        probs = logits.softmax(dim=-1)
        gates, indices = probs.topk(self.config.k, dim=-1)
        if self.config.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)
