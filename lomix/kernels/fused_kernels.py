"""Triton kernels of the fused mixture layer (see fused.py for the math and the autograd wiring).

- `router_shrink`: ONE pass over x against the router weight (E rows) and every expert's A
  (E*r rows) at once. Its epilogue does the router's rule (softmax over E, top-k, optional
  renormalisation) and writes the logits, the chosen experts and their gates, the unmasked shrink
  output h (for backward) and z = s * gate * h with zeros for unselected experts (T, E*r).
- `extended_gemm`: out = P1 Q1 + P2 Q2 + P3 Q3 (+ bias) as ONE GEMM whose reduction walks the
  K-tiles of up to three segments into the same fp32 accumulator. Forward: [x | z] against
  [W^T ; B_cat^T] (the expand runs inside the base GEMM). Backward: [dy | dh | dlogits] against
  [W ; A_cat ; W_router] gives dx in one launch.

Segments 2 and 3 address their right operand as (group, row-in-group, n) so that the experts'
stacked A (E, r, d) and B (E, d_out, r) are read in place, never concatenated or transposed.
Tiles are converted to DOT_DTYPE before each dot (x's dtype on GPU: tensor cores; fp32 under the
interpreter, whose bf16 arithmetic is wrong) and accumulated in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def router_shrink(
    x_ptr,
    wr_ptr,
    a_ptr,
    logits_ptr,
    h_ptr,
    z_ptr,
    indices_ptr,
    gates_ptr,
    T,
    D,
    E,
    ER,
    R,
    scale,
    stride_x_t,
    stride_x_d,
    stride_wr_e,
    stride_wr_d,
    stride_a_e,
    stride_a_r,
    stride_a_d,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    E_POW2: tl.constexpr,
    ER_POW2: tl.constexpr,
    K_SLOTS: tl.constexpr,
    K_POW2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    SAVE_H: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    rows = offs_m.to(tl.int64)  # 64-bit: row * stride may pass 2**31
    experts = tl.arange(0, E_POW2)
    expert_ok = experts < E
    cols = tl.arange(0, ER_POW2)
    col_ok = cols < ER
    col_expert = cols // R
    a_col = col_expert * stride_a_e + (cols % R) * stride_a_r
    logits = tl.zeros((BLOCK_M, E_POW2), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, ER_POW2), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        x = tl.load(
            x_ptr + rows[:, None] * stride_x_t + offs_k[None, :] * stride_x_d,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wr = tl.load(
            wr_ptr + experts[None, :] * stride_wr_e + offs_k[:, None] * stride_wr_d,
            mask=expert_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        a = tl.load(
            a_ptr + a_col[None, :] + offs_k[:, None] * stride_a_d,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        logits = _dot(x, wr, logits, DOT_DTYPE)
        h = _dot(x, a, h, DOT_DTYPE)
    # softmax over the E real experts
    masked_logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    top = tl.max(masked_logits, axis=1)
    probs = tl.exp(masked_logits - top[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    # top-k by repeated arg-max (ties to the lower expert id); each slot's expert and probability
    remaining = tl.where(expert_ok[None, :], probs, -1.0)
    slots = tl.arange(0, K_POW2)
    slot_expert = tl.zeros((BLOCK_M, K_POW2), dtype=tl.int32)
    slot_prob = tl.zeros((BLOCK_M, K_POW2), dtype=tl.float32)
    col_gate = tl.zeros((BLOCK_M, ER_POW2), dtype=tl.float32)
    for j in tl.static_range(K_SLOTS):
        best = tl.max(remaining, axis=1)
        chosen = tl.argmax(remaining, axis=1)
        slot_expert = tl.where(slots[None, :] == j, chosen[:, None], slot_expert)
        slot_prob = tl.where(slots[None, :] == j, best[:, None], slot_prob)
        col_gate += tl.where(col_expert[None, :] == chosen[:, None], best[:, None], 0.0)
        remaining = tl.where(experts[None, :] == chosen[:, None], -2.0, remaining)
    if RENORMALIZE:
        kept = tl.sum(tl.where(slots[None, :] < K_SLOTS, slot_prob, 0.0), axis=1)
        slot_prob = slot_prob / kept[:, None]
        col_gate = col_gate / kept[:, None]
    tl.store(logits_ptr + rows[:, None] * E + experts[None, :], logits, mask=row_ok[:, None] & expert_ok[None, :])
    slot_mask = row_ok[:, None] & (slots[None, :] < K_SLOTS)
    tl.store(indices_ptr + rows[:, None] * K_SLOTS + slots[None, :], slot_expert.to(tl.int64), mask=slot_mask)
    tl.store(gates_ptr + rows[:, None] * K_SLOTS + slots[None, :], slot_prob, mask=slot_mask)
    er_ptrs = rows[:, None] * ER + cols[None, :]
    er_mask = row_ok[:, None] & col_ok[None, :]
    if SAVE_H:
        tl.store(h_ptr + er_ptrs, h.to(h_ptr.dtype.element_ty), mask=er_mask)
    tl.store(z_ptr + er_ptrs, (h * col_gate * scale).to(z_ptr.dtype.element_ty), mask=er_mask)


@triton.jit
def _grouped_segment(
    acc,
    p_ptr,
    q_ptr,
    rows,
    row_ok,
    offs_n,
    n_ok,
    K,
    R,
    stride_p_m,
    stride_p_k,
    stride_q_g,
    stride_q_r,
    stride_q_n,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """acc += P (M, K) @ Q (K, N), Q's row c at (c // R) * stride_q_g + (c % R) * stride_q_r."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        p = tl.load(
            p_ptr + rows[:, None] * stride_p_m + offs_k[None, :] * stride_p_k,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        q_row = (offs_k // R) * stride_q_g + (offs_k % R) * stride_q_r
        q = tl.load(
            q_ptr + q_row[:, None] + offs_n[None, :] * stride_q_n,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = _dot(p, q, acc, DOT_DTYPE)
    return acc


@triton.jit
def extended_gemm(
    out_ptr,
    bias_ptr,
    p1_ptr,
    q1_ptr,
    p2_ptr,
    q2_ptr,
    p3_ptr,
    q3_ptr,
    M,
    N,
    K1,
    K2,
    R2,
    K3,
    R3,
    stride_o_m,
    stride_o_n,
    stride_p1_m,
    stride_p1_k,
    stride_q1_k,
    stride_q1_n,
    stride_p2_m,
    stride_p2_k,
    stride_q2_g,
    stride_q2_r,
    stride_q2_n,
    stride_p3_m,
    stride_p3_k,
    stride_q3_g,
    stride_q3_r,
    stride_q3_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_SEGMENT_2: tl.constexpr,
    HAS_SEGMENT_3: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """out (M, N) = P1 Q1 [+ P2 Q2] [+ P3 Q3] [+ bias]; one fp32 accumulator over all segments."""
    # Grouped launch order: GROUP_M row blocks share each column block's Q tiles in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K1, BLOCK_K):  # the base GEMM: plain strides, no index arithmetic
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K1
        p = tl.load(
            p1_ptr + rows[:, None] * stride_p1_m + offs_k[None, :] * stride_p1_k,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        q = tl.load(
            q1_ptr + offs_k[:, None] * stride_q1_k + offs_n[None, :] * stride_q1_n,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = _dot(p, q, acc, DOT_DTYPE)
    if HAS_SEGMENT_2:
        acc = _grouped_segment(
            acc, p2_ptr, q2_ptr, rows, row_ok, offs_n, n_ok, K2, R2,
            stride_p2_m, stride_p2_k, stride_q2_g, stride_q2_r, stride_q2_n, BLOCK_K, DOT_DTYPE,
        )  # fmt: skip
    if HAS_SEGMENT_3:
        acc = _grouped_segment(
            acc, p3_ptr, q3_ptr, rows, row_ok, offs_n, n_ok, K3, R3,
            stride_p3_m, stride_p3_k, stride_q3_g, stride_q3_r, stride_q3_n, BLOCK_K, DOT_DTYPE,
        )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_o_m + offs_n[None, :] * stride_o_n,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & n_ok[None, :],
    )
