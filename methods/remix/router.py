"""ReMix: k distinct experts with equal, constant weights, chosen by a softmax router that is
trained with the RLOO estimator (METHODS.md section 3).

    q = softmax(P x),  I = k distinct experts,  y = W x + omega * sum_{i in I} B_i A_i x

Training samples I without replacement from q (Gumbel-top-k, which is sequential sampling) and
reports the selection's log-probability

    log Q(I) = sum_j [ log q_{i_j} - log(1 - sum_{j' < j} q_{i_j'}) ]

in ``TokenRouting.log_prob``; inference takes the deterministic top-k of q. The gates never depend
on P, so the router gets no gradient through the forward: its gradient is the RLOO estimate
``lomix.rloo.rloo_surrogate`` builds from M >= 2 selections per example (the recipe replicates the
batch M times). By construction the effective support of the gates is exactly k.

Granularity:
  * ``sequence`` (the paper's): one selection per sequence and layer, from q = softmax(P xbar),
    xbar the mean of the layer's input over the sequence's real tokens (the attention mask). Every
    token of the row uses that selection. Its log Q is split equally over the row's real tokens, so
    summing ``log_prob`` over a row's tokens gives log Q once (padding tokens carry 0).
  * ``token``: one selection per token; a row's log Q is the sum over its tokens (still unbiased,
    higher variance).

A sequence-level selection is made from the tokens of ONE forward call: a KV-cached continuation
(the choices after a cached prompt, token-by-token decoding) would be routed on the new tokens
alone. The lomix recipes therefore score and generate without a cache for such routers
(``RemixRouterConfig.needs_whole_sequences``); do the same in your own generation code, or use
token granularity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from lomix.errors import ConfigError, RoutingError
from lomix.routers.base import RouterConfig, register_router
from lomix.routers.topk import LinearGate
from lomix.routing import RoutingContext, TokenRouting

if TYPE_CHECKING:
    from lomix.config import MixtureConfig


@dataclass
class RemixRouterConfig(RouterConfig):
    """ReMix: k distinct experts sampled from a softmax router, equal constant gates, RLOO training."""

    # Routers whose selection is sampled name the estimator that trains them; the recipe reads it.
    estimator: ClassVar[str] = "rloo"

    k: int = field(default=2, metadata={"help": "distinct experts per selection (1 <= k <= num_experts)"})
    granularity: Literal["sequence", "token"] = field(
        default="sequence",
        metadata={
            "help": "sequence: one selection per sequence and layer, routed on the mean of its real tokens (the "
            "paper's); token: one selection per token (log Q summed over tokens; unbiased, more variance)"
        },
    )
    omega: Literal["lora", "rslora"] = field(
        default="lora",
        metadata={
            "help": "the constant weight of each selected expert: lora = omega_alpha / (k r), "
            "rslora = omega_alpha / sqrt(k r)"
        },
    )
    omega_alpha: float = field(
        default=2.0,
        metadata={
            "help": "numerator of omega (the paper's 2); set it to mixture.alpha to weigh each selected expert "
            "as equal top-k gates (1/k) at the mixture's scale alpha / r would"
        },
    )
    detach_input: bool = field(
        default=True,
        metadata={
            "help": "route on a detached copy of the layer input: the RLOO term then trains the router alone and "
            "the experts get the plain backprop of the mean loss (the paper's split); false also sends the "
            "score-function term into the experts of earlier layers (the full gradient of the expected loss, "
            "with more variance)"
        },
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of the router weight (E x d_in)"})

    def validate(self, num_experts: int) -> None:
        if not 1 <= self.k <= num_experts:
            raise ConfigError("router.k", f"must be between 1 and num_experts={num_experts}, got {self.k}")
        if not self.omega_alpha > 0:
            raise ConfigError("router.omega_alpha", f"must be > 0, got {self.omega_alpha}")
        if self.init_std < 0:
            raise ConfigError("router.init_std", f"must be >= 0, got {self.init_std}")

    def mixture_defaults(self) -> dict[str, Any]:
        """No Switch loss unless the user sets one (which `validate_mixture` then refuses)."""
        return {"balance": {"switch": 0.0}}

    def validate_mixture(self, mixture: MixtureConfig) -> None:
        """ReMix has no balance loss: the Switch loss would train the router through its sampled
        indices, beside (and biasing) the RLOO estimate."""
        if mixture.balance.switch > 0:
            raise ConfigError(
                "balance.switch",
                f"must be 0 with the remix router (it is trained by RLOO alone, without a balance loss); "
                f"got {mixture.balance.switch}",
            )

    @property
    def needs_whole_sequences(self) -> bool:
        """True when a forward call must see whole sequences (no KV-cached continuation)."""
        return self.granularity == "sequence"

    def omega_value(self, rank: int) -> float:
        """omega for experts of rank ``rank``."""
        active = self.k * rank
        return self.omega_alpha / (active if self.omega == "lora" else math.sqrt(active))


def gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, E) logits -> (n, k) distinct expert ids, an ordered sample without replacement from
    softmax(logits): the top-k of logits + Gumbel noise, in descending order, is distributed like
    drawing k times in sequence and removing each draw (Kool et al., 2019)."""
    noise = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=generator).log().neg()
    return (logits.float() + noise).topk(k, dim=-1).indices


