"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
arXiv:2202.09368).

S = softmax(W_r x) over the experts, per token. In TRAINING each expert takes the C tokens of the
layer's batch with the highest S[:, e], C = ceil(capacity_factor * n / E) (n real tokens, at most
n): every expert gets exactly C tokens (perfect balance, no balance loss), and a token gets 0..E
experts, gated by S[token, e]. That choice depends on every token of the batch, so it is not causal:
at EVALUATION and generation (the router in eval mode) each token takes its ``eval_k`` most
probable experts under the same S, gated by S (a rule of the token alone).

The kernel contract takes a fixed number of slots per token: rows are padded with gate 0 up to the
largest number of experts any token of the batch got (at most E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..routing import RoutingContext, TokenRouting
from .base import RouterConfig, register_router
from .topk import LinearGate


@dataclass
class ExpertChoiceRouterConfig(RouterConfig):
    """Expert-choice routing in training (each expert takes its top-C tokens of the batch); causal
    top-k of the same scores at evaluation and generation (eval_k)."""

    capacity_factor: float = field(
        default=2.0,
        metadata={
            "help": "c in the expert capacity C = ceil(c * tokens / num_experts): the mean number of experts "
            "per token in training (the paper's 2)"
        },
    )
    eval_k: int = field(
        default=2,
        metadata={
            "help": "experts per token at evaluation and generation, where the router is causal: each token "
            "takes its eval_k most probable experts, gated by their raw probabilities (expert choice needs "
            "the whole batch, so it is used in training only)"
        },
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of the router weight (E x d_in)"})

    def validate(self, num_experts: int) -> None:
        if not (0 < self.capacity_factor <= num_experts):
            raise ConfigError(
                "router.capacity_factor", f"must be in (0, num_experts={num_experts}], got {self.capacity_factor}"
            )
        if not 1 <= self.eval_k <= num_experts:
            raise ConfigError("router.eval_k", f"must be between 1 and num_experts={num_experts}, got {self.eval_k}")
        if self.init_std < 0:
            raise ConfigError("router.init_std", f"must be >= 0, got {self.init_std}")

    def mixture_defaults(self) -> dict[str, Any]:
        return {"balance": {"switch": 0.0}}  # balanced by construction in training


def expert_capacity(capacity_factor: float, tokens: int, num_experts: int) -> int:
    """C = ceil(capacity_factor * tokens / num_experts), at most ``tokens``."""
    return min(tokens, math.ceil(capacity_factor * tokens / num_experts))


def expert_choice(
    probs: torch.Tensor, capacity: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert (column) takes the ``capacity`` real tokens with the highest probability.

    probs (N, E), mask (N,) bool of real tokens or None -> indices (N, m) int64 and gates (N, m),
    m the most experts any token got (at least 1): a token's chosen experts first, gated by probs,
    then slots with gate 0.
    """
    scores = probs.detach()
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device)[:, None], -1.0)  # below every probability
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    if capacity > 0:
        top_tokens = scores.topk(capacity, dim=0).indices  # (C, E)
        chosen.scatter_(0, top_tokens, True)
    width = max(int(chosen.sum(1).max()), 1)
    # chosen experts first (by probability among them), then the rest as gate-0 padding
    order = (chosen.to(probs.dtype) * 2 + scores.clamp_min(0)).argsort(dim=-1, descending=True)[:, :width]
    gates = probs.gather(-1, order) * chosen.gather(-1, order).to(probs.dtype)
    return order, gates


@register_router("expert_choice", ExpertChoiceRouterConfig)
class ExpertChoiceRouter(LinearGate):
    def softmax_topk_mismatch(self) -> str:
        return "expert-choice routing lets each expert pick its tokens, not each token its top-k experts"

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        if not self.training:  # causal: a token's experts depend on that token alone
            gates, indices = probs.topk(self.config.eval_k, dim=-1)
            return TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)
        mask = context.token_mask(probs.shape[0])
        tokens = int(mask.sum()) if mask is not None else probs.shape[0]
        capacity = expert_capacity(self.config.capacity_factor, tokens, self.num_experts)
        indices, gates = expert_choice(probs, capacity, mask)
        return TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)
