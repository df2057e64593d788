"""Router and experts in one pass on the torch backend, for layers routed by a linear softmax top-k.

The unfused torch path computes the router's logits x W_r^T and the experts' shrink x A_cat^T as
two GEMMs over the same x. Here they are ONE GEMM against the stacked matrix [W_r; A_1; ...; A_E]
((E + E*r) x d_in); the softmax top-k rule is applied to the first E columns, each expert's rank-r
slice of the rest is scaled by its gate (zero for unselected experts) and one addmm expands the
gated intermediate into the base layer's output. Same math as `TopKRouter` followed by
`mixture_lora_dense`, with fewer ops per layer, which is what a CPU step and a one-token decode
step pay for.

Without autograd (evaluation, generation) the stacked router+shrink matrix and the expand matrix
are kept between calls and rebuilt only when a weight changes (a tensor's version counter moves
with every in-place update: an optimizer step, ``load_state_dict``, merging), and an evaluation
that keeps no routing (`softmax_topk_dense_inference`) computes the gates with the fewest ops.
A layer that took that path keeps a `lomix.kernels.inference_plan.InferencePlan` (the outcome of
the checks that chose it, and the sibling layers that read the same input).

`MixtureLinear` takes this path only when `softmax_topk_dense_rule` says so: the router declares a
softmax top-k rule (`Router.softmax_topk_rule`), the torch backend runs, the dense strategy is the
one `mixture_lora_torch` would pick, the router and experts see the same x (no active expert
dropout) in one dtype, and there is no merged-expert map or sparse residual.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..routing import TokenRouting
from .fused import SoftmaxTopK
from .torch_backend import DENSE_MAX_EXPERTS_PER_ACTIVE, prefers_dense


def softmax_topk_dense_rule(layer: nn.Module, x: torch.Tensor, backend: str) -> SoftmaxTopK | None:
    """The router's rule when ``layer`` (a `MixtureLinear`) may run this path on ``x``, else None."""
    if backend != "torch" or layer.expert_map is not None or layer.residual is not None:
        return None
    if layer.training and not isinstance(layer.dropout, nn.Identity):
        return None  # the experts see dropout(x), the router x: two different inputs
    if router_has_hooks(layer.router):
        return None  # a hook on the router (test-time rerouting's logit offsets) must see its call
    rule = layer.router.softmax_topk_rule()
    if rule is None:
        return None
    A = layer.experts.A
    if not (x.dtype == A.dtype == rule.weight.dtype) or x.dim() < 1 or x.device != A.device:
        return None
    num_experts, rank, d_in = A.shape
    tokens = x.numel() // d_in if d_in else 0
    if not prefers_dense(num_experts, rank, d_in, layer.experts.B.shape[1], rule.k, tokens):
        return None
    return rule


def router_has_hooks(router: nn.Module) -> bool:
    """Whether calling ``router`` would run forward hooks (its own or global ones)."""
    return bool(
        router._forward_hooks
        or router._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
    )


class _FactorCache:
    """The stacked matrices of one layer, reused while no weight changed (inference only):
    stacked_t (d_in, E + E*r) = [W_r; A_1..A_E]^T, contiguous for the GEMM, and expand (E*r, d_out) =
    s * [B_1^T; ...; B_E^T] with the LoRA scale s folded in (one multiply fewer per call)."""

    __slots__ = ("expand", "key", "stacked_t")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.stacked_t: torch.Tensor | None = None
        self.expand: torch.Tensor | None = None


