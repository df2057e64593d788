"""Softmax top-k token routing with renormalised gates (MoLoRA / MixLoRA baseline), and the
auxiliary-loss-free balancing bias shared by the softmax routers.

p = softmax(W_r x), keep the k largest, gates = p_topk / sum(p_topk) (raw p_topk for k=1).
Loss-free balancing (Wang et al. 2024, DeepSeek-V3): select by top-k of p + b, gate with p; after
each optimizer step b_e += u * sign(mean load - load_e); b is a buffer, saved with the mixture and
never seen by the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..kernels.fused import SoftmaxTopK
from ..routing import RoutingContext, TokenRouting
from .base import Router, RouterConfig, register_router


@dataclass
class TopKRouterConfig(RouterConfig):
    """Softmax top-k routing: each token uses its k most probable experts."""

    k: int = field(default=2, metadata={"help": "experts per token (1 <= k <= num_experts)"})
    renormalize: bool | None = field(
        default=None,
        metadata={
            "help": "divide the k kept probabilities by their sum (MixLoRA); false: raw probabilities (Switch); "
            "null: true for k > 1, false for k = 1 (a renormalised single gate is always 1.0 and the router "
            "gets no gradient from the task loss, so k=1 with true is refused)"
        },
    )
    jitter: float = field(
        default=0.0,
        metadata={
            "help": "multiplicative jitter eps on the router input during training, x * U(1-eps, 1+eps) "
            "(Switch Transformer); 0 disables it"
        },
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of the router weight (E x d_in)"})
    bias_update_rate: float = field(
        default=0.0,
        metadata={
            "help": "auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias b added to the probabilities "
            "for SELECTION only (gates stay unbiased), b += rate * sign(mean load - load) after each optimizer "
            "step; ~1e-3. 0 disables it (no bias buffer)"
        },
    )

    @property
    def renormalizes(self) -> bool:
        """Whether the kept gates are renormalised: ``renormalize``, or when unset, k > 1."""
        return self.k > 1 if self.renormalize is None else self.renormalize

    def validate(self, num_experts: int) -> None:
        if not 1 <= self.k <= num_experts:
            raise ConfigError("router.k", f"must be between 1 and num_experts={num_experts}, got {self.k}")
        if self.k == 1 and self.renormalize:
            raise ConfigError(
                "router.renormalize",
                "must not be true with k=1: the single renormalised gate is always 1.0, so the router gets no "
                "gradient from the task loss; leave it unset (raw probability, as Switch) or set it false",
            )
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError("router.jitter", f"must be in [0, 1), got {self.jitter}")
        if self.init_std < 0:
            raise ConfigError("router.init_std", f"must be >= 0, got {self.init_std}")
        check_bias_update_rate(self.bias_update_rate)


def check_bias_update_rate(rate: float) -> None:
    if not (rate >= 0 and rate < float("inf")):
        raise ConfigError("router.bias_update_rate", f"must be a finite number >= 0, got {rate}")


class LinearGate(Router):
    """A router whose logits are a linear map of the token, computed in fp32. Shared base of the
    softmax routers; with a config field ``bias_update_rate`` > 0 it keeps the loss-free balancing
    bias: ``selection_bias`` (E,), a saved buffer, and the load counted since the last optimizer step."""

    def __init__(self, config: RouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, d_in))
        nn.init.normal_(self.weight, std=getattr(config, "init_std", 0.02))
        self.bias_update_rate = getattr(config, "bias_update_rate", 0.0)
        if self.bias_update_rate > 0:  # only then: mixtures saved without the option keep their files
            self.register_buffer("selection_bias", torch.zeros(num_experts))
            self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)

    def selection_scores(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, E) probabilities -> the scores experts are SELECTED by: plus the balancing bias, if any."""
        if self.bias_update_rate > 0:
            return probs + self.selection_bias
        return probs

    def count_load(self, indices: torch.Tensor, gates: torch.Tensor, context: RoutingContext) -> None:
        """Add a training forward's selections (slots with a non-zero gate, real tokens) to the load
        the next `after_optimizer_step` balances. indices, gates (N, k)."""
        if self.bias_update_rate <= 0 or not self.training:
            return
        live = (gates.detach() != 0).to(self.pending_load.dtype)
        mask = context.token_mask(indices.shape[0])
        if mask is not None:
            live = live * mask.to(live.device, live.dtype)[:, None]
        self.pending_load.scatter_add_(0, indices.reshape(-1), live.reshape(-1))

    def after_optimizer_step(self) -> None:
        """b_e += u * sign(mean load - load_e) from the load since the previous step (summed over
        processes, so every process keeps the same bias); then the count restarts."""
        if self.bias_update_rate <= 0:
            return
        load = self.pending_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            load = load.clone()
            torch.distributed.all_reduce(load)
        if load.sum() > 0:
            self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.pending_load.zero_()

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
        indices = self.selection_scores(probs).topk(self.config.k, dim=-1).indices
        gates = probs.gather(-1, indices)  # unbiased: the balancing bias only selects
        if self.config.renormalizes:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        self.count_load(indices, gates, context)
        return TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)

    def softmax_topk_rule(self) -> SoftmaxTopK | None:
        # Jitter draws noise per token: the fused kernel does not, so a jittered training step declines.
        if self.training and self.config.jitter > 0:
            return None
        # The loss-free balancing bias selects by p + b and counts the load: the kernel does neither.
        if self.bias_update_rate > 0:
            return None
        return SoftmaxTopK(self.weight, self.config.k, self.config.renormalizes)

    def softmax_topk_mismatch(self) -> str:
        if self.bias_update_rate > 0:
            return (
                "loss-free balancing (router.bias_update_rate > 0) selects experts by p + b, a learned bias, "
                "not by the probabilities p"
            )
        if self.training and self.config.jitter > 0:
            return "router.jitter multiplies the router's input by noise (in training)"
        return super().softmax_topk_mismatch()
