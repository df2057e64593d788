"""The Triton backend of `lomix.kernels.mixture_lora`: two strategies over the kernels of
triton_kernels.py, each an autograd Function, chosen by shape like the torch backend's.

``masked`` (token-major; E*r up to 256 and cheap against d): one cuBLAS shrink of every token
against all experts, H = x A_cat^T (T, E*r); one Triton kernel builds each token's gate mask from
its (indices, gates), applies it to H and expands against all experts' B with a tensor-core dot,
adding into the base output in the same pass (no sort, no atomics, deterministic). Backward: one
cuBLAS GEMM for U = G B_cat^T, one Triton kernel for dgates (an r-length dot per slot) and the
masked H and U, then three cuBLAS GEMMs for dA, dB, dx. Saved: x, H (T*E*r), indices, gates.

``sorted`` (many experts): the T*k (token, slot) pairs sorted by expert and padded per block on
the device in three small kernels (stable ranks, no host sync, CUDA-graph safe); rows of x are
gathered inside the kernels (never copied into T*k rows):
    shrink   h[p] = x[token(p)] A_e^T              (P_pad, r) fp32, split-K when T is small
    expand   out[token(p)] += s g(p) h[p] B_e^T     atomically, into the base output
    backward u[p] = G[token(p)] B_e;  dgates = s <u, h>;  dA_e, dB_e by grouped outer products;
             dx[token(p)] += s g(p) u[p] A_e
Saved: x, h (T*k*r), gates and the plan (int32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import triton_kernels as kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# The masked strategy holds a (BLOCK_M, E*r) tile in registers and does E/k times the necessary
# expand FLOPs: use it while E*r is at most this many columns and its extra FLOPs stay small.
MASKED_MAX_COLUMNS = 256
MASKED_MAX_EXTRA_FLOPS = 0.25


def unusable_reason(device: torch.device) -> str | None:
    """Why Triton cannot run on tensors of ``device``, or None when it can."""
    if device.type == "cuda":
        return None
    if INTERPRET and device.type == "cpu":
        return None
    return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tests also exercise split-K


def _dot_dtype(dtype: torch.dtype):
    if INTERPRET or dtype not in _DOT_DTYPES:
        return tl.float32  # the interpreter's bf16 arithmetic is wrong: do all math in fp32
    return _DOT_DTYPES[dtype]


def _atomic_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether Triton can atomically add into a tensor of this dtype here."""
    if dtype != torch.bfloat16:
        return True
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def choose_strategy(num_experts: int, rank: int, d_in: int, d_out: int) -> str:
    columns = num_experts * rank
    extra = columns * (d_in + d_out) / (d_in * d_out)
    return "masked" if columns <= MASKED_MAX_COLUMNS and extra <= MASKED_MAX_EXTRA_FLOPS else "sorted"


# ---------------------------------------------------------------------------------------------
# sorted strategy


@dataclass
class RoutingPlan:
    """The (token, slot) pairs sorted by expert, each expert's segment padded to ``block_m``.

    sorted_pair:    (num_blocks * block_m,) int32, the pair id (token * k + slot) at each padded
                    position, -1 on padding.
    block_expert:   (num_blocks,) int32, the expert of each block (clamped into range for blocks
                    past the end, which hold only padding).
    padded_offsets: (E + 1,) int32, where each expert's padded segment starts.
    """

    sorted_pair: torch.Tensor
    block_expert: torch.Tensor
    padded_offsets: torch.Tensor
    block_m: int
    k: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    @property
    def padded_pairs(self) -> int:
        return self.sorted_pair.shape[0]


def _block_m(pairs: int) -> int:
    if INTERPRET:
        return 16
    return 16 if pairs <= 128 else 32 if pairs <= 1024 else 64


