"""Property: the torch mixture-of-LoRA kernels equal a naive per-token loop, outputs and gradients.

Random shapes, expert counts, k (also k > E), repeated expert ids in a row, zero gates and scales,
through each strategy, the auto choice and the public entry point (with and without the fused
``out``). The reference is the formula of `lomix.kernels` one token and one slot at a time, in
float64. Examples per property: the conftest profile (derandomized).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lomix.kernels import mixture_lora
from lomix.kernels.torch_backend import mixture_lora_bags, mixture_lora_dense, mixture_lora_sorted, mixture_lora_torch

KERNELS = {
    "dense": mixture_lora_dense,
    "sorted": mixture_lora_sorted,
    "bags": mixture_lora_bags,
    "auto": mixture_lora_torch,
    "public": lambda *args: mixture_lora(*args[:6], out=args[6], backend="torch"),
}


def naive(x, A, B, indices, gates, scale):
    """y[t] = scale * sum_j gates[t, j] * B[e] @ A[e] @ x[t], e = indices[t, j]."""
    rows = [
        scale
        * sum(
            (gates[t, j] * (B[e] @ (A[e] @ x[t])) for j, e in enumerate(indices[t].tolist())), x.new_zeros(B.shape[1])
        )
        for t in range(x.shape[0])
    ]
    return torch.stack(rows) if rows else x @ A.new_zeros(A.shape[2], B.shape[1])  # no tokens: (0, d_out) in the graph


@st.composite
def problems(draw):
    tokens = draw(st.integers(0, 7))
    d_in, d_out, rank = draw(st.integers(1, 10)), draw(st.integers(1, 10)), draw(st.integers(1, 5))
    experts = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))  # k > experts forces repeated ids
    slot = st.integers(0, experts - 1)
    indices = draw(st.lists(st.lists(slot, min_size=k, max_size=k), min_size=tokens, max_size=tokens))
    gate = st.one_of(st.just(0.0), st.floats(-2.0, 2.0, allow_nan=False, width=32))
    gates = draw(st.lists(st.lists(gate, min_size=k, max_size=k), min_size=tokens, max_size=tokens))
    scale = draw(st.one_of(st.just(0.0), st.floats(-3.0, 3.0, allow_nan=False)))
    seed = draw(st.integers(0, 2**16))
    with_out = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "x": torch.randn(tokens, d_in, generator=g, dtype=torch.float64),
        "A": torch.randn(experts, rank, d_in, generator=g, dtype=torch.float64),
        "B": torch.randn(experts, d_out, rank, generator=g, dtype=torch.float64),
        "indices": torch.tensor(indices, dtype=torch.long).view(tokens, k),
        "gates": torch.tensor(gates, dtype=torch.float64).view(tokens, k),
        "out": torch.randn(tokens, d_out, generator=g, dtype=torch.float64) if with_out else None,
    }
    return tensors, scale


@settings(max_examples=150)  # milliseconds each
@given(problems(), st.sampled_from(sorted(KERNELS)))
def test_kernels_equal_the_naive_loop_with_gradients(problem, kernel):
    tensors, scale = problem
    leaves = {n: t.clone().requires_grad_() for n, t in tensors.items() if t is not None and t.is_floating_point()}

    def call(fn):
        args = [leaves.get(n, tensors[n]) for n in ("x", "A", "B", "indices", "gates")]
        out = leaves.get("out")
        if fn is naive:
            delta = naive(*args, scale)
            return delta if out is None else out + delta
        # the fused add may write into ``out``: give the kernel its own copy in the graph
        return KERNELS[kernel](*args, scale, None if out is None else out * 1.0)

    ours, reference = call(KERNELS[kernel]), call(naive)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = sorted(leaves)
    got = torch.autograd.grad(ours, [leaves[n] for n in names], upstream, allow_unused=True)
    expected = torch.autograd.grad(reference, [leaves[n] for n in names], upstream, allow_unused=True)
    for name, a, b in zip(names, got, expected, strict=True):
        a = torch.zeros_like(leaves[name]) if a is None else a
        b = torch.zeros_like(leaves[name]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name} differs ({kernel})")
