"""The Triton backend against the torch reference: forward and every gradient.

On a machine without a GPU the kernels run under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with a GPU they run on it. Interpreter runs
are slow per program, so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytest.importorskip("triton", reason="the Triton backend needs the triton package (make test installs it)")

import lomix.kernels as kernels  # noqa: E402
from lomix.kernels import triton_backend  # noqa: E402
from lomix.kernels.torch_backend import mixture_lora_dense  # noqa: E402

# rtol = atol per output and dtype. fp16/bf16 round the operands to 10 and 7 mantissa bits (the
# reference computes in fp32) and reorder sums (atomics). Set at 2-3x what the kernels achieve on
# test_half_precision_inputs' problem: the smallest t with |ours - ref| <= t + t |ref| measured under
# TRITON_INTERPRET=1 for the masked strategy (its GEMMs round to half precision as a GPU's tensor cores
# do for both strategies; the interpreter runs the sorted kernels in fp32, error ~1e-6) was
#   bf16: out 8.6e-3, dx 8.1e-3, dgates 1.3e-2, dA 2.0e-2, dB 1.0e-2 (seeds 1, 2: at most 9.7e-3,
#         9.7e-3, 2.2e-2, 3.1e-2, 1.6e-2)
#   fp16: out 9.5e-4, dx 7.4e-4, dgates 1.8e-3, dA 2.3e-3, dB 9.5e-4 (seeds 1, 2: at most 9.4e-4,
#         1.6e-3, 2.6e-3, 3.1e-3, 1.2e-3)
TOLERANCE = {
    torch.float32: dict.fromkeys(("out", "dx", "dA", "dB", "dgates"), 1e-5),
    torch.float16: {"out": 3e-3, "dx": 3e-3, "dgates": 5e-3, "dA": 6e-3, "dB": 3e-3},
    torch.bfloat16: {"out": 2e-2, "dx": 2e-2, "dgates": 3e-2, "dA": 5e-2, "dB": 3e-2},
}


def problem(tokens, d_in, d_out, rank, experts, k, dtype=torch.float32, seed=0, indices=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    A = torch.randn(experts, rank, d_in, generator=g) / d_in**0.5
    B = torch.randn(experts, d_out, rank, generator=g) / rank**0.5
    if indices is None:
        indices = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    gates = torch.rand(tokens, k, generator=g)
    upstream = torch.randn(tokens, d_out, generator=g)
    to = dict(device=DEVICE)
    return (
        x.to(dtype=dtype, **to).requires_grad_(),
        A.to(**to).requires_grad_(),
        B.to(**to).requires_grad_(),
        indices.to(**to),
        gates.to(**to).requires_grad_(),
        upstream.to(dtype=dtype, **to),
    )


def run(fn, x, A, B, indices, gates, upstream, scale=1.3):
    out = fn(x, A, B, indices, gates, scale)
    return (out, *torch.autograd.grad(out, (x, A, B, gates), upstream))


def reference(x, A, B, indices, gates, scale):
    """The torch reference in fp32 (A, B are fp32; x is upcast), returned in x's dtype."""
    return mixture_lora_dense(x.float(), A, B, indices, gates, scale).to(x.dtype)


STRATEGIES = ["masked", "sorted"]


