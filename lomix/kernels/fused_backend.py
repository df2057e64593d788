"""The fused mixture layer on Triton: base GEMM, softmax top-k router and LoRA experts in two launches.

    logits = x W_r^T                        (T, E)   fp32
    h      = x A_cat^T                      (T, E*r) one pass over x with the logits (router_shrink)
    g      = top-k of softmax(logits), renormalised or raw; 0 for unselected experts
    z      = s * g[expert(c)] * h[:, c]     (T, E*r)
    y      = [x | z] @ [W^T ; B_cat^T] + b  (T, d_out), ONE GEMM over K = d_in + E*r (extended_gemm)

Backward from dy (and dlogits when a balance loss reads the logits):

    dz     = dy B_cat                       (T, E*r) cuBLAS
    dgates, dh = s g dz, z = s g h          one Triton pass (masked_grad_prep of the masked strategy)
    dlogits through renormalisation and softmax (T x E, small)
    dx     = [dy | dh | dlogits] @ [W ; A_cat ; W_r]  ONE GEMM over K = d_out + E*r + E
    [dA ; dW_r] = [dh | dlogits]^T x (one GEMM),  dB = z^T dy,  (dW = dy^T x, db = sum dy when they train)

Saved for backward: x and W (the base layer saves them too), h (T*E*r), the logits, indices and
gates (T*E + 2*T*k): no (T, k, r) copies, nothing else of size T x d. No host synchronisation and
no data-dependent shape anywhere, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

from . import fused_kernels, triton_kernels
from .fused_tuning import FusedTuning, GemmTiles, ShrinkTiles
from .triton_backend import INTERPRET, _cat_b, _dot_dtype, _pow2


def _shrink_tiles(tokens: int, tuning: FusedTuning) -> ShrinkTiles:
    return tuning.decode_shrink if tokens <= tuning.decode_tokens else tuning.shrink


def _gemm_tiles(tokens: int, tuning: FusedTuning) -> GemmTiles:
    return tuning.decode_gemm if tokens <= tuning.decode_tokens else tuning.gemm


def _fit_stages(stages: int, stage_bytes: int, device: torch.device) -> int:
    """Pipeline depth that fits the device's shared memory (a tile set per stage): a tuning file
    written for bf16 must not fail to compile for fp32 inputs or on a smaller GPU."""
    if device.type != "cuda":
        return stages
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    return max(1, min(stages, (limit - 4096) // stage_bytes))


def router_shrink(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    A: torch.Tensor,
    k: int,
    renormalize: bool,
    scale: float,
    save_h: bool,
    tuning: FusedTuning,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: x (T, d), W_r (E, d), A (E, r, d) -> logits (T, E) fp32, indices (T, k) int64,
    gates (T, k) fp32, h (T, E*r) in x's dtype (unmasked; an alias of z when not ``save_h``) and
    z (T, E*r) in x's dtype (gate-scaled, zeros for unselected experts)."""
    tokens, d_in = x.shape
    num_experts, rank, _ = A.shape
    columns = num_experts * rank
    tiles = _shrink_tiles(tokens, tuning)
    block_m = max(16, min(tiles.block_m, triton.next_power_of_2(tokens)))
    block_k = max(16, min(tiles.block_k, triton.next_power_of_2(d_in)))
    logits = torch.empty(tokens, num_experts, dtype=torch.float32, device=x.device)
    indices = torch.empty(tokens, k, dtype=torch.int64, device=x.device)
    gates = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
    z = torch.empty(tokens, columns, dtype=x.dtype, device=x.device)
    h = torch.empty_like(z) if save_h else z
    stage_bytes = block_k * (block_m + _pow2(num_experts) + _pow2(columns)) * x.element_size()
    stages = _fit_stages(tiles.num_stages, stage_bytes, x.device)
    fused_kernels.router_shrink[(triton.cdiv(tokens, block_m),)](
        x, router_weight, A, logits, h, z, indices, gates,
        tokens, d_in, num_experts, columns, rank, scale,
        x.stride(0), x.stride(1), router_weight.stride(0), router_weight.stride(1),
        A.stride(0), A.stride(1), A.stride(2),
        BLOCK_M=block_m, BLOCK_K=block_k, E_POW2=_pow2(num_experts), ER_POW2=_pow2(columns),
        K_SLOTS=k, K_POW2=triton.next_power_of_2(k), RENORMALIZE=renormalize, SAVE_H=save_h,
        DOT_DTYPE=_dot_dtype(x.dtype), num_warps=tiles.num_warps, num_stages=stages,
    )  # fmt: skip
    return logits, indices, gates, h, z