def _stack(router_weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stacked (E + E*r, d_in) = [W_r; A_1..A_E], expand (E*r, d_out) = [B_1^T; ...; B_E^T])."""
    num_experts, rank, d_in = A.shape
    stacked = torch.cat([router_weight, A.reshape(num_experts * rank, d_in)])
    expand = B.transpose(1, 2).reshape(num_experts * rank, B.shape[1])
    return stacked, expand


def _needs_graph(layer: nn.Module, rule: SoftmaxTopK) -> bool:
    A, B, weight = layer.experts.A, layer.experts.B, rule.weight
    return torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or weight.requires_grad)


def cached_factors(layer: nn.Module, rule: SoftmaxTopK, A: torch.Tensor, B: torch.Tensor) -> _FactorCache:
    """The layer's inference cache, rebuilt when a weight or the scale changed (see `_FactorCache`).
    A (E, r, d_in) and B (E, d_out, r): the layer's expert factors, as the caller read them."""
    weight = rule.weight
    cache = layer.__dict__.get("_routed_dense_cache")
    if cache is None:
        cache = layer.__dict__["_routed_dense_cache"] = _FactorCache()
    key = (weight.data_ptr(), weight._version, A.data_ptr(), A._version, B.data_ptr(), B._version, A.shape, layer.scale)
    if cache.key != key:
        with torch.no_grad():
            stacked, expand = _stack(weight, A, B)
            cache.stacked_t = stacked.t().contiguous()
            cache.expand = expand * layer.scale
        cache.key = key
    return cache


def _topk_gates(logits: torch.Tensor, rule: SoftmaxTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates (T, k) float32, indices (T, k)) of the router's softmax top-k rule, without the routing
    object. Renormalised top-k gates are the softmax of the k largest logits (the full softmax's
    denominator cancels), so the full softmax, the sum and the division are not needed."""
    logits = logits.float()
    if rule.renormalize:
        top, indices = logits.topk(rule.k, dim=-1)
        return top.softmax(dim=-1), indices
    return logits.softmax(dim=-1).topk(rule.k, dim=-1)


def _gate_matrix(logits: torch.Tensor, rule: SoftmaxTopK) -> torch.Tensor:
    """(..., E) float32: each token's gate on every expert, zero outside its top-k (`_topk_gates`)."""
    gates, indices = _topk_gates(logits, rule)
    return torch.zeros_like(logits, dtype=gates.dtype).scatter_(-1, indices, gates)


