"""The torch kernels against a naive per-token, per-slot loop (the formula of `lomix.kernels.mixture_lora`)."""

from __future__ import annotations

import pytest
import torch

from lomix.kernels import mixture_lora, mixture_lora_mixed
from lomix.kernels.torch_backend import (
    mixture_lora_bags,
    mixture_lora_dense,
    mixture_lora_sorted,
    mixture_lora_torch,
    prefers_dense,
)

STRATEGIES = {
    "dense": mixture_lora_dense,
    "sorted": mixture_lora_sorted,
    "bags": mixture_lora_bags,
    "auto": mixture_lora_torch,
}


def naive_mixture(x, A, B, indices, gates, scale):
    """y[t] = scale * sum_j gates[t, j] * B[e] @ (A[e] @ x[t]), e = indices[t, j], one token at a time."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(B.shape[1], dtype=x.dtype)
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            y = y + gates[t, j] * (B[e] @ (A[e] @ x[t]))
        rows.append(y * scale)
    return torch.stack(rows)


def random_problem(tokens, d_in, d_out, rank, experts, k, dtype, seed=0, distinct=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=dtype)
    A = torch.randn(experts, rank, d_in, generator=g, dtype=dtype) / d_in**0.5
    B = torch.randn(experts, d_out, rank, generator=g, dtype=dtype) / rank**0.5
    if distinct:
        indices = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    else:
        indices = torch.randint(0, experts, (tokens, k), generator=g)
    gates = torch.rand(tokens, k, generator=g, dtype=dtype)
    return [t.requires_grad_(t.is_floating_point()) for t in (x, A, B, indices, gates)]


def grads(fn, x, A, B, indices, gates, scale, seed=3):
    out = fn(x, A, B, indices, gates, scale)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (x, A, B, gates), upstream))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize(
    "tokens,d_in,d_out,rank,experts,k",
    [(13, 24, 20, 4, 5, 2), (1, 16, 16, 8, 8, 1), (9, 12, 30, 2, 3, 3), (6, 8, 8, 4, 1, 1)],
)
def test_forward_and_gradients_match_naive_loop(strategy, dtype, tol, tokens, d_in, d_out, rank, experts, k):
    problem = random_problem(tokens, d_in, d_out, rank, experts, k, dtype)
    ours = grads(STRATEGIES[strategy], *problem, scale=1.7)
    ref = grads(naive_mixture, *problem, scale=1.7)
    for name, a, b in zip(("out", "dx", "dA", "dB", "dgates"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{name} differs")


@pytest.mark.parametrize("strategy", ["dense", "sorted", "bags"])
def test_repeated_expert_in_a_row_adds_up(strategy):
    # Routers that pad rows repeat an expert with gate 0; the sum semantics must hold either way.
    problem = random_problem(7, 10, 6, 3, 4, 3, torch.float64, distinct=False)
    torch.testing.assert_close(STRATEGIES[strategy](*problem, 0.5), naive_mixture(*problem, 0.5))


def test_all_tokens_on_one_expert_and_empty_experts():
    x, A, B, _, gates = random_problem(11, 16, 12, 4, 6, 2, torch.float64)
    indices = torch.tensor([[2, 5]] * 11)
    for fn in STRATEGIES.values():
        torch.testing.assert_close(fn(x, A, B, indices, gates, 2.0), naive_mixture(x, A, B, indices, gates, 2.0))


@pytest.mark.parametrize("strategy", ["dense", "sorted", "bags"])
def test_gradcheck_fp64(strategy):
    x, A, B, indices, gates = random_problem(5, 6, 7, 2, 4, 2, torch.float64)
    fn = STRATEGIES[strategy]
    assert torch.autograd.gradcheck(lambda x, A, B, g: fn(x, A, B, indices, g, 0.7), (x, A, B, gates))


def test_public_entry_point_uses_torch_on_cpu_and_validates_shapes():
    problem = random_problem(4, 8, 8, 2, 3, 2, torch.float32)
    torch.testing.assert_close(mixture_lora(*problem, 1.0), naive_mixture(*problem, 1.0))
    x, A, B, indices, gates = problem
    with pytest.raises(ValueError, match="inconsistent shapes"):
        mixture_lora(x, A[:, :, :4], B, indices, gates, 1.0)
    with pytest.raises(ValueError, match="must be"):
        mixture_lora(x, A, B, indices[:2], gates[:2], 1.0)


def naive_mixed(x, A, B, weights, scale):
    """Per sequence: build A, B head by head from the weighted experts' slices, then B A x."""
    batch, heads, experts = weights.shape
    d_in, d_out = A.shape[2], B.shape[1]
    out = []
    for b in range(batch):
        a_rows = []
        b_rows = []
        for q in range(heads):
            a_slice = slice(q * d_in // heads, (q + 1) * d_in // heads)
            b_slice = slice(q * d_out // heads, (q + 1) * d_out // heads)
            a_rows.append(sum(weights[b, q, e] * A[e][:, a_slice] for e in range(experts)))
            b_rows.append(sum(weights[b, q, e] * B[e][b_slice, :] for e in range(experts)))
        a_mix, b_mix = torch.cat(a_rows, dim=1), torch.cat(b_rows, dim=0)
        out.append(scale * x[b] @ a_mix.T @ b_mix.T)
    return torch.stack(out)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_parameter_mixing_matches_naive_per_head_mixing(heads):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 12, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, heads, 4, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    ours = mixture_lora_mixed(x, A, B, w, 0.5)
    ref = naive_mixed(x, A, B, w, 0.5)
    torch.testing.assert_close(ours, ref)
    up = torch.randn_like(ours)
    for a, b in zip(
        torch.autograd.grad(ours, (x, A, B, w), up), torch.autograd.grad(ref, (x, A, B, w), up), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fused_output_add_equals_separate_add(strategy):
    x, A, B, indices, gates = random_problem(9, 8, 6, 2, 4, 2, torch.float64)
    base = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    fused = STRATEGIES[strategy](x, A, B, indices, gates, 0.3, base)
    torch.testing.assert_close(fused, base + naive_mixture(x, A, B, indices, gates, 0.3))
    (grad_base,) = torch.autograd.grad(fused.sum(), base)
    torch.testing.assert_close(grad_base, torch.ones_like(base))


@pytest.mark.parametrize("skewed", [False, True, "one"])
@pytest.mark.parametrize("strategy", ["sorted", "bags"])
def test_sparse_strategies_match_the_naive_loop_under_any_skew(strategy, skewed):
    # 16 experts, k=2: all tokens on two experts (or every pair on one expert, a repeated id) give
    # those experts several chunks and the others none.
    x, A, B, indices, gates = random_problem(10, 12, 9, 3, 16, 2, torch.float64)
    if skewed is True:
        indices = torch.tensor([[3, 11]] * 10)
    elif skewed == "one":
        indices = torch.full((10, 2), 7)
    ours = grads(STRATEGIES[strategy], x, A, B, indices, gates, 0.9)
    ref = grads(naive_mixture, x, A, B, indices, gates, 0.9)
    for name, a, b in zip(("out", "dx", "dA", "dB", "dgates"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, msg=f"{name} differs")


def test_strategy_rule_keeps_dense_for_few_experts_or_little_work():
    # E <= 4k: dense at any size; many experts: dense only while the dense work is small.
    assert prefers_dense(8, 16, 2048, 2048, 2, 1 << 20)
    assert prefers_dense(64, 8, 576, 1536, 2, 16)
    assert not prefers_dense(64, 8, 576, 1536, 2, 4096)
    assert prefers_dense(4, 8, 576, 1536, 4, 4096)  # k == E: nothing to skip


def test_auto_takes_bags_beyond_dense_on_the_cpu_in_fp32_and_the_grid_elsewhere(monkeypatch):
    # Many experts and enough tokens leave dense; fp32/fp64 CPU then runs the bags (their sampled
    # product has no bf16 kernel), a bf16 input the sorted grid; both give the naive loop's delta.
    from lomix.kernels import torch_backend

    calls = []
    for name in ("mixture_lora_bags", "mixture_lora_sorted"):
        original = getattr(torch_backend, name)
        monkeypatch.setattr(torch_backend, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    monkeypatch.setattr(torch_backend, "DENSE_MAX_MACS", 0)
    for dtype, expected in [(torch.float32, "mixture_lora_bags"), (torch.bfloat16, "mixture_lora_sorted")]:
        x, A, B, indices, gates = random_problem(12, 8, 6, 2, 16, 2, dtype)
        out = torch_backend.mixture_lora_torch(x, A, B, indices, gates, 0.5)
        ref = naive_mixture(*(t.double() if t.is_floating_point() else t for t in (x, A, B, indices, gates)), 0.5)
        torch.testing.assert_close(out.double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=2e-2)
        assert calls.pop() == expected


def test_the_chunk_grid_stays_near_the_real_pairs_under_skew():
    from lomix.kernels.torch_backend import _expert_chunks

    generator = torch.Generator().manual_seed(0)
    for experts, tokens, k, power in [(64, 768, 2, 8), (64, 768, 2, 0), (8, 5, 2, 1), (16, 300, 4, 8), (8, 1536, 2, 0)]:
        weights = torch.rand(experts, generator=generator) ** power  # power 8: a few experts take most pairs
        indices = torch.multinomial(weights.expand(tokens, -1), k, generator=generator)
        order, slot, chunk_expert, capacity = _expert_chunks(indices, experts)
        pairs = tokens * k
        counts = torch.bincount(indices.reshape(-1), minlength=experts)
        # never worse than one chunk per expert padded to the largest, nor than chunks of the mean size
        mean = -(-pairs // experts)
        assert chunk_expert.numel() * capacity <= min(experts * int(counts.max()), pairs + experts * mean)
        assert slot.unique().numel() == pairs  # every pair its own row
        assert torch.equal(chunk_expert[slot // capacity], indices.reshape(-1)[order])  # in its expert's chunk


def test_bags_take_strided_inputs_and_factors():
    # x, A, B transposed views and column-major indices (a layer may hand any of them over): the
    # sampled product and embedding_bag must read them as the naive loop does.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 10, generator=g, dtype=torch.float64).t().requires_grad_()
    A = torch.randn(16, 12, 3, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    B = torch.randn(16, 3, 9, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    indices = torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(10)]).t().contiguous().t()
    gates = torch.rand(10, 2, generator=g, dtype=torch.float64, requires_grad=True)
    ours = grads(mixture_lora_bags, x, A, B, indices, gates, 0.7)
    ref = grads(naive_mixture, x, A, B, indices, gates, 0.7)
    for name, a, b in zip(("out", "dx", "dA", "dB", "dgates"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, msg=f"{name} differs")


def test_bags_regroup_entries_by_column_as_a_stable_sort_does():
    # The backward places the T*k*r entries by sorting only the T*k pairs: it must give exactly the
    # order (and column starts) of a stable sort of all entries, repeated experts in a row included.
    from lomix.kernels.torch_backend import _by_column

    generator = torch.Generator().manual_seed(2)
    for tokens, experts, k, rank in [(50, 16, 2, 8), (7, 4, 3, 2), (1, 8, 1, 1), (30, 6, 2, 3)]:
        indices = torch.randint(0, experts, (tokens, k), generator=generator)
        bags = (indices.unsqueeze(-1) * rank + torch.arange(rank)).reshape(tokens, k * rank)
        order, token, offsets = _by_column(bags, experts, rank)
        flat = bags.reshape(-1)
        expected = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=experts * rank)
        assert torch.equal(order, expected)
        assert torch.equal(token, expected // (k * rank))
        assert torch.equal(offsets, counts.cumsum(0) - counts)


@pytest.mark.parametrize("bad", [-1, 16, 1_000_000])
def test_bags_refuse_expert_ids_out_of_range(bad):
    # The sampled product reads columns unchecked: a bad id must be an error, not a read outside A.
    x, A, B, indices, gates = random_problem(6, 8, 5, 2, 16, 2, torch.float32)
    indices = indices.detach().clone()
    indices[2, 1] = bad
    with pytest.raises(IndexError, match=r"\[0, 16\)"):
        mixture_lora_bags(x, A, B, indices, gates, 0.5)


def test_bags_run_with_sparse_invariant_checks_switched_on():
    x, A, B, indices, gates = random_problem(6, 8, 5, 2, 16, 2, torch.float64)
    with torch.sparse.check_sparse_tensor_invariants():
        torch.testing.assert_close(
            mixture_lora_bags(x, A, B, indices, gates, 0.5), naive_mixture(x, A, B, indices, gates, 0.5)
        )