def sequential_log_prob(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Q of ordered selections: (n, E) logits, (n, k) distinct ids in draw order -> (n,) fp32.

    log Q = sum_j [log q_{i_j} - log(1 - sum_{j'<j} q_{i_j'})]. Each term is computed as
    logit_{i_j} - logsumexp(logits of the experts not drawn before j): the same number (the mass
    left after removing earlier draws is the softmax mass of the remaining experts), without the
    cancellation of 1 - sum q, which in fp32 rounds to 0 (log -> -inf) once an earlier draw holds
    all but ~1e-7 of the mass; log1p(-sum q) avoids the loss only while sum q is not near 1.
    """
    logits = logits.float()
    n, k = indices.shape
    drawn = torch.zeros(n, k, logits.shape[-1], dtype=torch.bool, device=logits.device)
    drawn.scatter_(2, indices.unsqueeze(-1), True)
    before = drawn.cumsum(dim=1) > drawn  # expert drawn at an earlier position than j
    remaining = logits.unsqueeze(1).masked_fill(before, float("-inf"))
    return (logits.gather(1, indices) - torch.logsumexp(remaining, dim=-1)).sum(-1)


@register_router("remix", RemixRouterConfig)
class RemixRouter(LinearGate):
    config: RemixRouterConfig

    def __init__(self, config: RemixRouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        # Set by bind_mixture, which knows the rank r and the LoRA scale s; until then s = 1, r = 1.
        self.omega = self.gate = config.omega_value(1)

    def bind_mixture(self, mixture: MixtureConfig) -> None:
        """Called by the layer with its mixture config: the layer multiplies the gates by the LoRA
        scale s, so gates = omega / s give each selected expert the weight omega exactly."""
        self.omega = self.config.omega_value(mixture.rank)
        self.gate = self.omega / mixture.scale

    def softmax_topk_mismatch(self) -> str:
        return "remix gives the k selected experts equal constant weights, not their softmax probabilities"

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        router_x = x.detach() if self.config.detach_input else x
        n = x.numel() // self.d_in
        k = self.config.k
        if self.config.granularity == "token":
            logits = self.logits(router_x)
            indices, log_prob = self._select(logits)
            probs = logits.softmax(dim=-1)
        else:
            pooled, share, rows = self._pool(router_x, context)
            seq_logits = self.logits(pooled)
            seq_indices, seq_log_prob = self._select(seq_logits)
            indices = seq_indices.repeat_interleave(n // rows, dim=0)
            logits = seq_logits.repeat_interleave(n // rows, dim=0)
            probs = logits.softmax(dim=-1)
            log_prob = None
            if seq_log_prob is not None:
                log_prob = seq_log_prob.repeat_interleave(n // rows, dim=0) * share
        gates = torch.full((n, k), self.gate, dtype=torch.float32, device=x.device)
        return TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits, log_prob=log_prob)

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training:
            return logits.topk(self.config.k, dim=-1).indices, None
        indices = gumbel_top_k(logits.detach(), self.config.k)
        return indices, sequential_log_prob(logits, indices)

    def _pool(self, x: torch.Tensor, context: RoutingContext) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean of each sequence's real tokens: (rows, d_in) fp32, each token's share 1/count (0 on
        padding), and the number of rows. x is (..., seq, d_in); a 2-D x is one sequence."""
        seq = x.shape[-2] if x.dim() >= 2 else 1
        rows = x.numel() // (self.d_in * seq)
        flat = x.reshape(rows, seq, self.d_in).float()
        mask = context.token_mask(rows * seq)
        if mask is None:
            weight = torch.ones(rows, seq, device=x.device)
        else:
            weight = mask.to(x.device).reshape(rows, seq).float()
        count = weight.sum(1, keepdim=True)
        if (count == 0).any():
            raise RoutingError(
                f"remix granularity=sequence: a row of the attention mask has no real token "
                f"(rows {torch.nonzero(count[:, 0] == 0)[:, 0].tolist()}); every sequence needs at least one"
            )
        pooled = (flat * weight.unsqueeze(-1)).sum(1) / count
        return pooled, (weight / count).reshape(-1), rows