# A segment of `extended_gemm`: (P (M, K), Q base tensor, K, rows per group R, Q strides (group,
# row in group, n)). Row c of Q sits at (c // R) * group + (c % R) * row + n * n_stride.
Segment = tuple[torch.Tensor, torch.Tensor, int, int, tuple[int, int, int]]


def extended_gemm(
    p1: torch.Tensor,
    q1: torch.Tensor,
    q1_strides: tuple[int, int],
    n: int,
    segments: list[Segment],
    bias: torch.Tensor | None,
    tuning: FusedTuning,
) -> torch.Tensor:
    """out (M, n) = p1 @ Q1 + sum of the segments' P @ Q (+ bias), one launch, in p1's dtype.

    ``q1_strides``: (stride along K, stride along n) of Q1 (W^T read in place: (W.stride(1), W.stride(0))).
    """
    tokens, k1 = p1.shape
    tiles = _gemm_tiles(tokens, tuning)
    block_m = max(16, min(tiles.block_m, triton.next_power_of_2(tokens)))
    block_n = max(16, min(tiles.block_n, triton.next_power_of_2(n)))
    block_k = max(16, min(tiles.block_k, triton.next_power_of_2(k1)))
    out = torch.empty(tokens, n, dtype=p1.dtype, device=p1.device)
    padded = list(segments) + [(p1, q1, 0, 1, (0, 0, 0))] * (2 - len(segments))
    (p2, q2, k2, r2, s2), (p3, q3, k3, r3, s3) = padded
    grid = (triton.cdiv(tokens, block_m) * triton.cdiv(n, block_n),)
    element = max(t.element_size() for t in (p1, q1, *(seg[0] for seg in segments), *(seg[1] for seg in segments)))
    fused_kernels.extended_gemm[grid](
        out, bias if bias is not None else out, p1, q1, p2, q2, p3, q3,
        tokens, n, k1, k2, r2, k3, r3,
        out.stride(0), out.stride(1),
        p1.stride(0), p1.stride(1), *q1_strides,
        p2.stride(0), p2.stride(1), *s2,
        p3.stride(0), p3.stride(1), *s3,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=tiles.group_m,
        HAS_SEGMENT_2=len(segments) >= 1, HAS_SEGMENT_3=len(segments) >= 2, HAS_BIAS=bias is not None,
        DOT_DTYPE=_dot_dtype(p1.dtype), num_warps=tiles.num_warps,
        num_stages=_fit_stages(tiles.num_stages, block_k * (block_m + block_n) * element, p1.device),
    )  # fmt: skip
    return out


def softmax_topk_backward(
    logits: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, d_gates: torch.Tensor, renormalize: bool
) -> torch.Tensor:
    """dL/dlogits (T, E) fp32 from dL/dgates (T, k) of g = top-k of softmax(logits) [/ their sum]."""
    probs = logits.softmax(-1)
    d_gates = d_gates.float()
    if renormalize:  # g_j = p_j / S: dL/dp_j = (dL/dg_j - sum_i dL/dg_i g_i) / S
        kept = probs.gather(1, indices).sum(-1, keepdim=True)
        d_gates = (d_gates - (d_gates * gates).sum(-1, keepdim=True)) / kept
    d_probs = torch.zeros_like(probs).scatter_add_(1, indices, d_gates)
    return probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))


def _converted(t: torch.Tensor, kind: str, convert, keep: bool) -> torch.Tensor:
    """``convert(t)``; with ``keep`` (inference: no backward will follow) the copy stays on ``t``
    while ``t`` is unchanged.

    Inference reuses one copy per weight version (a decode step then reads E*r*(d_in + d_out)
    half-precision values, not fp32 plus a conversion); an in-place update (an optimizer step,
    loading weights) bumps the version and the next call converts again.
    """
    if not keep:
        return convert(t)
    key = (t.data_ptr(), t._version, t.dtype, tuple(t.shape))
    attribute = "_lomix_fused_" + kind.replace("torch.", "")
    cached = getattr(t, attribute, None)
    if cached is None or cached[0] != key:
        converted = convert(t)
        if converted is t:  # already in the compute layout: nothing to keep
            return t
        cached = (key, converted)
        setattr(t, attribute, cached)
    return cached[1]


class FusedMixtureLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, router_weight, A, B, scale, k, renormalize, tuning, save_h):
        num_experts, rank, _ = A.shape
        columns = num_experts * rank
        # The small operands in x's dtype (a copy of E*(r+1) rows when the experts are fp32 over a
        # half-precision base): half the bytes in shared memory, the router's own rule for half
        # inputs (LinearGate casts its weight to x's dtype), the same tensor-core dots.
        dtype, keep = x.dtype, not save_h
        a_c = _converted(A, f"a_{dtype}", lambda t: t.to(dtype), keep)
        router_c = _converted(router_weight, f"router_{dtype}", lambda t: t.to(dtype), keep)
        logits, indices, gates, h, z = router_shrink(x, router_c, a_c, k, renormalize, scale, save_h, tuning)
        # B as B_cat^T (E*r, d_out) in x's dtype: a small copy whose rows the GEMM reads coalesced
        b_cat = _converted(B, f"b_cat_{dtype}", lambda t: _cat_b(t, dtype), keep)
        y = extended_gemm(
            x, weight, (weight.stride(1), weight.stride(0)), weight.shape[0],
            [(z, b_cat, columns, 1, (b_cat.stride(0), 0, b_cat.stride(1)))], bias, tuning,
        )  # fmt: skip
        ctx.mark_non_differentiable(indices, gates)
        ctx.save_for_backward(x, weight, router_c, a_c, B, h if save_h else None, logits, indices, gates)
        ctx.scale, ctx.renormalize, ctx.tuning = scale, renormalize, tuning
        ctx.router_dtype, ctx.a_dtype = router_weight.dtype, A.dtype
        return y, logits, indices, gates

    @staticmethod
    def backward(ctx, dy, d_logits, _d_indices, _d_gates):
        x, weight, router_weight, A, B, h, logits, indices, gates = ctx.saved_tensors
        need_x, need_w, need_bias, need_router, need_a, need_b = ctx.needs_input_grad[:6]
        tokens, k = indices.shape
        num_experts, rank, d_in = A.shape
        columns = num_experts * rank
        dy = dy.contiguous()
        d_z = dy @ _cat_b(B, dy.dtype).t()  # (T, E*r)
        d_gates = torch.empty(tokens, k, dtype=torch.float32, device=dy.device)
        d_h, z = torch.empty_like(d_z), torch.empty_like(h)
        block_m = 16 if INTERPRET or tokens <= 16 else 32
        triton_kernels.masked_grad_prep[(triton.cdiv(tokens, block_m),)](
            d_z, h, indices, gates, d_gates, d_h, z,
            tokens, rank, columns, ctx.scale, indices.stride(0), gates.stride(0),
            BLOCK_M=block_m, ER_POW2=_pow2(columns), K_SLOTS=k,
        )  # fmt: skip
        d_logits_total = softmax_topk_backward(logits, indices, gates, d_gates, ctx.renormalize)
        if d_logits is not None:
            d_logits_total = d_logits_total + d_logits
        dx = d_w = d_bias = d_router = d_a = d_b = None
        # [dh | dlogits] side by side (T, E*r + E): one pass over x gives dA and dW_r together
        joint = torch.cat([d_h, d_logits_total.to(dy.dtype)], dim=1)
        d_h, d_l = joint[:, :columns], joint[:, columns:]
        if need_x:
            router_strides = (router_weight.stride(0), 0, router_weight.stride(1))
            dx = extended_gemm(
                dy, weight, (weight.stride(0), weight.stride(1)), d_in,
                [
                    (d_h, A, columns, rank, (A.stride(0), A.stride(1), A.stride(2))),
                    (d_l, router_weight, num_experts, 1, router_strides),
                ],
                None, ctx.tuning,
            )  # fmt: skip
        if need_w:
            d_w = (dy.t() @ x).to(weight.dtype)
        if need_bias:
            d_bias = dy.sum(0).to(weight.dtype)
        if need_a and need_router:
            both = joint.t() @ x  # (E*r + E, d_in)
            d_a = both[:columns].view(num_experts, rank, d_in).to(ctx.a_dtype)
            d_router = both[columns:].to(ctx.router_dtype)
        elif need_a:
            d_a = (d_h.t() @ x).view(num_experts, rank, d_in).to(ctx.a_dtype)
        elif need_router:
            d_router = (d_l.t() @ x).to(ctx.router_dtype)
        if need_b:
            d_b = (z.t() @ dy).view(num_experts, rank, -1).transpose(1, 2).to(B.dtype)
        return dx, d_w, d_bias, d_router, d_a, d_b, None, None, None, None, None


def fused_mixture_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    router_weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    k: int,
    renormalize: bool,
    tuning: FusedTuning,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, d_in), W (d_out, d_in), b (d_out) or None, W_r (E, d_in), A (E, r, d_in), B (E, d_out, r)
    -> y (T, d_out) in x's dtype, logits (T, E) fp32 (differentiable), indices (T, k), gates (T, k) fp32.
    """
    tensors = (x, weight, bias, router_weight, A, B)
    # h is kept for backward only when there will be one (not in inference, not under no_grad)
    save_h = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return FusedMixtureLinear.apply(*tensors, float(scale), int(k), bool(renormalize), tuning, save_h)
