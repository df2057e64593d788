"""The pure-torch mixture-of-LoRA kernels: the reference and the CPU path.

Three strategies compute the same routed delta, scale * sum_j gates[t, j] * B[e] A[e] x[t] with
e = indices[t, j]:

- dense-masked: one shrink of every token against all experts' A at once (E*r columns), zero the
  unselected experts' slices, one expand against all B. Costs 1 + E*r*(d_in + d_out)/(d_in*d_out)
  of the base GEMM in FLOPs but runs as two large GEMMs: best while E*r is small against d.
- sorted: (token, expert) pairs grouped by expert into chunks (one per expert when the routing is
  balanced, several for a busy expert when it is skewed), two batched GEMMs over all chunks. Costs
  about the active experts' FLOPs (at most ~2x for padding, whatever the routing's skew) plus a
  gather of x rows and a scatter-add of output rows, and the same number of ops at any E: best
  when E/k and the work grow
  (`prefers_dense` has the measured rule).
- bags (fp32/fp64 on the CPU, where it replaces the sorted grid): a token's k*r expert-rank
  columns are its bag. The shrink computes only those columns' dot products (a sampled dense-dense
  product), the expand sums the bag's rows of the stacked B weighted by the gated intermediate
  (`embedding_bag`); the backward is the same two ops the other way round, with the bags regrouped
  by column for the factors' gradients. Exactly the active FLOPs, no padding, no gather of d-wide
  rows into a grid and no scatter-add of output rows, in ~6 ops forward and ~10 backward at any E.
  These sparse ops run a few times below GEMM speed per FLOP, so dense keeps the small-E shapes.

None of them loops over tokens or experts, and none copies a token's expert weights (the T*k*r*d
gather that makes naive "vectorised" designs the slowest of all; docs/performance.md). All are
differentiable through x, A, B and gates (dense and sorted by autograd, bags by its own backward).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# The dense-masked strategy runs every expert: it costs E/k times the active experts' FLOPs but
# only two GEMMs. The sorted grid costs about the active FLOPs (times the padding) plus a gather of
# x rows, a scatter-add of output rows and ~15 more small ops. Measured with
# benchmarks/layer_overhead.py on 2 CPU cores: dense wins while E <= 4k at every T. Beyond that,
# with the chunk grid, sorted already wins a whole training step at 256 tokens and E=64 on a
# config Llama (d=512, ~2.5e8 dense multiply-adds in its 512 -> 1376 layers: step / PEFT LoRA 2.75
# sorted vs 3.05 dense, benchmarks/results/model_step_llama-config_experts_cpu.json); dense keeps
# only small work (a few dozen tokens), where the grid's fixed op cost dominates.
DENSE_MAX_EXPERTS_PER_ACTIVE = 4
DENSE_MAX_MACS = 1e8
# Beyond dense, the bag strategy where it runs (fp32/fp64 CPU): it beat the sorted grid at every
# SmolLM2 shape and E past dense (one block's seven projections, forward+backward with routing, over
# the base's: 2.29 vs 3.09 at E=64, 1,536 tokens; 3.13 vs 4.40 at 256 tokens; 2 threads,
# benchmarks/results/layer_strategies_smollm2_cpu.json). Off: the sorted grid (benchmarks compare).
USE_BAGS = True


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


# Chunk sizes tried by `_expert_chunks`: the largest expert's pair count divided by each of these.
CHUNK_DIVISORS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _expert_chunks(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Place each (token, slot) pair in a grid of expert chunks of C rows.

    Each expert's pairs fill ceil(count / C) chunks, only its last one padded. C is the largest
    expert's count divided by the divisor in `CHUNK_DIVISORS` that gives the fewest grid rows while
    C >= the mean count: about balanced routing keeps one chunk per expert (C = the largest count),
    skewed routing splits a busy expert into several chunks instead of padding every other expert to
    its size (the grid stays within ~2x the real pairs, in at most 2E chunks, whatever the skew).
    indices (T, k) -> (order (T*k,) pairs sorted by expert, slot (T*k,) grid row of each sorted
    pair, chunk_expert (n_chunks,) the expert of each chunk, C).
    """
    flat = indices.reshape(-1)
    pairs = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    divisors = torch.tensor(CHUNK_DIVISORS, device=flat.device)
    sizes = (counts.max().clamp(min=1) + divisors - 1).div(divisors, rounding_mode="floor")  # candidate C
    chunks_per = (counts.unsqueeze(0) + sizes.unsqueeze(1) - 1).div(sizes.unsqueeze(1), rounding_mode="floor")
    grid_rows = chunks_per.sum(1) * sizes
    # Chunks below the mean count would cut padding further but multiply the chunks, each of which
    # copies its expert's A and B: C stays >= the mean, so there are at most 2E chunks.
    mean = -(-pairs // num_experts)
    grid_rows = grid_rows.masked_fill(sizes < mean, pairs * num_experts + 1)  # C = the largest count always stays
    best = grid_rows.argmin()
    # One host read (no device wait on the CPU): the grid's shape needs C and the chunk count.
    capacity, total = torch.stack([sizes[best], chunks_per[best].sum()]).tolist()
    chunks = chunks_per[best]
    order = flat.argsort(stable=True)
    expert_of_pair = flat.index_select(0, order)
    first = counts.cumsum(0) - counts  # index of each expert's first pair in the sorted order
    rank = torch.arange(pairs, device=flat.device) - first.index_select(0, expert_of_pair)
    first_chunk = chunks.cumsum(0) - chunks
    chunk_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), chunks, output_size=total)
    chunk_of_pair = first_chunk.index_select(0, expert_of_pair) + rank.div(capacity, rounding_mode="floor")
    return order, chunk_of_pair * capacity + rank % capacity, chunk_expert, capacity


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

    The pairs are grouped by expert into a grid of chunks of C rows (`_expert_chunks`: one chunk per
    expert under balanced routing, ~2x the real pairs at most under any skew), each chunk served by
    its expert's A and B, so two batched GEMMs serve every expert at once (no loop over experts);
    padding rows carry gate 0, read token 0 and add exactly 0 to it. The gate scales the rank-r
    intermediate.
    """
    tokens, k = indices.shape
    num_experts, _, d_in = A.shape
    d_out = B.shape[1]
    order, slot, chunk_expert, capacity = _expert_chunks(indices, num_experts)
    rows_total = chunk_expert.numel() * capacity
    token_of_pair = order.div(k, rounding_mode="floor")
    token_of_slot = token_of_pair.new_zeros(rows_total).index_copy_(0, slot, token_of_pair)
    gate_of_pair = gates.reshape(-1).index_select(0, order).to(x.dtype) * scale
    gate_of_slot = gate_of_pair.new_zeros(rows_total).index_copy(0, slot, gate_of_pair)
    chunks = chunk_expert.numel()
    rows = x.index_select(0, token_of_slot).view(chunks, capacity, d_in)
    a_chunks = A.index_select(0, chunk_expert)  # (chunks, r, d_in): E of them unless the routing is skewed
    b_chunks = B.index_select(0, chunk_expert)  # (chunks, d_out, r)
    hidden = torch.bmm(rows, a_chunks.transpose(1, 2)) * gate_of_slot.view(chunks, capacity, 1)
    expanded = torch.bmm(hidden, b_chunks.transpose(1, 2)).view(rows_total, d_out)
    if out is None:
        out = x.new_zeros(tokens, d_out)
    return out.index_add(0, token_of_slot, expanded)


def _csr_warned_once() -> None:
    """Build one CSR tensor with warnings caught: torch warns once per process that CSR is "beta"."""
    global _csr_quiet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(  # a valid 1 x 1 matrix: users may switch invariant checks on globally
            torch.tensor([0, 1]), torch.zeros(1, dtype=torch.long), torch.zeros(1), size=(1, 1), check_invariants=False
        )
    _csr_quiet = True


_csr_quiet = False


def _bag_dots(rows: torch.Tensor, table: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """dots[t, c] = rows[t] . table[bags[t, c]]: rows (T, d), table (n, d), bags (T, m) -> (T, m).

    A sampled dense-dense product over the pattern "row t, columns bags[t]" (no (T, n) product)."""
    if not _csr_quiet:
        _csr_warned_once()
    tokens, per_bag = bags.shape
    pattern = torch.sparse_csr_tensor(
        torch.arange(0, tokens * per_bag + 1, per_bag, device=bags.device),
        bags.reshape(-1),
        rows.new_zeros(tokens * per_bag),  # beta=0 still reads it: zeros, never uninitialised memory
        size=(tokens, table.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, rows, table.t(), beta=0.0).values().view(tokens, per_bag)


def _by_column(bags: torch.Tensor, num_experts: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bags' entries regrouped by column (once per backward): (order (T*m,) the entries sorted by
    column, stably, token (T*m,) the token of each sorted entry, offsets (E*r,) where each column's
    entries start).

    Column e*r + j holds entry j of every (token, slot) pair routed to e, so sorting the T*k pairs by
    expert places all T*k*r entries: the same order as a stable sort of the entries, for r times
    fewer elements to sort."""
    tokens, per_bag = bags.shape
    k = per_bag // rank
    pairs = tokens * k
    expert = bags.reshape(pairs, rank)[:, 0].div(rank, rounding_mode="floor")  # (T*k,)
    pair_order = expert.argsort(stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    first = counts.cumsum(0) - counts  # each expert's first pair in the sorted order
    sorted_expert = expert.index_select(0, pair_order)
    local = torch.arange(pairs, device=bags.device) - first.index_select(0, sorted_expert)
    ranks = torch.arange(rank, device=bags.device)
    # sorted pair q, entry j -> position first[e]*r + j*counts[e] + local[q] of column e*r + j's run
    position = (first.index_select(0, sorted_expert) * rank + local).unsqueeze(1) + ranks * counts.index_select(
        0, sorted_expert
    ).unsqueeze(1)
    entry = pair_order.unsqueeze(1) * rank + ranks  # its index in the flattened bags
    order = torch.empty_like(entry.view(-1)).index_copy_(0, position.view(-1), entry.view(-1))
    offsets = (first.unsqueeze(1) * rank + ranks * counts.unsqueeze(1)).view(-1)
    return order, order.div(per_bag, rounding_mode="floor"), offsets


def _column_sums(by_column: tuple, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[c] = sum over (t, j) with bags[t, j] == c of weights[t, j] * rows[t]: (columns, d).

    The transpose of the bag sum, as bags again: one bag per column (`_by_column`)."""
    order, token, offsets = by_column
    return F.embedding_bag(
        token, rows, offsets, mode="sum", per_sample_weights=weights.reshape(-1).index_select(0, order)
    )


class _RoutedBags(torch.autograd.Function):
    """delta[t] = sum_c gates[t, c] * scale * (x[t] . A[bags[t, c]]) * B[bags[t, c]].

    x (T, d_in), A (n, d_in) and B (n, d_out) the experts' stacked rank rows (n = E*r), bags (T, k*r)
    the columns e*r + j of each token's experts (slot by slot, j = 0..r-1 within a slot), gates
    (T, k*r) each column's gate, rank r -> (T, d_out)."""

    @staticmethod
    def forward(ctx, x, A, B, bags, gates, scale, rank):
        hidden = _bag_dots(x, A, bags)  # (T, k*r): only the selected experts' shrink
        gated = hidden * gates * scale
        ctx.save_for_backward(x, A, B, bags, gates, hidden, gated)
        ctx.scale, ctx.rank = scale, rank
        return F.embedding_bag(bags, B, mode="sum", per_sample_weights=gated)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, A, B, bags, gates, hidden, gated = ctx.saved_tensors
        scale = ctx.scale
        grad = grad.contiguous()
        d_gated = _bag_dots(grad, B, bags)  # (T, k*r)
        d_hidden = d_gated * gates * scale
        needs = ctx.needs_input_grad
        dx = F.embedding_bag(bags, A, mode="sum", per_sample_weights=d_hidden) if needs[0] else None
        by_column = _by_column(bags, A.shape[0] // ctx.rank, ctx.rank) if needs[1] or needs[2] else None
        dA = _column_sums(by_column, d_hidden, x) if needs[1] else None
        dB = _column_sums(by_column, gated, grad) if needs[2] else None
        d_gates = d_gated * hidden * scale if needs[4] else None
        return dx, dA, dB, None, d_gates, None, None


def bags_supported(x: torch.Tensor) -> bool:
    """Whether the bag strategy runs for x: the CPU's sampled product takes fp32 and fp64 only (the
    GPU keeps the sorted grid: not measured there)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def mixture_lora_bags(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bag strategy (fp32/fp64 on the CPU). Same shapes and ``out`` as `mixture_lora_dense`.

    Token t's bag holds the columns e*r .. e*r + r-1 of each of its experts e in the stacked
    [A_1; ...; A_E] (E*r, d_in) and [B_1^T; ...; B_E^T] (E*r, d_out); a padded slot repeating an
    expert adds like the sum, as in the other strategies. Its backward is its own (`_RoutedBags`) and
    once differentiable: no double backward or ``torch.func`` transforms through it (nothing in lomix
    needs them; the sorted grid, ``USE_BAGS = False``, supports them)."""
    tokens, k = indices.shape
    num_experts, rank, d_in = A.shape
    d_out = B.shape[1]
    if tokens and num_experts:
        # The sampled product reads the columns it is given unchecked: an id outside [0, E) would read
        # outside A (dense and sorted raise on it), so check the range first (no device wait on the CPU).
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= num_experts:
            raise IndexError(f"expert indices must lie in [0, {num_experts}); got {low}..{high}")
    if tokens == 0 or k > num_experts:
        # No tokens: dense keeps the empty result in the graph. k > E: more bag entries than matrix
        # entries, which torch's sampled product refuses (and dense is all the work there is anyway).
        return mixture_lora_dense(x, A, B, indices, gates, scale, out)
    bags = (indices.unsqueeze(-1) * rank + torch.arange(rank, device=indices.device)).reshape(tokens, k * rank)
    column_gates = gates.to(x.dtype).repeat_interleave(rank, dim=1)
    stacked_b = B.transpose(1, 2).reshape(num_experts * rank, d_out)
    delta = _RoutedBags.apply(x, A.reshape(num_experts * rank, d_in), stacked_b, bags, column_gates, scale, rank)
    return delta if out is None else out + delta


def prefers_dense(num_experts: int, rank: int, d_in: int, d_out: int, k: int, tokens: int) -> bool:
    """Whether the dense-masked strategy beats the sparse ones (bags, the sorted grid) for this shape."""
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
    if USE_BAGS and bags_supported(x):
        return mixture_lora_bags(x, A, B, indices, gates, scale, out)
    return mixture_lora_sorted(x, A, B, indices, gates, scale, out)


def mix_parameters(A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence, per-head mixed LoRA factors (Poly / MHR, docs/methods.md, "Task routing").

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
