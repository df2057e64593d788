"""The two things a router can return, and what a batch tells routers beyond hidden states.

Layers, kernels, losses and statistics depend on `TokenRouting` and `ParameterMixing` only, never
on a particular router: adding a routing method touches its own file and nothing here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import RoutingError


@dataclass
class TokenRouting:
    """Per-token routing: which experts each token uses and with what weight.

    Shapes (N tokens, k experts per token, E experts in the layer):
        indices:  (N, k) int64, expert ids; a slot with gate 0 contributes nothing, which is how
                  routers with a variable number of experts per token pad their rows.
        gates:    (N, k) float, the weight of each selected expert (differentiable).
        probs:    (N, E) float32 or None, the router's full distribution when it has one.
        logits:   (N, E) float32 or None, the router's logits (z-loss, MC-SMoE statistics).
        log_prob: (N,) float32 or None, log-probability of a sampled selection (RL estimators). A
                  selection shared by several tokens (one per sequence) is split over its tokens,
                  so that summing a sequence's tokens gives the log-probability of its selections
                  once (`lomix.rloo.selection_log_prob`).
        aux:      named auxiliary tensors (statistics or extra losses) the router wants reported.
    """

    indices: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.indices.shape != self.gates.shape or self.indices.dim() != 2:
            raise RoutingError(
                f"TokenRouting needs indices and gates of the same (N, k) shape, got "
                f"{tuple(self.indices.shape)} and {tuple(self.gates.shape)}"
            )

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]


@dataclass
class ParameterMixing:
    """Per-sequence mixing of the experts' PARAMETERS (Poly / MHR).

    Head q of h owns the q-th slice of d_in in A and of d_out in B; its A and B are the weighted
    sums of the experts' slices.

    Shapes:
        weights: (batch, h, E) float, mixing weights per sequence and head.
        aux:     named auxiliary tensors.
    """

    weights: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights.dim() != 3:
            raise RoutingError(
                f"ParameterMixing.weights must be (batch, heads, experts), got {tuple(self.weights.shape)}"
            )

    @property
    def num_heads(self) -> int:
        return self.weights.shape[1]


Routing = TokenRouting | ParameterMixing


@dataclass(frozen=True)
class RoutingContext:
    """What a batch tells the routers beyond hidden states.

    Attributes:
        task_ids: (batch,) int64 task index per sequence, or None.
        task_descriptions: one free-text task description per sequence, or None.
        task_embeddings: (batch, D) embedding of each sequence's task description, or None.
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding, or None.
    """

    task_ids: torch.Tensor | None = None
    task_descriptions: Sequence[str] | None = None
    task_embeddings: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def for_batch(self, batch_size: int) -> RoutingContext:
        """Return the context with per-sequence fields matching ``batch_size`` rows.

        Generation expands a batch of b prompts into b * n rows (beam search,
        ``num_return_sequences``) by repeating each row n times in place (``repeat_interleave``);
        per-sequence routing information must follow that expansion. Anything else is an error.
        """
        updates = {}
        for name in ("task_ids", "task_embeddings", "task_descriptions"):
            value = getattr(self, name)
            if value is None or len(value) == batch_size:
                continue
            if batch_size % len(value):
                raise RoutingError(
                    f"RoutingContext.{name} has {len(value)} rows but the layer sees a batch of "
                    f"{batch_size}; expected equal sizes or a whole multiple (generation expansion)"
                )
            n = batch_size // len(value)
            if isinstance(value, torch.Tensor):
                updates[name] = value.repeat_interleave(n, dim=0)
            else:
                updates[name] = [v for v in value for _ in range(n)]
        return replace(self, **updates) if updates else self

    def token_mask(self, num_tokens: int) -> torch.Tensor | None:
        """(num_tokens,) bool mask of real tokens, when the attention mask describes these tokens.

        A layer may see other tokens than the mask describes (a T5 decoder, a KV-cached decoding
        step): then no mask is returned and every token counts.
        """
        mask = self.attention_mask
        if mask is None or mask.numel() != num_tokens:
            return None
        return mask.reshape(-1).bool()


EMPTY_CONTEXT = RoutingContext()

# Keyword arguments of a wrapped model's forward that carry routing information; they are taken
# out of the call before the base model sees them.
CONTEXT_KWARGS = ("task_ids", "task_descriptions", "task_embeddings")


class ContextHolder:
    """The routing context of ONE wrapped model, shared by all of its mixture layers.

    A forward call of the wrapped model replaces the context (also with an empty one when the call
    carries none), so nothing leaks from one call into the next. The context stays readable after
    the call returns because activation checkpointing re-runs layers during backward. Storage is
    per thread, so two threads running the same model do not see each other's batches. Inside
    ``lomix.routing_context(model, ...)`` the given context overrides every call (generation).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    # A copy of the model (copy.deepcopy, pickling: TRL's reference model, an EMA copy) gets a holder of
    # its own, shared by the copy's layers, with no context: contexts belong to calls, not to models.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def get(self) -> RoutingContext:
        current = getattr(self._local, "current", EMPTY_CONTEXT)
        pinned = getattr(self._local, "pinned", None)
        if pinned:
            # The pinned task information, with this call's own attention mask.
            return replace(pinned[-1], attention_mask=current.attention_mask)
        return current

    def set_current(self, context: RoutingContext) -> None:
        self._local.current = context

    def push_pinned(self, context: RoutingContext) -> None:
        if not hasattr(self._local, "pinned"):
            self._local.pinned = []
        self._local.pinned.append(context)

    def pop_pinned(self) -> None:
        self._local.pinned.pop()

    @property
    def is_pinned(self) -> bool:
        return bool(getattr(self._local, "pinned", None))
