"""Triton kernels for routed LoRA mixtures over (token, expert) pairs sorted by expert.

All three kernels walk a *routing plan* (see triton_backend.py): the T*k (token, slot) pairs
sorted by expert, each expert's segment padded to a multiple of BLOCK_M, so every block of
BLOCK_M sorted positions belongs to ONE expert. ``sorted_pair[p]`` is the pair id at padded
position p (-1 for padding), and the token is ``pair // k``. Rows of the activations are gathered
by token inside the kernels: x is never copied into T*k rows.

- `grouped_shrink`:  h[p, :] = src[token(p), :] @ W[e]^T        (forward: x A_e^T; backward: G B_e)
- `grouped_expand`:  dst[token(p), :] += s g(p) h[p, :] @ V[e]^T   (forward: out += g s h B_e^T;
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
def _block_pairs(sorted_pair_ptr, start, k_slots, BLOCK_M: tl.constexpr):
    """Padded positions start..start+BLOCK_M: (positions, pair ids, real-pair mask, tokens)."""
    offs_m = start + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + offs_m)
    valid = pair >= 0
    token = tl.where(valid, pair // k_slots, 0).to(tl.int64)  # 64-bit: token * stride may pass 2**31
    return offs_m, pair, valid, token


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
    offs_m, _, valid, token = _block_pairs(sorted_pair_ptr, pid_m * BLOCK_M, k_slots, BLOCK_M)
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
    gates_ptr,
    v_ptr,
    dst_ptr,
    sorted_pair_ptr,
    block_expert_ptr,
    N,
    R,
    k_slots,
    scale,
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
    HAS_GATES: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m, pair, valid, token = _block_pairs(sorted_pair_ptr, pid_m * BLOCK_M, k_slots, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.load(
        h_ptr + offs_m[:, None] * stride_h_p + offs_r[None, :] * stride_h_r,
        mask=valid[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )
    if HAS_GATES:  # scale * gate of each pair; without, h arrives already scaled
        coef = tl.load(gates_ptr + pair, mask=valid, other=0.0).to(tl.float32) * scale
        h = h * coef[:, None]
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
        offs_m, _, valid, token = _block_pairs(sorted_pair_ptr, m0, k_slots, BLOCK_M)
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


# ---------------------------------------------------------------------------------------------
# The routing plan, built in three launches with stable (deterministic) ranks, no sort, no sync.


@triton.jit
def plan_count(indices_ptr, block_counts_ptr, P, PB: tl.constexpr, E_POW2: tl.constexpr):
    """block_counts[b, e] = how many of pair block b's pairs go to expert e."""
    pid = tl.program_id(0)
    offs = pid * PB + tl.arange(0, PB)
    expert = tl.load(indices_ptr + offs, mask=offs < P, other=-1)
    onehot = (expert[:, None] == tl.arange(0, E_POW2)[None, :]).to(tl.int32)
    tl.store(block_counts_ptr + pid * E_POW2 + tl.arange(0, E_POW2), tl.sum(onehot, axis=0))