def assert_matches(tokens, d_in, d_out, rank, experts, k, dtype=torch.float32, indices=None, strategy="sorted"):
    data = problem(tokens, d_in, d_out, rank, experts, k, dtype, indices=indices)

    def triton_fn(*args):
        return triton_backend.mixture_lora_triton(*args, strategy=strategy)

    ours = run(triton_fn, *data)
    ref = run(reference, *data)
    for name, a, b in zip(("out", "dx", "dA", "dB", "dgates"), ours, ref, strict=True):
        t = TOLERANCE[dtype][name]
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=t, atol=t, msg=f"{name} differs ({dtype}, {strategy})")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "tokens,d_in,d_out,rank,experts,k",
    [
        (19, 40, 24, 4, 8, 2),  # T not a multiple of the block, d not a power of two
        (7, 24, 40, 8, 1, 1),  # one expert
        (1, 48, 32, 16, 8, 4),  # one token, split-K shrink
        (11, 32, 20, 64, 8, 2),  # large rank
        (5, 16, 16, 8, 64, 4),  # many experts, most of them empty
        (9, 20, 36, 16, 8, 1),
    ],
)
def test_fp32_forward_and_gradients_match_reference(tokens, d_in, d_out, rank, experts, k, strategy):
    assert_matches(tokens, d_in, d_out, rank, experts, k, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, strategy):
    assert_matches(13, 40, 24, 8, 8, 2, dtype=dtype, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_tokens_on_one_expert_and_empty_experts(strategy):
    assert_matches(17, 24, 16, 4, 6, 2, indices=torch.tensor([[3, 1]] * 17), strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_repeated_expert_in_a_row_adds_up(strategy):
    # Routers that pad rows repeat an expert with gate 0; the sum semantics must hold.
    indices = torch.tensor([[1, 1, 2], [0, 3, 0]] * 4 + [[2, 2, 2]])
    assert_matches(9, 16, 24, 4, 4, 3, indices=indices, strategy=strategy)


def test_strategy_follows_shape():
    assert triton_backend.choose_strategy(8, 16, 4096, 4096) == "masked"
    assert triton_backend.choose_strategy(64, 16, 4096, 4096) == "sorted"
    assert triton_backend.choose_strategy(8, 16, 256, 256) == "sorted"  # extra FLOPs 1.0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("as_view", [False, True])
def test_fused_add_into_the_base_output(as_view, strategy):
    # A layer passes its (batch, seq, d_out) base output reshaped to 2-D: a view updated in place.
    x, A, B, indices, gates, upstream = problem(10, 24, 16, 4, 8, 2)
    base = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    target = (base * 1.0).view(2, 5, 16).reshape(10, 16) if as_view else base.clone()
    fused = triton_backend.mixture_lora_triton(x, A, B, indices, gates, 0.5, target, strategy=strategy)
    expected = base + reference(x, A, B, indices, gates, 0.5)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(fused, (x, A, B, gates, base), upstream)
    ref_grads = torch.autograd.grad(expected, (x, A, B, gates, base), upstream)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_experts_skip_their_gradients(strategy):
    # Plug-and-play mixtures train only the router: no dA / dB work, gates still get gradients.
    x, A, B, indices, gates, upstream = problem(6, 16, 16, 4, 4, 2)
    A.requires_grad_(False)
    B.requires_grad_(False)
    out = triton_backend.mixture_lora_triton(x, A, B, indices, gates, 1.0, strategy=strategy)
    dx, dg = torch.autograd.grad(out, (x, gates), upstream)
    rdx, rdg = torch.autograd.grad(reference(x, A, B, indices, gates, 1.0), (x, gates), upstream)
    torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dg, rdg, rtol=1e-5, atol=1e-5)


def test_plan_is_a_stable_sort_by_expert_with_padding():
    indices = torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE)
    plan = triton_backend.make_plan(indices, num_experts=4, block_m=16)
    real = plan.sorted_pair[plan.sorted_pair >= 0].cpu()
    assert real.tolist() == torch.sort(indices.reshape(-1).cpu(), stable=True).indices.tolist()
    pairs = plan.sorted_pair.cpu()
    offsets = plan.padded_offsets.cpu().tolist()
    assert offsets == [0, 16, 32, 48, 48]  # experts 0,1,2 padded to one block each; expert 3 empty
    flat = indices.reshape(-1).cpu()
    for expert in range(4):
        segment = pairs[offsets[expert] : offsets[expert + 1]]
        real = segment[segment >= 0]
        assert (flat[real.long()] == expert).all()
        assert sorted(real.tolist()) == sorted((flat == expert).nonzero().flatten().tolist())
    assert (pairs[offsets[-1] :] == -1).all()
    assert plan.block_expert.cpu().tolist()[:3] == [0, 1, 2]


def test_backend_selection_and_env_override(monkeypatch):
    x, A, B, indices, gates, _ = problem(4, 16, 16, 4, 4, 2)
    monkeypatch.setenv("LOMIX_KERNEL", "triton")
    assert kernels.resolve_backend("torch", x.device) == "triton"
    forced = kernels.mixture_lora(x, A, B, indices, gates, 1.0)
    monkeypatch.setenv("LOMIX_KERNEL", "torch")
    assert kernels.resolve_backend("triton", x.device) == "torch"
    torch.testing.assert_close(forced, kernels.mixture_lora(x, A, B, indices, gates, 1.0), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LOMIX_KERNEL", "cuda")
    with pytest.raises(kernels.ConfigError, match="LOMIX_KERNEL"):
        kernels.resolve_backend("auto", x.device)


def test_a_broken_triton_falls_back_to_torch_with_one_warning(monkeypatch):
    x, A, B, indices, gates, _ = problem(4, 16, 16, 4, 4, 2)
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(kernels, "_triton_broken", None)

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_backend, "mixture_lora_triton", broken)
    with pytest.warns(RuntimeWarning, match="PTX assembly failed"):
        out = kernels.mixture_lora(x, A, B, indices, gates, 1.0, backend="triton")
    torch.testing.assert_close(out, reference(x, A, B, indices, gates, 1.0), rtol=1e-5, atol=1e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.mixture_lora(x, A, B, indices, gates, 1.0, backend="triton")  # no second warning


def test_a_model_trained_through_triton_matches_the_torch_backend():
    from conftest import MODEL_CASES, build_pair, randomize_experts

    import lomix

    case = MODEL_CASES["llama"]
    models = []
    for kernel in ("torch", "triton"):
        model, _ = build_pair(case)
        lomix.inject(
            model, lomix.MixtureConfig(target_modules=["v_proj", "up_proj"], num_experts=4, rank=4, kernel=kernel)
        )
        randomize_experts(model)
        models.append(model.to(DEVICE))
    inputs = {k: v.to(DEVICE) for k, v in case.inputs(torch.Generator().manual_seed(0)).items()}
    outs = [m(**inputs).logits for m in models]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for out in outs:
        out.square().mean().backward()
    for (name, p_torch), (_, p_triton) in zip(*(m.named_parameters() for m in models), strict=True):
        if p_torch.requires_grad:
            torch.testing.assert_close(p_triton.grad, p_torch.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_gpu_benchmark_script_runs_in_smoke_mode():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smoke run finished: 4 rows, notes: {}" in result.stdout
