"""Arrow: training-free per-token routing over a library of LoRA experts.

docs/methods.md, "Arrow" (Ostapenko et al. 2024, arXiv:2405.11157; PEFT's ``ArrowConfig``). For each
layer and expert e, the prototype v_e is the top right-singular vector of the expert's update
Delta W_e = B_e A_e (a unit vector of size d_in, defined up to sign). A token x is scored by

    score_e(x) = |<v_e, x>|                     (sign-free: v_e and -v_e are the same prototype)
    keep the k largest scores; gates = softmax(score / temperature) over the kept k

Nothing is trained: the prototypes are read from the layer's experts (`bind_experts`) and computed
once per version of the expert weights, so they follow a checkpoint load, a library or PEFT
adapters written into the bank, or a training step, without being saved. An expert that is zero in
a module (a library expert that does not adapt it) has a zero prototype there: score 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, RoutingError
from ..routing import RoutingContext, TokenRouting
from .base import Router, RouterConfig, register_router


def top_right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(E, r, d_in), (E, d_out, r) -> (E, d_in) float32: the top right-singular vector of each B_e A_e.

    Computed without forming the (d_out, d_in) product: with A_e^T = Q R (Q: d_in x r orthonormal),
    B_e A_e = (B_e R^T) Q^T, so if B_e R^T = U S W^T then the right-singular vectors of B_e A_e are
    Q W. The sign is fixed so that the largest-magnitude entry is positive (Arrow's scores ignore it);
    an expert whose update is zero gets a zero vector.
    """
    A32, B32 = A.detach().float(), B.detach().float()
    Q, R = torch.linalg.qr(A32.transpose(1, 2))  # (E, d_in, r), (E, r, r)
    small = B32 @ R.transpose(1, 2)  # (E, d_out, r)
    _, S, Wh = torch.linalg.svd(small, full_matrices=False)  # S: (E, r), Wh: (E, r, r)
    vectors = (Q @ Wh[:, 0, :, None]).squeeze(-1)  # (E, d_in)
    lead = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    vectors = vectors * torch.where(lead < 0, -1.0, 1.0)
    # A zero update has no direction: a tiny relative singular value is round-off, not a direction.
    zero = S[:, 0] <= torch.finfo(torch.float32).eps * S[:, 0].max().clamp(min=torch.finfo(torch.float32).tiny)
    return vectors.masked_fill(zero[:, None], 0.0)


@dataclass
class ArrowRouterConfig(RouterConfig):
    """Arrow over frozen LoRA experts: each token scores |<v_e, x>| against every expert's top
    right-singular vector and takes the k best, gated by a softmax of the scores (no training)."""

    k: int = field(default=3, metadata={"help": "experts per token (PEFT's ArrowConfig.top_k: 3)"})
    temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of the kept scores (PEFT's router_temperature)"}
    )

    def validate(self, num_experts: int) -> None:
        if not 1 <= self.k <= num_experts:
            raise ConfigError("router.k", f"must be between 1 and num_experts={num_experts}, got {self.k}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError("router.temperature", f"must be a finite number > 0, got {self.temperature}")


@register_router("arrow", ArrowRouterConfig)
class ArrowRouter(Router):
    """No parameters. ``prototypes()`` (E, d_in) float32 is derived from the layer's `ExpertBank`."""

    def __init__(self, config: ArrowRouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        self._bank: tuple[nn.Module, ...] = ()  # a tuple keeps the bank out of this module's state
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def bind_experts(self, experts: nn.Module) -> None:
        if experts.num_experts != self.num_experts:
            raise ConfigError(
                "router.name",
                f"arrow routes by each expert's own weights; this layer's bank holds {experts.num_experts} experts "
                f"for {self.num_experts} router experts (a merged mixture); use another router",
            )
        self._bank = (experts,)
        self._cached = None

    def prototypes(self) -> torch.Tensor:
        """(E, d_in) float32 prototypes, recomputed only when the experts' weights changed."""
        if not self._bank:
            raise RoutingError("the arrow router is not bound to an expert bank; it routes inside a MixtureLinear")
        A, B = self._bank[0].A, self._bank[0].B
        # Every in-place write (a load, load_expert, an optimizer step) bumps a tensor's version.
        key = (A.data_ptr(), A._version, B.data_ptr(), B._version, A.device)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, top_right_singular_vectors(A, B))
        return self._cached[1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (N, E) float32 sign-free scores |<v_e, x>|."""
        return (x.reshape(-1, self.d_in).float() @ self.prototypes().T).abs()

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        return self.route_logits(self.scores(x) / self.config.temperature, x, context)

    def route_logits(self, logits: torch.Tensor, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        """Top-k of the logits (scores / temperature), softmax over the kept k."""
        kept, indices = logits.topk(self.config.k, dim=-1)
        gates = kept.softmax(dim=-1)
        probs = torch.zeros_like(logits).scatter(-1, indices, gates)
        return TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)


__all__ = ["ArrowRouter", "ArrowRouterConfig", "top_right_singular_vectors"]
