"""The pure-torch mixture-of-LoRA kernels: the reference and the CPU path.

Two strategies compute the same routed delta, scale * sum_j gates[t, j] * B[e] A[e] x[t] with
e = indices[t, j]:

- dense-masked: one shrink of every token against all experts' A at once (E*r columns), zero the
  unselected experts' slices, one expand against all B. Costs 1 + E*r*(d_in + d_out)/(d_in*d_out)
  of the base GEMM in FLOPs but runs as two large GEMMs: best while E*r is small against d.
- sorted: (token, expert) pairs sorted by expert, one GEMM pair per expert segment. Costs only the
  active experts' FLOPs plus a gather of x rows and a scatter-add of output rows: best when E*r
  grows. It loops over EXPERTS (E iterations), never over tokens.

Neither copies a token's expert weights (the T*k*r*d gather that makes naive "vectorised" designs
the slowest of all; PERFORMANCE.md). Both are differentiable through x, A, B and gates by autograd.
"""

from __future__ import annotations

import torch

# Use the dense-masked strategy while its extra FLOPs stay under this fraction of the base GEMM.
# Calibrated with benchmarks/layer_overhead.py on 2 CPU cores: at d=2048, T=1024 the dense form
# still beat sorted segments at E=64, r=16 (extra FLOPs 1.0), because per-expert GEMMs of a few
# dozen rows run far below peak on a CPU.
DENSE_MAX_EXTRA_FLOPS = 1.0


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


def mixture_lora_sorted(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted-segment strategy. Same shapes and ``out`` as `mixture_lora_dense`."""
    tokens, k = indices.shape
    num_experts = A.shape[0]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token_of_pair = order.div(k, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync
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
    k = indices.shape[1]
    if k == num_experts or dense_extra_flops(num_experts, rank, d_in, B.shape[1]) <= DENSE_MAX_EXTRA_FLOPS:
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
