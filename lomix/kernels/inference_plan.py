"""The evaluation path of a softmax top-k mixture layer, decided once, and layers that share an input.

At batch 1 a decode step's math per mixture layer is a few small GEMMs, and the Python that picks
the path (backend, the router's rule, dtypes, dense or selected experts, module attribute lookups)
costs as much again. Two things remove most of it:

* `InferencePlan`: a layer keeps the outcome of those checks and re-verifies on each call only what
  they depend on (cheap reads of its own attributes).
* `SiblingGroup`: the mixture layers that read the SAME input tensor one after another (q/k/v of an
  attention block, gate/up of a feed-forward) compute their routers and shrinks in one GEMM and
  their gates in one pass, made by the first of them; the others find their gated intermediate
  ready and only expand it. Groups are observed, not declared: a plan that sees the tensor the
  previous plan call saw (same object, same version counter, same model) joins that plan's group,
  and a member that finds the group's result made from another input leaves the group apart. A
  cross-attention's k/v (reading the encoder's states) never join their q.

Same math as `softmax_topk_dense_inference` (the grouped GEMM may round differently in the last
bit). Plans exist only without autograd and with no routing kept; ``train()`` / ``eval()`` drops
them, and they are not pickled or deep-copied with the layer.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .fused import SoftmaxTopK, plain_linear
from .routed_dense import (
    _FactorCache,
    cached_factors,
    gated_hidden,
    reads_selected_experts,
    router_has_hooks,
    selected_experts_inference,
)
from .torch_backend import prefers_dense

# Off: plans never form groups (benchmarks/decode.py measures what the groups save this way).
SIBLING_GROUPS = True

# The previous plan call of this thread: (weakref to its input, the input's version, weakref to the plan).
_previous = threading.local()


class InferencePlan:
    """A `MixtureLinear`'s evaluation path, reused while nothing it depends on changed.

    Depends on: the layer's mode and flags (training, disabled, record_routing, shared_routing,
    kernel), x's dtype and device, the layer's base layer and router objects and their hooks, the
    router's rule, the path for each token count (``LOMIX_KERNEL`` is read when the plan is made).
    The factors' cache (`cached_factors`) still follows every weight update. ``plan(x)`` returns
    None when any of it no longer holds; the layer then drops the plan and takes its general path.
    Built by `MixtureLinear` only after `softmax_topk_dense_rule` accepted a call.
    """

    __slots__ = ("__weakref__", "base", "device", "dtype", "group", "kernel", "layer", "paths")

    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        self.layer = layer
        self.base = layer.base_layer  # its output dtype for x's dtype was checked by the general path
        self.kernel = layer.kernel
        self.dtype, self.device = x.dtype, x.device
        self.paths: dict[int, str | None] = {}  # token count -> "dense" | "selected" | None (general path)
        self.group: SiblingGroup | None = None

    def factors(self) -> tuple[SoftmaxTopK, torch.Tensor, _FactorCache] | None:
        """(the router's rule, A (E, r, d_in), the factors' cache), or None when the plan no longer holds."""
        layer = self.layer
        state = layer.__dict__
        if (
            state["training"]
            or state["disabled"]
            or state["record_routing"]
            or state["shared_routing"] is not None
            or state["kernel"] != self.kernel
        ):
            return None
        modules = layer._modules
        router = modules["router"]
        if modules["base_layer"] is not self.base or router_has_hooks(router):
            return None
        rule = router.softmax_topk_rule()  # each call: the router's weight may have been replaced
        experts = modules["experts"]._parameters
        A, B = experts["A"], experts["B"]
        if rule is None or rule.weight.dtype != self.dtype or A.dtype != self.dtype or B.dtype != self.dtype:
            return None
        return rule, A, cached_factors(layer, rule, A, B)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """base(x) + the routed delta, (..., d_out); None when the plan no longer applies."""
        if x.dtype != self.dtype or x.device != self.device:
            return None
        factors = self.factors()
        if factors is None:
            return None
        rule, A, cache = factors
        num_experts, rank, d_in = A.shape
        if not d_in or x.numel() % d_in:
            return None
        layer = self.layer
        tokens = x.numel() // d_in
        path = self.paths.get(tokens, "unknown")
        if path == "unknown":
            path = self.paths[tokens] = _inference_path(num_experts, rank, d_in, layer.d_out, rule.k, tokens)
        if path is None:
            return None
        base = self.base
        out = F.linear(x, base.weight, base.bias) if plain_linear(base, x) else base(x)
        state = layer.__dict__
        if state["aux_losses"] or state["last_routing"] is not None:  # (module attribute writes are slow)
            layer.aux_losses, layer.last_routing = {}, None
        flat = x.reshape(tokens, d_in)
        out2d = out.reshape(tokens, -1)
        if path == "selected":
            return selected_experts_inference(A, flat, out2d, rule, cache).view(out.shape)
        hidden = self.group.hidden(self, x, flat, rule, cache) if self.group is not None else None
        if hidden is None:
            hidden = gated_hidden(flat, cache.stacked_t, 1, rank, rule)[:, 0]
        self._observe(x, rule, A)
        return torch.addmm(out2d, hidden, cache.expand).view(out.shape)

    def _observe(self, x: torch.Tensor, rule: SoftmaxTopK, A: torch.Tensor) -> None:
        """Join the previous plan call's group when it read this very input; then be the previous call."""
        previous = getattr(_previous, "call", None)
        if previous is not None and self.group is None and SIBLING_GROUPS:
            seen, version, plan_ref = previous
            plan = plan_ref()
            if plan is not None and plan is not self and seen() is x and version == x._version:
                SiblingGroup.join(plan, self, rule, A)
        _previous.call = (weakref.ref(x), x._version, weakref.ref(self))


