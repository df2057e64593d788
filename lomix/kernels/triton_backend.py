"""The Triton backend of `lomix.kernels.mixture_lora`: a routing plan built on the device plus an
autograd Function over the three grouped kernels of triton_kernels.py.

Forward (T tokens, k slots, P = T*k pairs, E experts, rank r):
    plan     sort the P pairs by expert and pad each expert's segment to BLOCK_M, on the device
             (no host sync, so the call can be captured in a CUDA graph)
    shrink   h[p] = x[token(p)] A_e^T                      (P_pad, r) fp32, split-K when T is small
    expand   out[token(p)] += gate(p) * scale * h[p] B_e^T  atomically, into the base output if given
Backward, from the upstream gradient G (T, d_out):
    shrink   u[p] = G[token(p)] B_e                         (P_pad, r)
    dgates   gate_grad(p) = scale * <u[p], h[p]>            an r-length dot: no T*k*d buffer
    dA_e     = sum_p (scale * g_p * u[p]) (x) x[token(p)]   grouped outer products
    dB_e     = sum_p G[token(p)] (x) (scale * g_p * h[p])
    dx       [token(p)] += scale * g_p * u[p] A_e           atomically
Saved for backward: x, h, gates and the plan (int32 indices) only.
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


def unusable_reason(device: torch.device) -> str | None:
    """Why Triton cannot run on tensors of ``device``, or None when it can."""
    if device.type == "cuda":
        return None
    if INTERPRET and device.type == "cpu":
        return None
    return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


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


def make_plan(indices: torch.Tensor, num_experts: int, block_m: int) -> RoutingPlan:
    """Build the plan from (T, k) expert indices with tensor ops only (no .item(), no bincount)."""
    tokens, k = indices.shape
    pairs = tokens * k
    device = indices.device
    flat = indices.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    padded_offsets[1:] = padded.cumsum(0)
    starts = counts.cumsum(0) - counts
    sorted_experts, order = torch.sort(flat, stable=True)
    rank_in_expert = torch.arange(pairs, device=device) - starts[sorted_experts]
    destination = padded_offsets[sorted_experts] + rank_in_expert
    # Upper bound of the padded length known on the host: at most min(E, P) segments get padding.
    num_blocks = triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m)
    sorted_pair = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=device)
    sorted_pair[destination] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_offsets[1:], block_start, right=True).clamp_(max=num_experts - 1)
    return RoutingPlan(sorted_pair, block_expert.to(torch.int32), padded_offsets.to(torch.int32), block_m, k)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tests also exercise split-K


def _block_m(pairs: int) -> int:
    if INTERPRET:
        return 16
    return 16 if pairs <= 128 else 32 if pairs <= 1024 else 64


def _dot_dtype(dtype: torch.dtype):
    if INTERPRET or dtype not in _DOT_DTYPES:
        return tl.float32  # the interpreter's bf16 arithmetic is wrong: do all math in fp32
    return _DOT_DTYPES[dtype]


def _atomic_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether Triton can atomically add into a tensor of this dtype here."""
    if dtype != torch.bfloat16:
        return True
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


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
    coef: torch.Tensor | None,
    v: torch.Tensor,
    v_strides: tuple[int, int, int],
    dst: torch.Tensor,
    plan: RoutingPlan,
    dot_dtype,
) -> None:
    """dst[token(p)] += coef[p] * h[p] @ V_e^T, V indexed (expert, N, rank) by ``v_strides``."""
    n, rank = dst.shape[1], h.shape[1]
    block_n = min(32 if INTERPRET else 128, _pow2(n))
    kernels.grouped_expand[(plan.num_blocks, triton.cdiv(n, block_n))](
        h, coef if coef is not None else h, v, dst, plan.sorted_pair, plan.block_expert,
        n, rank, plan.k,
        h.stride(0), h.stride(1), *v_strides, dst.stride(0), dst.stride(1),
        BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=_pow2(rank), HAS_COEF=coef is not None, DOT_DTYPE=dot_dtype,
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


def pair_coefficients(gates: torch.Tensor, plan: RoutingPlan, scale: float) -> torch.Tensor:
    """(P_pad,) fp32: scale * gate of the pair at each padded position, 0 on padding."""
    pair = plan.sorted_pair.long()
    valid = pair >= 0
    values = gates.reshape(-1).float()[pair.clamp(min=0)] * scale
    return torch.where(valid, values, torch.zeros_like(values))


def _accumulate(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
    """(target the kernel adds into, function returning the result once it has)."""
    if _atomic_ok(dtype, device):
        target = out if out is not None else torch.zeros(shape, dtype=dtype, device=device)
        return target, lambda: target
    buffer = torch.zeros(shape, dtype=torch.float32, device=device)
    if out is not None:
        return buffer, lambda: out.add_(buffer)
    return buffer, lambda: buffer.to(dtype)


class _TritonMixtureLoRA(torch.autograd.Function):
    # ``out`` comes FIRST: when it is a view (the base output reshaped to 2-D), autograd rebases the
    # in-place update with CopySlices, which takes the function's first gradient as the view's.
    @staticmethod
    def forward(ctx, out, x, A, B, gates, indices, scale):
        num_experts, rank, _ = A.shape
        d_out = B.shape[1]
        plan = make_plan(indices, num_experts, _block_m(indices.numel()))
        dot_dtype = _dot_dtype(x.dtype)
        h = shrink(x, A, (A.stride(0), A.stride(1), A.stride(2)), rank, plan, dot_dtype)
        coef = pair_coefficients(gates, plan, scale)
        target, result = _accumulate(out, (x.shape[0], d_out), x.dtype, x.device)
        expand(h, coef, B, (B.stride(0), B.stride(1), B.stride(2)), target, plan, dot_dtype)
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
        dx = d_a = d_b = d_gates = None
        coef = pair_coefficients(gates, plan, ctx.scale)
        if need_x or need_a or need_gates:
            # u[p] = G[token(p)] @ B_e: B seen as (expert, rank, d_out)
            u = shrink(grad, B, (B.stride(0), B.stride(2), B.stride(1)), rank, plan, dot_dtype)
            if need_gates:
                per_position = (u * h).sum(dim=1) * ctx.scale * (sorted_pair >= 0)
                d_gates = torch.zeros(gates.numel(), dtype=torch.float32, device=x.device)
                d_gates.index_add_(0, sorted_pair.long().clamp(min=0), per_position)
                d_gates = d_gates.view(gates.shape).to(gates.dtype)
            d_h = u * coef.unsqueeze(1)
            if need_a:
                d_a = torch.empty_like(A)  # every (expert, column) tile is written, empty experts with 0
                outer(x, d_h, d_a, (A.stride(0), A.stride(2), A.stride(1)), num_experts, plan, dot_dtype)
            if need_x:
                target, result = _accumulate(None, tuple(x.shape), x.dtype, x.device)
                expand(d_h, None, A, (A.stride(0), A.stride(2), A.stride(1)), target, plan, dot_dtype)
                dx = result()
        if need_b:
            d_b = torch.empty_like(B)
            b_strides = (B.stride(0), B.stride(1), B.stride(2))
            outer(grad, h * coef.unsqueeze(1), d_b, b_strides, num_experts, plan, dot_dtype)
        return grad if need_out else None, dx, d_a, d_b, d_gates, None, None


def mixture_lora_triton(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed LoRA delta (or ``out + delta``, added in place into ``out``) with Triton kernels.

    Math in x's dtype on tensor cores (weights converted in the kernels), fp32 accumulation.
    """
    return _TritonMixtureLoRA.apply(out, x, A, B, gates, indices, float(scale))