def make_plan(indices: torch.Tensor, num_experts: int, block_m: int) -> RoutingPlan:
    """Build the plan from (T, k) expert indices: three small kernels, no host sync."""
    tokens, k = indices.shape
    pairs = tokens * k
    device = indices.device
    flat = indices.reshape(-1).contiguous()
    e_pow2 = triton.next_power_of_2(num_experts)
    pair_block = max(16, min(256, 8192 // e_pow2))  # many small programs: the scan is per block
    n_pair_blocks = triton.cdiv(pairs, pair_block)
    # Upper bound of the padded length known on the host: at most min(E, P) segments get padding.
    num_blocks = triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m)
    block_counts = torch.empty((n_pair_blocks, e_pow2), dtype=torch.int32, device=device)
    block_prefix = torch.empty_like(block_counts)
    padded_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    sorted_pair = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=device)
    position = torch.empty(pairs, dtype=torch.int32, device=device)
    kernels.plan_count[(n_pair_blocks,)](flat, block_counts, pairs, PB=pair_block, E_POW2=e_pow2)
    kernels.plan_offsets[(1,)](
        block_counts, block_prefix, padded_offsets, block_expert, n_pair_blocks, num_experts, num_blocks,
        BLOCK_M=block_m, NPB_POW2=triton.next_power_of_2(n_pair_blocks), E_POW2=e_pow2, CHUNK=64,
    )  # fmt: skip
    kernels.plan_scatter[(n_pair_blocks,)](
        flat, block_prefix, padded_offsets, sorted_pair, position, pairs, num_experts, PB=pair_block, E_POW2=e_pow2
    )
    return RoutingPlan(sorted_pair, block_expert, padded_offsets, block_m, k)