class SiblingGroup:
    """Mixture layers of one model that read the same input one after another, in call order.

    The first member's call computes every member's gated intermediate with one GEMM against the
    members' stacked [routers; shrinks] (`gated_hidden`) and keeps it with the input it came from;
    each later member's call takes its slice when its input is that same tensor and its factors are
    those the result was made with. Members share E, r, k, the renormalisation, d_in, dtype and
    device (checked when they join). The kept result is one tuple, replaced whole, so a thread
    never reads another thread's half-written result.
    """

    __slots__ = ("key", "members", "rank", "result", "stacked_t")

    def __init__(self, first: InferencePlan) -> None:
        self.members: list[InferencePlan] = [first]
        self.key: tuple | None = None  # the members' factor-cache keys stacked_t was built from
        self.stacked_t: torch.Tensor | None = None
        self.rank = 0  # r of every member's experts, read when stacked_t is built
        self.result: tuple | None = None  # (weakref to the input, its version, members' keys, hidden (T, L, E*r))

    @staticmethod
    def join(previous: InferencePlan, plan: InferencePlan, rule: SoftmaxTopK, A: torch.Tensor) -> None:
        """Add ``plan`` after ``previous`` (which read the same input just before) when they match."""
        group = previous.group
        if group is not None and group.members[-1] is not previous:
            return  # only at the end of a group: call order is the members' order
        theirs = previous.factors()
        if theirs is None or previous.layer._context is not plan.layer._context:
            return
        their_rule, their_A, _ = theirs
        if (their_rule.k, their_rule.renormalize) != (rule.k, rule.renormalize):
            return
        if their_A.shape != A.shape or (previous.dtype, previous.device) != (plan.dtype, plan.device):
            return
        if group is None:
            group = previous.group = SiblingGroup(previous)
        group.members.append(plan)
        plan.group = group
        group.result = None

    def hidden(
        self, plan: InferencePlan, x: torch.Tensor, flat: torch.Tensor, rule: SoftmaxTopK, cache: _FactorCache
    ) -> torch.Tensor | None:
        """``plan``'s gated intermediate (T, E*r) for input x, or None (then it computes its own)."""
        index = self.members.index(plan) if plan is not self.members[0] else 0
        if index == 0:
            return self._compute(x, flat, rule, cache)
        result = self.result
        if result is not None:
            seen, version, keys, hidden = result
            if seen() is x and version == x._version and keys[index] == cache.key:
                return hidden[:, index]
        self.dissolve()  # a member read another input (or the first did not run): stop computing for it
        return None

    def _compute(
        self, x: torch.Tensor, flat: torch.Tensor, rule: SoftmaxTopK, cache: _FactorCache
    ) -> torch.Tensor | None:
        caches = [cache]
        for member in self.members[1:]:
            factors = member.factors()
            if factors is None or (factors[0].k, factors[0].renormalize) != (rule.k, rule.renormalize):
                self.dissolve()  # a member left the fast path or its rule changed since it joined
                return None
            caches.append(factors[2])
        key = tuple(c.key for c in caches)
        if key != self.key:
            if len({c.stacked_t.shape for c in caches}) != 1:  # a bank was replaced by one of another shape
                self.dissolve()
                return None
            num_experts, self.rank = self.members[0].layer.experts.A.shape[:2]
            routers = [c.stacked_t[:, :num_experts] for c in caches]
            shrinks = [c.stacked_t[:, num_experts:] for c in caches]
            self.stacked_t = torch.cat(routers + shrinks, dim=1)  # (d_in, L*E + L*E*r)
            self.key = key  # holds every member's A shape: rank stays right while the key does
        hidden = gated_hidden(flat, self.stacked_t, len(self.members), self.rank, rule)
        self.result = (weakref.ref(x), x._version, key, hidden)
        return hidden[:, 0]

    def dissolve(self) -> None:
        """Every member computes alone again (and may join a new group by observation)."""
        for member in self.members:
            member.group = None
        self.members, self.result, self.stacked_t, self.key = [], None, None, None


def _inference_path(num_experts: int, rank: int, d_in: int, d_out: int, k: int, tokens: int) -> str | None:
    """'dense' or 'selected' (the two branches of `softmax_topk_dense_inference`), or None when the
    sorted strategy wins (`prefers_dense`): the layer's general path then runs."""
    if not prefers_dense(num_experts, rank, d_in, d_out, k, tokens):
        return None
    return "selected" if reads_selected_experts(num_experts, k, tokens) else "dense"
