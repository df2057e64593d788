"""Routing statistics: what the routers of a mixture did over some data.

`RoutingStats` accumulates, per mixture layer and over any number of forward passes, the quantities
that say whether routing is healthy and that MC-SMoE merging needs:

- load: how often each expert is selected (fraction of tokens whose selection includes it);
- experts per token: the mean and the histogram of how many experts (non-zero gates) a token uses,
  which varies for routers such as top-p and expert-choice;
- mean router probability per expert, router entropy and the effective support of the gates,
  ||g||_1^2 / ||g||_2^2 per token (k for equal gates, 1 when one expert takes all), and the same
  figure of the full router distribution (``prob_support``: how many experts the router spreads over);
- the router-logit Gram matrix H^T H and column sums, from which the cosine similarity of any two
  experts' logit columns over all tokens follows exactly, without keeping H.

Padding tokens are skipped when the batch's attention mask describes the layer's tokens.

    with lomix.stats.RoutingStats(model) as stats:
        for batch in data:
            model(**batch)
    report = stats.summary()   # per layer: load, entropy, effective support, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .inject import mixture_layers
from .layer import MixtureLinear
from .routing import ParameterMixing, RoutingContext, TokenRouting


def effective_support(gates: torch.Tensor) -> torch.Tensor:
    """(N, k) gates (or (N, E) probabilities) -> (N,) ||g||_1^2 / ||g||_2^2 per row (0 for all-zero rows)."""
    gates = gates.float().abs()
    l1 = gates.sum(-1)
    l2 = gates.pow(2).sum(-1)
    return torch.where(l2 > 0, l1.pow(2) / l2.clamp_min(1e-30), torch.zeros_like(l1))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N, E) probabilities -> (N,) entropy in nats."""
    probs = probs.float()
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


@dataclass
class LayerStats:
    """Running sums for one layer. Counts are over real (unmasked) tokens."""

    num_experts: int
    tokens: int = 0
    selected: torch.Tensor | None = None  # (E,) tokens whose selection includes the expert (gate > 0)
    experts_count: torch.Tensor | None = None  # (E + 1,) tokens that use 0, 1, ..., E experts
    gate_mass: torch.Tensor | None = None  # (E,) summed gates
    prob_sum: torch.Tensor | None = None  # (E,) summed router probabilities
    entropy_sum: float = 0.0
    support_sum: float = 0.0
    prob_support_sum: float = 0.0  # effective support of the full router distribution
    logit_gram: torch.Tensor | None = None  # (E, E) H^T H
    logit_sum: torch.Tensor | None = None  # (E,)
    has_probs: bool = False
    has_logits: bool = False
    mixing_sum: torch.Tensor | None = None  # (h, E) ParameterMixing weights summed over sequences
    sequences: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64)

    def add_tokens(self, routing: TokenRouting, mask: torch.Tensor | None) -> None:
        indices, gates = routing.indices, routing.gates.detach()
        probs = routing.probs.detach() if routing.probs is not None else None
        logits = routing.logits.detach() if routing.logits is not None else None
        if mask is not None:
            mask = mask.to(indices.device)
            indices, gates = indices[mask], gates[mask]
            probs = probs[mask] if probs is not None else None
            logits = logits[mask] if logits is not None else None
        n, e = indices.shape[0], self.num_experts
        if self.selected is None:
            self.selected, self.gate_mass = self._zeros(e), self._zeros(e)
            self.experts_count = self._zeros(e + 1)
        chosen = torch.zeros(n, e, dtype=torch.float64, device=indices.device)
        chosen.scatter_add_(1, indices, gates.double())
        self.selected += (chosen > 0).sum(0).double().cpu()
        self.experts_count += torch.bincount((chosen > 0).sum(1), minlength=e + 1).double().cpu()
        self.gate_mass += chosen.sum(0).cpu()
        self.support_sum += effective_support(chosen).sum().item()
        self.tokens += n
        if probs is not None:
            self.has_probs = True
            self.prob_sum = (self.prob_sum if self.prob_sum is not None else self._zeros(e)) + probs.double().sum(
                0
            ).cpu()
            self.entropy_sum += entropy(probs).sum().item()
            self.prob_support_sum += effective_support(probs).sum().item()
        if logits is not None:
            self.has_logits = True
            h = logits.double()
            gram = (h.T @ h).cpu()
            self.logit_gram = gram if self.logit_gram is None else self.logit_gram + gram
            self.logit_sum = (self.logit_sum if self.logit_sum is not None else self._zeros(e)) + h.sum(0).cpu()

    def add_mixing(self, routing: ParameterMixing) -> None:
        weights = routing.weights.detach().double().cpu()
        summed = weights.sum(0)
        self.mixing_sum = summed if self.mixing_sum is None else self.mixing_sum + summed
        self.sequences += weights.shape[0]

    # ------------------------------------------------------------------ derived figures

    @property
    def load(self) -> torch.Tensor:
        """(E,) fraction of tokens whose selection includes each expert (MC-SMoE's f_i)."""
        return self.selected / max(self.tokens, 1)

    @property
    def mean_prob(self) -> torch.Tensor | None:
        return self.prob_sum / max(self.tokens, 1) if self.has_probs else None

    def logit_cosine(self) -> torch.Tensor | None:
        """(E, E) cosine similarity of the experts' router-logit columns over all tokens seen."""
        if not self.has_logits:
            return None
        norms = self.logit_gram.diagonal().clamp_min(1e-30).sqrt()
        return self.logit_gram / (norms[:, None] * norms[None, :])

    def logit_summary(self) -> dict | None:
        """Per expert: mean and standard deviation of its router logit over the tokens seen, and the
        (E, E) cosine similarity of the logit columns (MC-SMoE's similarity is (cos + 1) / 2)."""
        if not self.has_logits:
            return None
        n = max(self.tokens, 1)
        mean = self.logit_sum / n
        variance = (self.logit_gram.diagonal() / n - mean.pow(2)).clamp_min(0)
        return {"mean": mean.tolist(), "std": variance.sqrt().tolist(), "cosine": self.logit_cosine().tolist()}

    def summary(self) -> dict:
        out: dict = {"tokens": self.tokens}
        if self.selected is not None:
            out["load"] = self.load.tolist()
            out["gate_share"] = (self.gate_mass / self.gate_mass.sum().clamp_min(1e-30)).tolist()
            out["effective_support"] = self.support_sum / max(self.tokens, 1)
            histogram = self.experts_count / max(self.tokens, 1)
            out["experts_per_token"] = float((histogram * torch.arange(len(histogram))).sum())
            out["experts_per_token_histogram"] = histogram.tolist()  # fraction of tokens using 0..E experts
        if self.has_probs:
            out["mean_prob"] = self.mean_prob.tolist()
            out["entropy"] = self.entropy_sum / max(self.tokens, 1)
            out["prob_support"] = self.prob_support_sum / max(self.tokens, 1)
        if self.mixing_sum is not None:
            out["mean_mixing"] = (self.mixing_sum / max(self.sequences, 1)).tolist()
            out["sequences"] = self.sequences
        return out


