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
with every in-place update: an optimizer step, ``load_state_dict``, merging).

`MixtureLinear` takes this path only when `softmax_topk_dense_rule` says so: the router declares a
softmax top-k rule (`Router.softmax_topk_rule`), the torch backend runs, the dense strategy is the
one `mixture_lora_torch` would pick, the router and experts see the same x (no active expert
dropout) in one dtype, and there is no merged-expert map or sparse residual.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import TokenRouting
from .fused import SoftmaxTopK
from .torch_backend import prefers_dense


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
    from torch.nn.modules import module as torch_module

    return bool(
        router._forward_hooks
        or router._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
    )


class _FactorCache:
    """The stacked matrices of one layer, reused while no weight changed (inference only)."""

    __slots__ = ("expand", "key", "stacked")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.stacked: torch.Tensor | None = None
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


def _factors(layer: nn.Module, rule: SoftmaxTopK) -> tuple[torch.Tensor, torch.Tensor]:
    A, B, weight = layer.experts.A, layer.experts.B, rule.weight
    if _needs_graph(layer, rule):
        return _stack(weight, A, B)  # in the graph: gradients flow to W_r, A and B
    cache = layer.__dict__.setdefault("_routed_dense_cache", _FactorCache())
    key = tuple((t.data_ptr(), t._version, t.shape) for t in (weight, A, B))
    if cache.key != key:
        cache.stacked, cache.expand = _stack(weight.detach(), A.detach(), B.detach())
        cache.key = key
    return cache.stacked, cache.expand


def softmax_topk_dense_forward(
    layer: nn.Module, x: torch.Tensor, out: torch.Tensor, rule: SoftmaxTopK
) -> tuple[torch.Tensor, TokenRouting]:
    """(out + routed delta (..., d_out), routing) of a `MixtureLinear` whose base output is ``out``.

    x (..., d_in), out (..., d_out), both in the experts' dtype. The routing holds the same indices, gates, probs
    and logits as the router's own forward.
    """
    A = layer.experts.A
    num_experts, rank, d_in = A.shape
    flat = x.reshape(-1, d_in)
    tokens = flat.shape[0]
    if tokens * rule.k < num_experts and not _needs_graph(layer, rule):
        return _selected_experts_forward(layer, flat, out, rule)
    stacked, expand = _factors(layer, rule)
    projected = flat @ stacked.t()  # (T, E + E*r): router logits, then every expert's shrink
    logits, hidden = projected.split([num_experts, num_experts * rank], dim=1)
    logits = logits.float()  # the router's logits are float32 (a no-op for float32 inputs)
    probs = logits.softmax(dim=-1)
    gates, indices = probs.topk(rule.k, dim=-1)
    if rule.renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    # (T, E) gate matrix times the scale, then each expert's rank-r slice of the intermediate.
    gate_matrix = flat.new_zeros(tokens, num_experts).scatter(1, indices, gates.to(flat.dtype) * layer.scale)
    hidden = (hidden.view(tokens, num_experts, rank) * gate_matrix.unsqueeze(-1)).view(tokens, num_experts * rank)
    result = torch.addmm(out.reshape(-1, out.shape[-1]), hidden, expand)
    routing = TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)
    return result.view(out.shape), routing


def _selected_experts_forward(
    layer: nn.Module, flat: torch.Tensor, out: torch.Tensor, rule: SoftmaxTopK
) -> tuple[torch.Tensor, TokenRouting]:
    """Inference on a few tokens (T*k < E, a decode step): read only the selected experts' factors.

    At one token per step the layer is bound by the bytes of weight it reads, and the dense path
    reads every expert; here the router runs first and the k selected experts' A and B (T*k*r rows
    each) are gathered, so the adapter reads what one LoRA of rank k*r would.
    flat (T, d_in), out (..., d_out).
    """
    A = layer.experts.A
    num_experts, rank, d_in = A.shape
    tokens, k = flat.shape[0], rule.k
    logits = (flat @ rule.weight.t()).float()
    probs = logits.softmax(dim=-1)
    gates, indices = probs.topk(k, dim=-1)
    if rule.renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    chosen = indices.reshape(-1)
    _, expand = _factors(layer, rule)  # (E*r, d_out), kept between calls
    a_rows = A.index_select(0, chosen).view(tokens, k * rank, d_in)
    b_rows = expand.view(num_experts, rank, -1).index_select(0, chosen).view(tokens, k * rank, -1)
    hidden = torch.bmm(a_rows, flat.unsqueeze(-1)).view(tokens, k, rank)  # (T, k, r)
    hidden = hidden * (gates.to(flat.dtype) * layer.scale).unsqueeze(-1)
    delta = torch.bmm(hidden.view(tokens, 1, k * rank), b_rows).view(tokens, -1)
    result = out.reshape(tokens, -1) + delta
    routing = TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)
    return result.view(out.shape), routing