@triton.jit
def plan_offsets(
    block_counts_ptr,
    block_prefix_ptr,
    padded_offsets_ptr,
    block_expert_ptr,
    NPB,
    E,
    num_blocks,
    BLOCK_M: tl.constexpr,
    NPB_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program: per-block prefix counts, padded segment offsets, and each output block's expert."""
    rows = tl.arange(0, NPB_POW2)
    cols = tl.arange(0, E_POW2)
    counts = tl.load(block_counts_ptr + rows[:, None] * E_POW2 + cols[None, :], mask=rows[:, None] < NPB, other=0)
    prefix = tl.cumsum(counts, axis=0) - counts
    tl.store(block_prefix_ptr + rows[:, None] * E_POW2 + cols[None, :], prefix, mask=rows[:, None] < NPB)
    total = tl.sum(counts, axis=0)
    padded = tl.where(cols < E, (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, axis=0)
    tl.store(padded_offsets_ptr + cols, ends - padded, mask=cols < E)
    tl.store(padded_offsets_ptr + E, tl.sum(padded, axis=0))
    for b0 in range(0, num_blocks, CHUNK):
        block = b0 + tl.arange(0, CHUNK)
        passed = (ends[None, :] <= (block * BLOCK_M)[:, None]) & (cols[None, :] < E)
        expert = tl.minimum(tl.sum(passed.to(tl.int32), axis=1), E - 1)
        tl.store(block_expert_ptr + block, expert, mask=block < num_blocks)


@triton.jit
def plan_scatter(
    indices_ptr,
    block_prefix_ptr,
    padded_offsets_ptr,
    sorted_pair_ptr,
    position_ptr,
    P,
    E,
    PB: tl.constexpr,
    E_POW2: tl.constexpr,
):
    """Place each pair at padded_offsets[e] + (pairs of expert e before it): a stable sort by expert."""
    pid = tl.program_id(0)
    offs = pid * PB + tl.arange(0, PB)
    valid = offs < P
    cols = tl.arange(0, E_POW2)
    expert = tl.load(indices_ptr + offs, mask=valid, other=-1)
    onehot = (expert[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    prefix = tl.load(block_prefix_ptr + pid * E_POW2 + cols)
    start = tl.load(padded_offsets_ptr + cols, mask=cols < E, other=0)
    dest = tl.sum(onehot * (prefix + start)[None, :], axis=1) + rank
    tl.store(sorted_pair_ptr + dest, offs.to(tl.int32), mask=valid)
    tl.store(position_ptr + offs, dest.to(tl.int32), mask=valid)


@triton.jit
def sorted_grad_prep(
    u_ptr,
    h_ptr,
    gates_ptr,
    sorted_pair_ptr,
    d_gates_ptr,
    d_h_ptr,
    h_scaled_ptr,
    R,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per padded position p (pair q): dgates[q] = s <u_p, h_p>, dh_p = s g_q u_p, hg_p = s g_q h_p."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + offs_m)
    valid = pair >= 0
    offs_r = tl.arange(0, BLOCK_R)
    mask = valid[:, None] & (offs_r[None, :] < R)
    ptrs = offs_m[:, None] * R + offs_r[None, :]
    u = tl.load(u_ptr + ptrs, mask=mask, other=0.0)
    h = tl.load(h_ptr + ptrs, mask=mask, other=0.0)
    coef = tl.load(gates_ptr + pair, mask=valid, other=0.0).to(tl.float32) * scale
    tl.store(d_gates_ptr + pair, tl.sum(u * h, axis=1) * scale, mask=valid)
    tl.store(d_h_ptr + ptrs, u * coef[:, None], mask=mask)
    tl.store(h_scaled_ptr + ptrs, h * coef[:, None], mask=mask)


# ---------------------------------------------------------------------------------------------
# Token-major kernels for mixtures whose E*r is small: every token's selected experts become a
# (T, E*r) masked rank space, expanded by ONE tensor-core dot against all experts' B; no sort,
# no atomics, and the add into the base output is fused.


@triton.jit
def _slot_mask(
    indices_ptr,
    gates_ptr,
    offs_m,
    row_ok,
    col_expert,
    stride_i_t,
    stride_g_t,
    BLOCK_M: tl.constexpr,
    ER_POW2: tl.constexpr,
    K_SLOTS: tl.constexpr,
):
    """(BLOCK_M, ER_POW2) fp32: each column's expert's gate for each row, 0 for unselected experts."""
    mask = tl.zeros((BLOCK_M, ER_POW2), dtype=tl.float32)
    for j in tl.static_range(K_SLOTS):
        expert = tl.load(indices_ptr + offs_m * stride_i_t + j, mask=row_ok, other=-1)
        gate = tl.load(gates_ptr + offs_m * stride_g_t + j, mask=row_ok, other=0.0).to(tl.float32)
        mask += tl.where(col_expert[None, :] == expert[:, None], gate[:, None], 0.0)
    return mask


@triton.jit
def masked_expand(
    hidden_ptr,
    indices_ptr,
    gates_ptr,
    b_ptr,
    dst_ptr,
    T,
    N,
    R,
    ER,
    scale,
    stride_h_t,
    stride_i_t,
    stride_g_t,
    stride_b_e,
    stride_b_n,
    stride_b_r,
    stride_d_t,
    stride_d_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ER_POW2: tl.constexpr,
    K_SLOTS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """dst[t, n] (+)= s * sum_{e, r} mask[t, e] * hidden[t, e*R + r] * B[e, n, r]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < T
    cols = tl.arange(0, ER_POW2)
    col_ok = cols < ER
    col_expert = tl.where(col_ok, cols // R, -1)
    mask = _slot_mask(
        indices_ptr, gates_ptr, offs_m, row_ok, col_expert, stride_i_t, stride_g_t, BLOCK_M, ER_POW2, K_SLOTS
    )
    hidden = tl.load(
        hidden_ptr + offs_m[:, None] * stride_h_t + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)
    hidden = (hidden * mask * scale).to(DOT_DTYPE)
    b = tl.load(
        b_ptr + (cols // R)[:, None] * stride_b_e + offs_n[None, :] * stride_b_n + (cols % R)[:, None] * stride_b_r,
        mask=col_ok[:, None] & (offs_n[None, :] < N),
        other=0.0,
    ).to(DOT_DTYPE)
    if DOT_DTYPE == tl.float32:
        acc = tl.dot(hidden, b, input_precision="ieee")
    else:
        acc = tl.dot(hidden, b)
    dst = dst_ptr + offs_m[:, None] * stride_d_t + offs_n[None, :] * stride_d_n
    dst_mask = row_ok[:, None] & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(dst, mask=dst_mask, other=0.0).to(tl.float32)
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=dst_mask)


@triton.jit
def masked_grad_prep(
    d_hidden_ptr,
    hidden_ptr,
    indices_ptr,
    gates_ptr,
    d_gates_ptr,
    d_masked_ptr,
    masked_ptr,
    T,
    R,
    ER,
    scale,
    stride_i_t,
    stride_g_t,
    BLOCK_M: tl.constexpr,
    ER_POW2: tl.constexpr,
    K_SLOTS: tl.constexpr,
):
    """From dL/d(masked hidden) u = G B_cat^T (T, E*R): dgates[t, j] = s <u, hidden> over expert j's
    columns, d_masked = s * mask * u (dL/dhidden), masked = s * mask * hidden (for dB)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    cols = tl.arange(0, ER_POW2)
    col_ok = cols < ER
    col_expert = tl.where(col_ok, cols // R, -1)
    mask2d = row_ok[:, None] & col_ok[None, :]
    ptrs = offs_m[:, None] * ER + cols[None, :]
    u = tl.load(d_hidden_ptr + ptrs, mask=mask2d, other=0.0).to(tl.float32)
    hidden = tl.load(hidden_ptr + ptrs, mask=mask2d, other=0.0).to(tl.float32)
    product = u * hidden
    for j in tl.static_range(K_SLOTS):
        expert = tl.load(indices_ptr + offs_m * stride_i_t + j, mask=row_ok, other=-1)
        d_gate = tl.sum(tl.where(col_expert[None, :] == expert[:, None], product, 0.0), axis=1) * scale
        tl.store(d_gates_ptr + offs_m * K_SLOTS + j, d_gate, mask=row_ok)
    mask = scale * _slot_mask(
        indices_ptr, gates_ptr, offs_m, row_ok, col_expert, stride_i_t, stride_g_t, BLOCK_M, ER_POW2, K_SLOTS
    )
    tl.store(d_masked_ptr + ptrs, (u * mask).to(d_masked_ptr.dtype.element_ty), mask=mask2d)
    tl.store(masked_ptr + ptrs, (hidden * mask).to(masked_ptr.dtype.element_ty), mask=mask2d)
