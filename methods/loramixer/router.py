"""LoRA-Mixer routing (METHODS.md section 2): label-routed hard stage, softmax soft stage, sparse top-K inference.

The experts sit inside the projections ("in series", y = W x + s * sum_e alpha_e(x) B_e A_e x, the
layer's own formula); this router only decides alpha(x):

- ``stage: hard``: every token of sequence b goes to expert ``task_ids[b]`` with gate 1 (label
  routing), in training and in evaluation. The router weight is not used, so it gets no gradient;
  expert j gets gradient only from tokens of domain j. With stacked expert banks an optimizer with
  momentum or weight decay would still move the other experts: `lomix.loramixer.freeze_unrouted_experts`
  restores them after each step (the finetune recipe installs it).
- ``stage: soft``: alpha(x) = softmax(W_r x). Training uses the dense fusion over all experts, or with
  ``straight_through`` the top-k in the forward and the softmax's gradient in the backward.
  Evaluation (``inference: topk``) keeps the K most probable experts with renormalised gates
  (K = ``k``, 3 in the paper); ``inference: dense`` keeps the soft fusion.

The specialization balance loss (SBL / RSL), reported as aux ``loss_sbl`` (already weighted) while
training in the soft stage:

    L = sbl_alpha * sum_i pbar_i * fbar_i  + sign * sbl_lambda * mean_x H(p(x))

pbar_i is the mean router probability of expert i over the real tokens, fbar_i the fraction of the
top-k (k = ``k``) assignments that go to i, H the entropy in nats. ``entropy_sign: sharpen`` (the
default, the paper's text) uses sign = +1, so minimising L lowers the entropy; ``flatten`` (the
paper's equation as printed) uses sign = -1, so minimising L raises it. The load term sum_i pbar_i
fbar_i is 1/E under uniform routing and 1 when one expert takes every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lomix.errors import ConfigError, RoutingError
from lomix.routers.base import RouterConfig, register_router
from lomix.routers.topk import LinearGate
from lomix.routing import RoutingContext, TokenRouting

STAGES = ("hard", "soft")


def specialization_balance_loss(
    probs: torch.Tensor,
    k: int,
    alpha: float,
    lam: float,
    entropy_sign: str = "sharpen",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * sum_i pbar_i * fbar_i + sign * lam * mean H(p); sign +1 for ``sharpen``, -1 for ``flatten``.

    probs (N, E) router probabilities; fbar from each token's top-``k`` experts; mask (N,) bool of
    real tokens (padding left out of every mean).
    """
    if entropy_sign not in ("sharpen", "flatten"):
        raise ConfigError("router.entropy_sign", f"must be 'sharpen' or 'flatten', got {entropy_sign!r}")
    if mask is not None:
        probs = probs[mask]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    num_experts = probs.shape[-1]
    indices = probs.topk(k, dim=-1).indices
    fraction = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    load = (probs.mean(dim=0) * fraction).sum()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    sign = 1.0 if entropy_sign == "sharpen" else -1.0
    return alpha * load + sign * lam * entropy