def gated_hidden(
    flat: torch.Tensor, stacked_t: torch.Tensor, layers: int, rank: int, rule: SoftmaxTopK
) -> torch.Tensor:
    """(T, L, E*r): the gated rank-(E*r) intermediate of L layers that read the same input, from ONE
    GEMM of flat (T, d_in) against stacked_t (d_in, L*E + L*E*r) = [W_r of each layer; A_1..A_E of
    each layer]^T (L = 1: `_FactorCache.stacked_t`). Each layer's slice, times its scaled expand
    matrix, is its routed delta."""
    tokens = flat.shape[0]
    num_experts = (stacked_t.shape[1] // layers) // (1 + rank)
    projected = torch.mm(flat, stacked_t)  # (T, L*E + L*E*r): the routers' logits, then every shrink
    logits = projected[:, : layers * num_experts].view(tokens, layers, num_experts)
    gates = _gate_matrix(logits, rule).to(flat.dtype)
    hidden = projected[:, layers * num_experts :].view(tokens, layers, num_experts, rank) * gates.unsqueeze(-1)
    return hidden.view(tokens, layers, num_experts * rank)


def softmax_topk_dense_inference(
    layer: nn.Module, x: torch.Tensor, out: torch.Tensor, rule: SoftmaxTopK
) -> torch.Tensor:
    """out + the routed delta (..., d_out) without autograd and with no routing kept (evaluation,
    generation): the fewest ops per layer, which is what a one-token decode step pays for.

    x (..., d_in) and out (..., d_out) in the experts' dtype. Same math as `softmax_topk_dense_forward`:
    one GEMM against the cached [W_r; A_1..A_E]^T, the gate matrix from the first E columns
    (`_gate_matrix`), the gated rank-(E*r) intermediate expanded into ``out`` by one addmm against
    the cached, scaled expand matrix. With many experts and few tokens (T*k < E and E > 4k) only the
    selected experts' factors are read instead (`selected_experts_inference`)."""
    experts = layer.experts._parameters
    A, B = experts["A"], experts["B"]
    num_experts, rank, d_in = A.shape
    flat = x.reshape(-1, d_in)
    tokens = flat.shape[0]
    cache = cached_factors(layer, rule, A, B)
    out2d = out.reshape(tokens, -1)
    if reads_selected_experts(num_experts, rule.k, tokens):
        return selected_experts_inference(A, flat, out2d, rule, cache).view(out.shape)
    hidden = gated_hidden(flat, cache.stacked_t, 1, rank, rule)[:, 0]
    return torch.addmm(out2d, hidden, cache.expand).view(out.shape)


def reads_selected_experts(num_experts: int, k: int, tokens: int) -> bool:
    """Whether an inference call reads only the selected experts' factors (few tokens, many experts)."""
    return tokens * k < num_experts and num_experts > DENSE_MAX_EXPERTS_PER_ACTIVE * k


def selected_experts_inference(
    A: torch.Tensor, flat: torch.Tensor, out2d: torch.Tensor, rule: SoftmaxTopK, cache: _FactorCache
) -> torch.Tensor:
    """A few tokens over many experts (a decode step, E > 4k): the router first, then only the k
    selected experts' A and B (T*k*r rows each) are gathered, so the adapter reads the bytes of one
    LoRA of rank k*r instead of all E experts'. A (E, r, d_in), flat (T, d_in), out2d (T, d_out) -> (T, d_out)."""
    num_experts, rank, d_in = A.shape
    tokens, k = flat.shape[0], rule.k
    gates, indices = _topk_gates(torch.mm(flat, cache.stacked_t[:, :num_experts]), rule)
    chosen = indices.reshape(-1)
    a_rows = A.index_select(0, chosen).view(tokens, k * rank, d_in)
    b_rows = cache.expand.view(num_experts, rank, -1).index_select(0, chosen).view(tokens, k * rank, -1)
    hidden = torch.bmm(a_rows, flat.unsqueeze(-1)).view(tokens, k, rank) * gates.to(flat.dtype).unsqueeze(-1)
    return torch.baddbmm(out2d.unsqueeze(1), hidden.view(tokens, 1, k * rank), b_rows).view(tokens, -1)


def softmax_topk_dense_forward(
    layer: nn.Module, x: torch.Tensor, out: torch.Tensor, rule: SoftmaxTopK
) -> tuple[torch.Tensor, TokenRouting]:
    """(out + routed delta (..., d_out), routing) of a `MixtureLinear` whose base output is ``out``:
    the path of a training forward, or of an evaluation that keeps its routing (statistics).

    x (..., d_in), out (..., d_out), both in the experts' dtype. The routing holds the same indices, gates, probs
    and logits as the router's own forward.
    """
    A = layer.experts.A
    num_experts, rank, d_in = A.shape
    flat = x.reshape(-1, d_in)
    tokens = flat.shape[0]
    if _needs_graph(layer, rule):
        stacked, expand = _stack(rule.weight, A, layer.experts.B)  # in the graph: gradients reach W_r, A, B
        projected = flat @ stacked.t()  # (T, E + E*r): router logits, then every expert's shrink
        scale = layer.scale
    else:
        cache = cached_factors(layer, rule, A, layer.experts.B)
        projected, expand, scale = torch.mm(flat, cache.stacked_t), cache.expand, 1.0  # scale is in expand
    logits, hidden = projected.split([num_experts, num_experts * rank], dim=1)
    logits = logits.float()  # the router's logits are float32 (a no-op for float32 inputs)
    probs = logits.softmax(dim=-1)
    gates, indices = probs.topk(rule.k, dim=-1)
    if rule.renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    # (T, E) gate matrix times the scale, then each expert's rank-r slice of the intermediate.
    gate_matrix = flat.new_zeros(tokens, num_experts).scatter(1, indices, gates.to(flat.dtype) * scale)
    hidden = (hidden.view(tokens, num_experts, rank) * gate_matrix.unsqueeze(-1)).view(tokens, num_experts * rank)
    result = torch.addmm(out.reshape(-1, out.shape[-1]), hidden, expand)
    routing = TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)
    return result.view(out.shape), routing