class RoutingStats:
    """Accumulate routing statistics of every mixture layer while active (a context manager).

    With ``training_only`` only forwards of layers in training mode count (a training loop that
    also runs held-out evaluations); `reset` starts new sums (one window of a training log).
    """

    def __init__(self, model: nn.Module, training_only: bool = False):
        self.model = model
        self.training_only = training_only
        self.layers: dict[str, LayerStats] = {}
        self._hooks: list = []
        self._recording: dict[str, bool] = {}

    def __enter__(self) -> RoutingStats:
        for name, layer in mixture_layers(self.model):
            self._recording[name] = layer.record_routing
            layer.record_routing = True
            # Router experts, not bank experts: a merged layer routes over more experts than it stores.
            self.layers.setdefault(name, LayerStats(layer.router.num_experts))
            self._hooks.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, layer in mixture_layers(self.model):
            layer.record_routing = self._recording.get(name, False)
            layer.last_routing = None

    def reset(self) -> None:
        """Forget what was gathered so far (the layers stay hooked)."""
        self.layers = {name: LayerStats(stats.num_experts) for name, stats in self.layers.items()}

    def _hook(self, name: str):
        def hook(module: MixtureLinear, args, output) -> None:
            if self.training_only and not module.training:
                return
            routing = module.last_routing
            if isinstance(routing, TokenRouting):
                context: RoutingContext = module._context.get()
                self.layers[name].add_tokens(routing, context.token_mask(routing.num_tokens))
            elif isinstance(routing, ParameterMixing):
                self.layers[name].add_mixing(routing)

        return hook

    def summary(self) -> dict[str, dict]:
        """{layer name: LayerStats.summary()} for every layer that saw tokens or sequences."""
        return {name: stats.summary() for name, stats in self.layers.items() if stats.tokens or stats.sequences}