@dataclass
class LoRAMixerRouterConfig(RouterConfig):
    """LoRA-Mixer routing: hard (label-routed) or soft (softmax; sparse top-K at inference) stage."""

    stage: Literal["hard", "soft"] = field(
        default="soft",
        metadata={
            "help": "hard: each sequence's tokens go to expert task_ids[b] (label routing, the hard stage); "
            "soft: softmax routing (dense fusion in training, top-k at inference)"
        },
    )
    k: int = field(default=3, metadata={"help": "K experts per token at inference (paper: 3), and for fbar in the SBL"})
    inference: Literal["topk", "dense"] = field(
        default="topk",
        metadata={"help": "soft stage in eval mode: topk (sparse top-K, renormalised gates) or dense softmax fusion"},
    )
    straight_through: bool = field(
        default=False,
        metadata={
            "help": "soft stage in training: top-k gates in the forward, the dense softmax's gradient in the "
            "backward (straight-through); false: dense softmax fusion"
        },
    )
    sbl_alpha: float = field(
        default=0.0,
        metadata={"help": "coefficient alpha of the SBL load term sum_i pbar_i * fbar_i (0 disables it)"},
    )
    sbl_lambda: float = field(
        default=0.0,
        metadata={"help": "coefficient lambda of the SBL entropy term lambda * mean H(p(x)) (0 disables it)"},
    )
    entropy_sign: Literal["sharpen", "flatten"] = field(
        default="sharpen",
        metadata={
            "help": "sign of the SBL entropy term: sharpen adds +lambda*H (minimising lowers the entropy, the "
            "paper's text); flatten adds -lambda*H (the paper's equation as printed)"
        },
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of the router weight (E x d_in)"})

    def validate(self, num_experts: int) -> None:
        if self.stage not in STAGES:
            raise ConfigError("router.stage", f"must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if not 1 <= self.k <= num_experts:
            raise ConfigError("router.k", f"must be between 1 and num_experts={num_experts}, got {self.k}")
        if self.inference not in ("topk", "dense"):
            raise ConfigError("router.inference", f"must be 'topk' or 'dense', got {self.inference!r}")
        if self.entropy_sign not in ("sharpen", "flatten"):
            raise ConfigError("router.entropy_sign", f"must be 'sharpen' or 'flatten', got {self.entropy_sign!r}")
        for name in ("sbl_alpha", "sbl_lambda", "init_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"router.{name}", f"must be >= 0, got {getattr(self, name)}")


@register_router("loramixer", LoRAMixerRouterConfig)
class LoRAMixerRouter(LinearGate):
    """See the module docstring. ``used`` (E,) marks the experts the hard stage routed tokens to in
    training since the last `lomix.loramixer.freeze_unrouted_experts` step."""

    def __init__(self, config: LoRAMixerRouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        self.register_buffer("used", torch.zeros(num_experts, dtype=torch.bool), persistent=False)

    @classmethod
    def attach_optimizer(cls, model: nn.Module, optimizer: Any) -> Any:
        """The hard stage: expert j moves only on batches of domain j (`lomix.loramixer.freeze_unrouted_experts`)."""
        from lomix.methods.loramixer.library import freeze_unrouted_experts  # the method's helpers import this module

        return freeze_unrouted_experts(model, optimizer)

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        if self.config.stage == "hard":
            return self._label_routed(x, context)
        logits = self.logits(x)
        probs = logits.softmax(dim=-1)
        n, experts = probs.shape
        aux = {}
        if self.training and (self.config.sbl_alpha > 0 or self.config.sbl_lambda > 0):
            aux["loss_sbl"] = specialization_balance_loss(
                probs, self.config.k, self.config.sbl_alpha, self.config.sbl_lambda, self.config.entropy_sign,
                context.token_mask(n),
            )  # fmt: skip
        dense_fusion = not self.config.straight_through if self.training else self.config.inference == "dense"
        if dense_fusion:
            indices = torch.arange(experts, device=probs.device).expand(n, -1)
            return TokenRouting(indices=indices, gates=probs, probs=probs, logits=logits, aux=aux)
        top, indices = probs.topk(self.config.k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        if not self.training:
            return TokenRouting(indices=indices, gates=top, probs=probs, logits=logits, aux=aux)
        # Straight-through: the forward value is the sparse renormalised top-k, the backward the softmax's.
        hard = torch.zeros_like(probs).scatter(-1, indices, top)
        gates = probs + (hard - probs).detach()
        dense = torch.arange(experts, device=probs.device).expand(n, -1)
        return TokenRouting(indices=dense, gates=gates, probs=probs, logits=logits, aux=aux)

    def _label_routed(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        if context.task_ids is None:
            raise RoutingError(
                "router.stage=hard routes each sequence to the expert of its domain and needs task_ids "
                "(pass task_ids=... to the model's forward, or use lomix.routing_context)"
            )
        if x.dim() < 2:
            raise RoutingError(f"router.stage=hard needs (batch, ..., d_in) inputs, got shape {tuple(x.shape)}")
        batch = x.shape[0]
        task_ids = context.for_batch(batch).task_ids.to(x.device)
        bad = task_ids[(task_ids < 0) | (task_ids >= self.num_experts)]
        if bad.numel():
            raise RoutingError(
                f"router.stage=hard: task id {int(bad[0])} has no expert; the layer has {self.num_experts} "
                "experts (mixture.num_experts must be at least the number of domains)"
            )
        per_sequence = x.numel() // (self.d_in * batch)
        indices = task_ids.repeat_interleave(per_sequence).unsqueeze(1)
        if self.training:
            self.used[task_ids.unique()] = True
        gates = torch.ones(indices.shape, dtype=torch.float32, device=x.device)
        return TokenRouting(indices=indices, gates=gates)


__all__ = ["LoRAMixerRouter", "LoRAMixerRouterConfig", "specialization_balance_loss"]
