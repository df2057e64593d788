"""Triton kernels for routed LoRA mixtures over (token, expert) pairs sorted by expert.

All three kernels walk a *routing plan* (see triton_backend.py): the T*k (token, slot) pairs
sorted by expert, each expert's segment padded to a multiple of BLOCK_M, so every block of
BLOCK_M sorted positions belongs to ONE expert. ``sorted_pair[p]`` is the pair id at padded
position p (-1 for padding), and the token is ``pair // k``. Rows of the activations are gathered
by token inside the kernels: x is never copied into T*k rows.

- `grouped_shrink`:  h[p, :] = src[token(p), :] @ W[e]^T        (forward: x A_e^T; backward: G B_e)
- `grouped_expand`:  dst[token(p), :] += coef[p] * h[p, :] @ V[e]^T   (forward: out += g s h B_e^T;
                                                                       backward: dx += dh A_e)
- `grouped_outer`:   grad[e] = sum_{p in e} src[token(p), :]^T (x) small[p, :]   (dA, dB)

Weights are passed with explicit strides so that one kernel serves A (E, r, d_in) and B
(E, d_out, r) in either orientation. Every tile is converted to ``DOT_DTYPE`` before the dot
(the activations' dtype on GPU, so bf16 runs on tensor cores whatever the experts' storage dtype;
fp32 under the Triton interpreter, whose bf16 arithmetic is wrong) and accumulated in fp32.
fp32 dots use IEEE precision so fp32 results are tight on GPU too (no TF32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_shrink(
    src_ptr,
    w_ptr,
    h_ptr,
    sorted_pair_ptr,
    block_expert_ptr,
    K,
    R,
    k_slots,
    stride_src_t,
    stride_src_k,
    stride_w_e,
    stride_w_r,
    stride_w_k,
    stride_h_p,
    stride_h_r,
    K_PER_SPLIT,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + offs_m)
    valid = pair >= 0
    token = tl.where(valid, pair // k_slots, 0).to(tl.int64)  # 64-bit: token * stride may pass 2**31
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        rows = tl.load(
            src_ptr + token[:, None] * stride_src_t + offs_k[None, :] * stride_src_k,
            mask=valid[:, None] & in_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + expert * stride_w_e + offs_r[None, :] * stride_w_r + offs_k[:, None] * stride_w_k,
            mask=(offs_r[None, :] < R) & in_k[:, None],
            other=0.0,
        )
        rows = rows.to(DOT_DTYPE)
        w = w.to(DOT_DTYPE)
        if DOT_DTYPE == tl.float32:
            acc += tl.dot(rows, w, input_precision="ieee")
        else:
            acc += tl.dot(rows, w)
    h_ptrs = h_ptr + offs_m[:, None] * stride_h_p + offs_r[None, :] * stride_h_r
    h_mask = valid[:, None] & (offs_r[None, :] < R)
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=h_mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=h_mask, sem="relaxed")


@triton.jit
def grouped_expand(
    h_ptr,
    coef_ptr,
    v_ptr,
    dst_ptr,
    sorted_pair_ptr,
    block_expert_ptr,
    N,
    R,
    k_slots,
    stride_h_p,
    stride_h_r,
    stride_v_e,
    stride_v_n,
    stride_v_r,
    stride_dst_t,
    stride_dst_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_COEF: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + offs_m)
    valid = pair >= 0
    token = tl.where(valid, pair // k_slots, 0).to(tl.int64)  # 64-bit: token * stride may pass 2**31
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.load(
        h_ptr + offs_m[:, None] * stride_h_p + offs_r[None, :] * stride_h_r,
        mask=valid[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )
    if HAS_COEF:
        coef = tl.load(coef_ptr + offs_m, mask=valid, other=0.0)
        h = h * coef[:, None]  # h and coef are fp32
    v = tl.load(
        v_ptr + expert * stride_v_e + offs_n[None, :] * stride_v_n + offs_r[:, None] * stride_v_r,
        mask=(offs_n[None, :] < N) & (offs_r[:, None] < R),
        other=0.0,
    )
    h = h.to(DOT_DTYPE)
    v = v.to(DOT_DTYPE)
    if DOT_DTYPE == tl.float32:
        acc = tl.dot(h, v, input_precision="ieee")
    else:
        acc = tl.dot(h, v)
    tl.atomic_add(
        dst_ptr + token[:, None] * stride_dst_t + offs_n[None, :] * stride_dst_n,
        acc.to(dst_ptr.dtype.element_ty),
        mask=valid[:, None] & (offs_n[None, :] < N),
        sem="relaxed",  # a sum: the order of the adds does not matter
    )


@triton.jit
def grouped_outer(
    src_ptr,
    small_ptr,
    grad_ptr,
    sorted_pair_ptr,
    padded_offsets_ptr,
    N,
    R,
    k_slots,
    stride_src_t,
    stride_src_n,
    stride_small_p,
    stride_small_r,
    stride_g_e,
    stride_g_n,
    stride_g_r,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(padded_offsets_ptr + expert)
    end = tl.load(padded_offsets_ptr + expert + 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + offs_m)
        valid = pair >= 0
        token = tl.where(valid, pair // k_slots, 0).to(tl.int64)  # 64-bit: token * stride may pass 2**31
        rows = tl.load(
            src_ptr + token[:, None] * stride_src_t + offs_n[None, :] * stride_src_n,
            mask=valid[:, None] & (offs_n[None, :] < N),
            other=0.0,
        )
        small = tl.load(
            small_ptr + offs_m[:, None] * stride_small_p + offs_r[None, :] * stride_small_r,
            mask=valid[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        rows = rows.to(DOT_DTYPE)
        small = small.to(DOT_DTYPE)
        if DOT_DTYPE == tl.float32:
            acc += tl.dot(tl.trans(rows), small, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(rows), small)
    tl.store(
        grad_ptr + expert * stride_g_e + offs_n[:, None] * stride_g_n + offs_r[None, :] * stride_g_r,
        acc.to(grad_ptr.dtype.element_ty),
        mask=(offs_n[:, None] < N) & (offs_r[None, :] < R),
    )
