"""The pure-torch mixture-of-LoRA kernels: the reference and the CPU path.

Two strategies compute the same routed delta, scale * sum_j gates[t, j] * B[e] A[e] x[t] with
e = indices[t, j]:

- dense-masked: one shrink of every token against all experts' A at once (E*r columns), zero the
  unselected experts' slices, one expand against all B. Costs 1 + E*r*(d_in + d_out)/(d_in*d_out)
  of the base GEMM in FLOPs but runs as two large GEMMs: best while E*r is small against d.
- sorted: (token, expert) pairs grouped by expert into segments padded to the largest, two batched
  GEMMs over all segments. Costs about the active experts' FLOPs plus a gather of x rows and a
  scatter-add of output rows, and the same number of ops at any E: best when E/k and the work
  grow (`prefers_dense` has the measured rule). Heavily skewed routing falls back to one GEMM pair
  per expert segment. Neither loops over tokens.

Neither copies a token's expert weights (the T*k*r*d gather that makes naive "vectorised" designs
the slowest of all; PERFORMANCE.md). Both are differentiable through x, A, B and gates by autograd.
"""

from __future__ import annotations

import torch

# The dense-masked strategy runs every expert: it costs E/k times the active experts' FLOPs but
# only two GEMMs. The sorted grid costs about the active FLOPs (times the padding) plus a gather of
# x rows, a scatter-add of output rows and ~10 more small ops. Measured with
# benchmarks/layer_overhead.py on 2 CPU cores: dense wins while E <= 4k at every T; beyond that it
# still wins while its whole work is small (T=256 tokens of SmolLM2's 576 -> 1536 layers at E=64,
# r=8: ~2.8e8 multiply-adds), where the grid's fixed op cost dominates; sorted wins from ~1e9
# (T=1024 at the same shapes, or d=2048, r=16, E>=32).
DENSE_MAX_EXPERTS_PER_ACTIVE = 4
DENSE_MAX_MACS = 5e8
# The sorted grid pads every expert segment to the largest; beyond this many grid rows per real
# (token, expert) pair (one expert taking most tokens) the per-expert loop is cheaper.
GRID_MAX_PADDING = 4


def dense_extra_flops(num_experts: int, rank: int, d_in: int, d_out: int) -> float:
    """FLOPs of the dense-masked delta as a fraction of the base layer's GEMM."""
    return num_experts * rank * (d_in + d_out) / (d_in * d_out)