def shrink(
    src: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], rank: int, plan: RoutingPlan, dot_dtype
) -> torch.Tensor:
    """h[p] = src[token(p)] @ W_e^T, W indexed (expert, rank, K) by ``w_strides``. -> (P_pad, r) fp32."""
    reduce_dim = src.shape[1]
    block_k = 32 if INTERPRET else (64 if rank > 32 else 128)
    block_k = min(block_k, _pow2(reduce_dim))
    k_blocks = triton.cdiv(reduce_dim, block_k)
    split_k = max(1, min(k_blocks, 16, _num_sms(src.device) // max(plan.num_blocks, 1)))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(reduce_dim, k_per_split)
    h = torch.zeros(plan.padded_pairs, rank, dtype=torch.float32, device=src.device)
    kernels.grouped_shrink[(plan.num_blocks, split_k)](
        src, w, h, plan.sorted_pair, plan.block_expert,
        reduce_dim, rank, plan.k,
        src.stride(0), src.stride(1), *w_strides, h.stride(0), h.stride(1),
        k_per_split,
        BLOCK_M=plan.block_m, BLOCK_K=block_k, BLOCK_R=_pow2(rank), SPLIT_K=split_k, DOT_DTYPE=dot_dtype,
    )  # fmt: skip
    return h


def expand(
    h: torch.Tensor,
    gates: torch.Tensor | None,
    scale: float,
    v: torch.Tensor,
    v_strides: tuple[int, int, int],
    dst: torch.Tensor,
    plan: RoutingPlan,
    dot_dtype,
) -> None:
    """dst[token(p)] += s g(p) h[p] @ V_e^T (or h[p] @ V_e^T without gates), V (expert, N, rank)."""
    n, rank = dst.shape[1], h.shape[1]
    block_n = min(32 if INTERPRET else 128, _pow2(n))
    kernels.grouped_expand[(plan.num_blocks, triton.cdiv(n, block_n))](
        h, gates if gates is not None else h, v, dst, plan.sorted_pair, plan.block_expert,
        n, rank, plan.k, scale,
        h.stride(0), h.stride(1), *v_strides, dst.stride(0), dst.stride(1),
        BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=_pow2(rank), HAS_GATES=gates is not None, DOT_DTYPE=dot_dtype,
    )  # fmt: skip


def outer(
    src: torch.Tensor,
    small: torch.Tensor,
    grad: torch.Tensor,
    g_strides: tuple[int, int, int],
    num_experts: int,
    plan: RoutingPlan,
    dot_dtype,
) -> None:
    """grad[e] = sum_{p in e} src[token(p)]^T (x) small[p], grad indexed (expert, N, rank) by ``g_strides``."""
    n, rank = src.shape[1], small.shape[1]
    block_n = min(32 if INTERPRET else 64, _pow2(n))
    kernels.grouped_outer[(num_experts, triton.cdiv(n, block_n))](
        src, small, grad, plan.sorted_pair, plan.padded_offsets,
        n, rank, plan.k,
        src.stride(0), src.stride(1), small.stride(0), small.stride(1), *g_strides,
        BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=_pow2(rank), DOT_DTYPE=dot_dtype,
    )  # fmt: skip


def _accumulate(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
    """(target the kernel adds into atomically, function returning the result once it has)."""
    if _atomic_ok(dtype, device):
        target = out if out is not None else torch.zeros(shape, dtype=dtype, device=device)
        return target, lambda: target
    buffer = torch.zeros(shape, dtype=torch.float32, device=device)
    if out is not None:
        return buffer, lambda: out.add_(buffer)
    return buffer, lambda: buffer.to(dtype)


class _SortedMixtureLoRA(torch.autograd.Function):
    # ``out`` comes FIRST: when it is a view (the base output reshaped to 2-D), autograd rebases the
    # in-place update with CopySlices, which takes the function's first gradient as the view's.
    @staticmethod
    def forward(ctx, out, x, A, B, gates, indices, scale):
        num_experts, rank, _ = A.shape
        plan = make_plan(indices, num_experts, _block_m(indices.numel()))
        dot_dtype = _dot_dtype(x.dtype)
        h = shrink(x, A, (A.stride(0), A.stride(1), A.stride(2)), rank, plan, dot_dtype)
        target, result = _accumulate(out, (x.shape[0], B.shape[1]), x.dtype, x.device)
        expand(h, gates, scale, B, (B.stride(0), B.stride(1), B.stride(2)), target, plan, dot_dtype)
        output = result()
        if out is not None:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, gates, h, plan.sorted_pair, plan.block_expert, plan.padded_offsets)
        ctx.scale, ctx.block_m, ctx.k = scale, plan.block_m, plan.k
        return output

    @staticmethod
    def backward(ctx, grad):
        x, A, B, gates, h, sorted_pair, block_expert, padded_offsets = ctx.saved_tensors
        plan = RoutingPlan(sorted_pair, block_expert, padded_offsets, ctx.block_m, ctx.k)
        need_out, need_x, need_a, need_b, need_gates = ctx.needs_input_grad[:5]
        num_experts, rank, _ = A.shape
        dot_dtype = _dot_dtype(x.dtype)
        grad = grad.contiguous()
        dx = d_a = d_b = None
        # u[p] = G[token(p)] @ B_e: B seen as (expert, rank, d_out)
        u = shrink(grad, B, (B.stride(0), B.stride(2), B.stride(1)), rank, plan, dot_dtype)
        d_gates = torch.zeros(gates.numel(), dtype=torch.float32, device=x.device)
        d_h, h_scaled = torch.empty_like(u), torch.empty_like(h)
        kernels.sorted_grad_prep[(plan.num_blocks,)](
            u, h, gates, sorted_pair, d_gates, d_h, h_scaled, rank, ctx.scale,
            BLOCK_M=plan.block_m, BLOCK_R=_pow2(rank),
        )  # fmt: skip
        if need_a:
            d_a = torch.empty_like(A)  # every (expert, column) tile is written, empty experts with 0
            outer(x, d_h, d_a, (A.stride(0), A.stride(2), A.stride(1)), num_experts, plan, dot_dtype)
        if need_x:
            target, result = _accumulate(None, tuple(x.shape), x.dtype, x.device)
            expand(d_h, None, 1.0, A, (A.stride(0), A.stride(2), A.stride(1)), target, plan, dot_dtype)
            dx = result()
        if need_b:
            d_b = torch.empty_like(B)
            outer(grad, h_scaled, d_b, (B.stride(0), B.stride(1), B.stride(2)), num_experts, plan, dot_dtype)
        d_gates = d_gates.view(gates.shape).to(gates.dtype) if need_gates else None
        return grad if need_out else None, dx, d_a, d_b, d_gates, None, None


# ---------------------------------------------------------------------------------------------
# masked strategy


def _cat_a(A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (E, r, d_in) as (E*r, d_in) in the compute dtype."""
    return A.reshape(-1, A.shape[2]).to(dtype)


def _cat_b(B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B (E, d_out, r) as (E*r, d_out): row e*r + j is B[e, :, j]."""
    return B.transpose(1, 2).reshape(-1, B.shape[1]).to(dtype)


@dataclass
class MaskedTiles:
    """Launch settings of the masked kernels for large T (small T uses smaller row blocks).

    Defaults picked by the tile sweep in benchmarks/kernel_bench.py on an H200 at T=8192, d=4096,
    E*r=128, bf16 (benchmarks/results/kernels_gpu.json holds the sweep).
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    prep_block_m: int = 32
    prep_num_warps: int = 4


MASKED_TILES = MaskedTiles()


def _masked_block_m(tokens: int, large: int) -> int:
    return 16 if INTERPRET or tokens <= 16 else 32 if tokens <= 256 else large


class _MaskedMixtureLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x, A, B, gates, indices, scale):
        tokens, k = indices.shape
        num_experts, rank, _ = A.shape
        d_out = B.shape[1]
        columns = num_experts * rank
        hidden = x @ _cat_a(A, x.dtype).t()  # (T, E*r), one cuBLAS GEMM
        dst = out if out is not None else torch.empty(tokens, d_out, dtype=x.dtype, device=x.device)
        tiles = MASKED_TILES
        block_m = _masked_block_m(tokens, tiles.block_m)
        block_n = min(32 if INTERPRET else tiles.block_n, _pow2(d_out))
        kernels.masked_expand[(triton.cdiv(tokens, block_m), triton.cdiv(d_out, block_n))](
            hidden, indices, gates, B, dst,
            tokens, d_out, rank, columns, scale,
            hidden.stride(0), indices.stride(0), gates.stride(0),
            B.stride(0), B.stride(1), B.stride(2), dst.stride(0), dst.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, ER_POW2=_pow2(columns), K_SLOTS=k,
            ACCUMULATE=out is not None, DOT_DTYPE=_dot_dtype(x.dtype), num_warps=tiles.num_warps,
        )  # fmt: skip
        if out is not None:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, gates, indices, hidden)
        ctx.scale = scale
        return dst

    @staticmethod
    def backward(ctx, grad):
        x, A, B, gates, indices, hidden = ctx.saved_tensors
        need_out, need_x, need_a, need_b, need_gates = ctx.needs_input_grad[:5]
        tokens, k = indices.shape
        num_experts, rank, d_in = A.shape
        columns = num_experts * rank
        grad = grad.contiguous()
        d_hidden = grad @ _cat_b(B, grad.dtype).t()  # (T, E*r): dL/d(masked hidden)
        d_gates = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
        d_masked, masked = torch.empty_like(d_hidden), torch.empty_like(hidden)
        block_m = _masked_block_m(tokens, MASKED_TILES.prep_block_m)
        kernels.masked_grad_prep[(triton.cdiv(tokens, block_m),)](
            d_hidden, hidden, indices, gates, d_gates, d_masked, masked,
            tokens, rank, columns, ctx.scale, indices.stride(0), gates.stride(0),
            BLOCK_M=block_m, ER_POW2=_pow2(columns), K_SLOTS=k, num_warps=MASKED_TILES.prep_num_warps,
        )  # fmt: skip
        dx = d_masked @ _cat_a(A, d_masked.dtype) if need_x else None
        d_a = (d_masked.t() @ x).view(num_experts, rank, d_in).to(A.dtype) if need_a else None
        d_b = (masked.t() @ grad).view(num_experts, rank, -1).transpose(1, 2).to(B.dtype) if need_b else None
        d_gates = d_gates.to(gates.dtype) if need_gates else None
        return grad if need_out else None, dx, d_a, d_b, d_gates, None, None


def mixture_lora_triton(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    strategy: str = "auto",
) -> torch.Tensor:
    """The routed LoRA delta (or ``out + delta``, added in place into ``out``) with Triton kernels.

    Math in x's dtype on tensor cores (weights converted in the kernels), fp32 accumulation.
    ``strategy``: ``masked``, ``sorted`` or ``auto`` (by shape, see `choose_strategy`).
    """
    num_experts, rank, d_in = A.shape
    if strategy == "auto":
        strategy = choose_strategy(num_experts, rank, d_in, B.shape[1])
    function = {"masked": _MaskedMixtureLoRA, "sorted": _SortedMixtureLoRA}[strategy]
    return function.apply(out, x, A, B, gates.contiguous(), indices.contiguous(), float(scale))
