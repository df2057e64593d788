"""Dynamic top-p routing ("Harder Tasks Need More Experts", Huang et al. 2024, arXiv:2403.07652).

p = softmax(W_r x) per token; sort it in descending order and keep the smallest prefix whose mass
reaches the threshold ``p`` (at least 1 expert, at most ``max_k``); gates are the kept raw
probabilities (the paper's), optionally renormalised. The paper's dynamic loss, ``dynamic_loss *
mean_x H(p(x))`` over the real tokens, keeps the router from flattening toward every expert (a flat
distribution needs many experts to reach p); it is reported as aux ``loss_dynamic``, reduced over
layers like the other balance terms.

The kernel contract takes a fixed number of slots per token: every row has ``max_k`` slots, the
ones past the kept prefix carry gate 0. The kernel still computes those slots, so a step costs what
top-``max_k`` costs whatever the mean number of experts per token; keep ``max_k`` small (the
routing statistics log the mean and the histogram of experts per token to choose it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..routing import RoutingContext, TokenRouting
from .base import RouterConfig, register_router
from .topk import LinearGate, check_bias_update_rate


@dataclass
class TopPRouterConfig(RouterConfig):
    """Dynamic top-p routing: each token takes the fewest experts whose probability mass reaches p."""

    p: float = field(default=0.4, metadata={"help": "probability mass threshold in (0, 1] (the paper's 0.4)"})
    max_k: int | None = field(
        default=None,
        metadata={
            "help": "most experts per token, 1..num_experts (null: num_experts); every token pays for max_k "
            "kernel slots, the unused ones with gate 0"
        },
    )
    renormalize: bool = field(
        default=False, metadata={"help": "divide the kept probabilities by their sum; false: raw (the paper's)"}
    )
    dynamic_loss: float = field(
        default=1e-4,
        metadata={"help": "coefficient of the paper's dynamic loss, the mean router entropy (0 disables it)"},
    )
    jitter: float = field(
        default=0.0,
        metadata={"help": "multiplicative jitter eps on the router input during training; 0 disables it"},
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of the router weight (E x d_in)"})
    bias_update_rate: float = field(
        default=0.0,
        metadata={
            "help": "auxiliary-loss-free balancing: a per-expert bias added to the probabilities for SELECTION "
            "only, b += rate * sign(mean load - load) after each optimizer step; 0 disables it"
        },
    )

    def validate(self, num_experts: int) -> None:
        if not 0.0 < self.p <= 1.0:
            raise ConfigError("router.p", f"must be in (0, 1], got {self.p}")
        if self.max_k is not None and not 1 <= self.max_k <= num_experts:
            raise ConfigError("router.max_k", f"must be between 1 and num_experts={num_experts}, got {self.max_k}")
        if self.dynamic_loss < 0:
            raise ConfigError("router.dynamic_loss", f"must be >= 0, got {self.dynamic_loss}")
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError("router.jitter", f"must be in [0, 1), got {self.jitter}")
        if self.init_std < 0:
            raise ConfigError("router.init_std", f"must be >= 0, got {self.init_std}")
        check_bias_update_rate(self.bias_update_rate)


def top_p_selection(
    probs: torch.Tensor, p: float, max_k: int, rank_by: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shortest prefix of each row's experts, ranked by descending ``rank_by`` (default: ``probs``),
    whose probability mass reaches ``p``, 1..max_k long.

    probs (N, E) probabilities, rank_by (N, E) (the probabilities plus a balancing bias) ->
    indices (N, max_k) int64 in rank order and keep (N, max_k) bool, True for the kept prefix.
    """
    order = (probs if rank_by is None else rank_by).argsort(dim=-1, descending=True)[:, :max_k]
    ranked = probs.gather(-1, order)
    mass_before = ranked.cumsum(dim=-1) - ranked  # mass of the experts ranked above
    keep = mass_before < p
    keep[:, 0] = True  # at least one expert (mass_before is 0 there; guards p rounding)
    return order, keep


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N, E) probabilities -> the mean entropy in nats (the paper's dynamic loss)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()


@register_router("topp", TopPRouterConfig)
class TopPRouter(LinearGate):
    def softmax_topk_mismatch(self) -> str:
        return "top-p routing keeps a variable number of experts per token (probability mass p), not a fixed top-k"

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        max_k = self.config.max_k or self.num_experts
        rank_by = self.selection_scores(probs) if self.bias_update_rate > 0 else None
        indices, keep = top_p_selection(probs.detach(), self.config.p, max_k, rank_by)
        gates = probs.gather(-1, indices) * keep.to(probs.dtype)  # padded slots: gate 0
        if self.config.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        self.count_load(indices, gates, context)
        aux = {}
        if self.training and self.config.dynamic_loss > 0:
            mask = context.token_mask(probs.shape[0])
            real = probs[mask] if mask is not None else probs
            if real.shape[0]:
                aux["loss_dynamic"] = self.config.dynamic_loss * mean_entropy(real)
        return TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits, aux=aux)