def mixture_lora_dense(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense-masked strategy. x (T, d_in), A (E, r, d_in), B (E, d_out, r), indices/gates (T, k).

    With ``out`` (T, d_out) the result is ``out + delta``, the add fused into the expand GEMM.
    """
    tokens = x.shape[0]
    num_experts, rank, d_in = A.shape
    d_out = B.shape[1]
    # (T, E) gate matrix; scatter_add so that a padded slot repeating an expert adds like the sum.
    mask = x.new_zeros(tokens, num_experts).scatter_add(1, indices, gates.to(x.dtype) * scale)
    hidden = x @ A.reshape(num_experts * rank, d_in).t()  # (T, E*r)
    hidden = (hidden.view(tokens, num_experts, rank) * mask.unsqueeze(-1)).view(tokens, num_experts * rank)
    expand = B.transpose(1, 2).reshape(num_experts * rank, d_out)
    return hidden @ expand if out is None else torch.addmm(out, hidden, expand)


def _expert_slots(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Place each (token, slot) pair in an (E, C) grid of expert segments padded to a capacity C.

    indices (T, k) -> (order (T*k,) pairs sorted by expert, slot (T*k,) grid position of each
    sorted pair = expert * C + its rank within the expert, C = the largest expert's pair count).
    """
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    order = flat.argsort(stable=True)
    expert_of_pair = flat.index_select(0, order)
    # On the CPU reading C costs no device wait; the grid shape needs it.
    capacity = int(counts.max()) if flat.numel() else 0
    first = counts.cumsum(0) - counts  # index of each expert's first pair in the sorted order
    rank = torch.arange(flat.numel(), device=flat.device) - first.index_select(0, expert_of_pair)
    return order, expert_of_pair * capacity + rank, capacity


def mixture_lora_sorted(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted-segment strategy. Same shapes and ``out`` as `mixture_lora_dense`.

    The pairs are grouped by expert into an (E, C, d_in) grid padded to the largest segment, so two
    batched GEMMs serve every expert at once (no loop over experts); padding rows carry gate 0,
    read token 0 and add exactly 0 to it. The gate scales the rank-r intermediate. When one expert
    takes far more pairs than the mean (so the grid would be mostly padding), it falls back to one
    GEMM pair per expert segment.
    """
    tokens, k = indices.shape
    num_experts, _, d_in = A.shape
    d_out = B.shape[1]
    order, slot, capacity = _expert_slots(indices, num_experts)
    pairs = order.numel()
    if num_experts * capacity > GRID_MAX_PADDING * max(pairs, 1):
        return _mixture_lora_segments(x, A, B, indices, gates, scale, out)
    token_of_pair = order.div(k, rounding_mode="floor")
    token_of_slot = token_of_pair.new_zeros(num_experts * capacity).index_copy_(0, slot, token_of_pair)
    gate_of_pair = gates.reshape(-1).index_select(0, order).to(x.dtype) * scale
    gate_of_slot = gate_of_pair.new_zeros(num_experts * capacity).index_copy(0, slot, gate_of_pair)
    rows = x.index_select(0, token_of_slot).view(num_experts, capacity, d_in)
    hidden = torch.bmm(rows, A.transpose(1, 2)) * gate_of_slot.view(num_experts, capacity, 1)
    expanded = torch.bmm(hidden, B.transpose(1, 2)).view(num_experts * capacity, d_out)
    if out is None:
        out = x.new_zeros(tokens, d_out)
    return out.index_add(0, token_of_slot, expanded)


def _mixture_lora_segments(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mixture_lora_sorted` without padding: one GEMM pair per expert segment (skewed routing)."""
    tokens, k = indices.shape
    num_experts = A.shape[0]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token_of_pair = order.div(k, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    gate_of_pair = gates.reshape(-1).index_select(0, order).to(x.dtype) * scale
    rows = x.index_select(0, token_of_pair).split(counts)
    outputs = []
    for expert, segment in enumerate(rows):
        if segment.shape[0]:
            outputs.append((segment @ A[expert].t()) @ B[expert].t())
    # No tokens (an empty batch): an empty (0, d_out) product keeps the graph to x, A and B.
    pairs = torch.cat(outputs) if outputs else (x[:0] @ A[0].t()) @ B[0].t()
    pairs_out = pairs * gate_of_pair.unsqueeze(-1)
    if out is None:
        out = x.new_zeros(tokens, B.shape[1])
    return out.index_add(0, token_of_pair, pairs_out)


def prefers_dense(num_experts: int, rank: int, d_in: int, d_out: int, k: int, tokens: int) -> bool:
    """Whether the dense-masked strategy beats the sorted grid for this shape (see the constants)."""
    if k >= num_experts or num_experts <= DENSE_MAX_EXPERTS_PER_ACTIVE * k:
        return True
    return tokens * num_experts * rank * (d_in + d_out) <= DENSE_MAX_MACS


def mixture_lora_torch(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the cheaper strategy for this shape (see module docstring)."""
    num_experts, rank, d_in = A.shape
    if prefers_dense(num_experts, rank, d_in, B.shape[1], indices.shape[1], x.shape[0]):
        return mixture_lora_dense(x, A, B, indices, gates, scale, out)
    return mixture_lora_sorted(x, A, B, indices, gates, scale, out)


def mix_parameters(A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence, per-head mixed LoRA factors (Poly / MHR, METHODS.md section 1).

    Head q owns the q-th slice of d_in in A and of d_out in B.
    A (E, r, d_in), B (E, d_out, r), weights (batch, h, E) -> A_mix (batch, r, d_in), B_mix (batch, d_out, r).
    """
    num_experts, rank, d_in = A.shape
    d_out = B.shape[1]
    batch, heads, _ = weights.shape
    weights = weights.to(A.dtype)
    a_mix = torch.einsum("bqe,erqd->brqd", weights, A.view(num_experts, rank, heads, d_in // heads))
    b_mix = torch.einsum("bqe,eqor->bqor", weights, B.view(num_experts, heads, d_out // heads, rank))
    return a_mix.reshape(batch, rank, d_in), b_mix.reshape(batch, d_out, rank)


def mixture_lora_mixed_torch(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, scale: float
) -> torch.Tensor:
    """Parameter-mixing delta as batched matmuls. x (batch, S, d_in) -> (batch, S, d_out)."""
    a_mix, b_mix = mix_parameters(A, B, weights)
    return torch.bmm(torch.bmm(x, a_mix.transpose(1, 2)), b_mix.transpose(1, 2)) * scale
