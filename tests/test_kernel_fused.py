"""The fused mixture layer (router + shrink in one launch, expand inside the base GEMM) against the
torch reference: base F.linear + softmax top-k router + `mixture_lora_dense`, forward and every
gradient (x, W, bias, router weight, A, B, and the logits' path into balance losses).

Without a GPU the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1);
shapes stay tiny and tiles large because the interpreter is slow per program.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytest.importorskip("triton", reason="the fused kernels need the triton package (make test installs it)")

import lomix  # noqa: E402
from lomix.errors import ConfigError  # noqa: E402
from lomix.kernels import fused, fused_backend, fused_tuning  # noqa: E402
from lomix.kernels.fused_tuning import FusedTuning, GemmTiles, ShrinkTiles  # noqa: E402
from lomix.kernels.torch_backend import mixture_lora_dense, mixture_lora_sorted  # noqa: E402
from lomix.layer import MixtureLinear  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    """The layer tests exercise the fused path on any device: on a GPU without a measured tuning file
    it is off unless forced (`test_an_unmeasured_gpu_keeps_todays_path`)."""
    monkeypatch.setenv("LOMIX_FUSED", "1")
    fused_tuning.clear_cache()
    yield
    fused_tuning.clear_cache()


def test_an_unmeasured_gpu_keeps_todays_path(monkeypatch):
    """No tuning file for a GPU means the fused kernels were never measured there: max_columns 0 (no
    layer qualifies) unless LOMIX_FUSED=1; a file, or the interpreter on the CPU, gives its settings."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(fused_tuning, "tuning_path", lambda device: None)
    monkeypatch.delenv("LOMIX_FUSED")
    fused_tuning.clear_cache()
    assert fused_tuning.tuning_for(gpu).max_columns == 0
    assert fused_tuning.tuning_for(torch.device("cpu")).max_columns == FusedTuning().max_columns > 0
    monkeypatch.setenv("LOMIX_FUSED", "1")
    assert fused_tuning.tuning_for(gpu).max_columns == FusedTuning().max_columns


def problem(tokens, d_in, d_out, experts, rank, bias=True, dtype=torch.float32, seed=0, hot_expert=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g)
    weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if bias else None
    router = torch.randn(experts, d_in, generator=g)
    if hot_expert is not None:  # every token's largest logit: positive inputs, a large positive row
        x = x.abs() + 0.1
        router[hot_expert] += 1.0  # ~20 above the others: the rest stay distinct in fp32
    A = torch.randn(experts, rank, d_in, generator=g) / d_in**0.5
    B = torch.randn(experts, d_out, rank, generator=g) / rank**0.5
    up_y = torch.randn(tokens, d_out, generator=g)
    up_logits = torch.randn(tokens, experts, generator=g)

    def leaf(t, dt=torch.float32):
        return None if t is None else t.to(DEVICE, dt).requires_grad_()

    return dict(
        x=leaf(x, dtype), weight=leaf(weight, dtype), bias=leaf(b, dtype), router=leaf(router),
        A=leaf(A), B=leaf(B), up_y=up_y.to(DEVICE, dtype), up_logits=up_logits.to(DEVICE),
    )  # fmt: skip


def reference(p, k, renormalize, scale):
    """The unfused computation in fp32: base linear, softmax top-k router, dense-masked mixture.
    Like `LinearGate`, the router weight is rounded to x's dtype for half-precision inputs."""
    x = p["x"].float()
    logits = x @ p["router"].to(p["x"].dtype).float().t()
    probs = logits.softmax(-1)
    gates, indices = probs.topk(k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    bias = None if p["bias"] is None else p["bias"].float()
    y = torch.nn.functional.linear(x, p["weight"].float(), bias)
    y = y + mixture_lora_dense(x, p["A"], p["B"], indices, gates, scale)
    return y, logits, indices, gates


def leaves(p):
    return [p[n] for n in ("x", "weight", "bias", "router", "A", "B") if p[n] is not None]


def loss(p, y, logits):
    # The logits' own term stands for a balance loss reading them (switch / z-loss).
    return (y.float() * p["up_y"].float()).sum() + (logits.softmax(-1) * p["up_logits"]).sum()


def assert_fused_matches(
    tokens, d_in, d_out, experts, rank, k, renormalize=True, bias=True, dtype=torch.float32, tuning=None, **kw
):
    p = problem(tokens, d_in, d_out, experts, rank, bias, dtype, **kw)
    scale = 1.3
    y, logits, indices, gates = fused_backend.fused_mixture_linear(
        p["x"], p["weight"], p["bias"], p["router"], p["A"], p["B"], scale, k, renormalize, tuning or FusedTuning()
    )
    ry, rlogits, rindices, rgates = reference(p, k, renormalize, scale)
    assert y.dtype == dtype and y.shape == (tokens, d_out)
    assert torch.equal(indices.cpu(), rindices.cpu()), "a different expert selection"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(gates, rgates.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(logits, rlogits.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(y.float(), ry.detach(), rtol=tol, atol=tol)
    ours = torch.autograd.grad(loss(p, y, logits), leaves(p))
    ref = torch.autograd.grad(loss(p, ry, rlogits), leaves(p))
    names = [n for n in ("x", "weight", "bias", "router", "A", "B") if p[n] is not None]
    for name, a, b in zip(names, ours, ref, strict=True):
        assert a.dtype == p[name].dtype, name
        scale_of = b.abs().max().item() + 1e-6
        torch.testing.assert_close(
            a.float() / scale_of, b.float() / scale_of, rtol=tol, atol=tol, msg=f"d{name} differs ({dtype})"
        )
    return indices


@pytest.mark.parametrize(
    "tokens,d_in,d_out,experts,rank,k,renormalize,bias",
    [
        (19, 40, 24, 8, 4, 2, True, True),  # T not a multiple of the block, d not a power of two
        (1, 24, 40, 8, 16, 4, True, False),  # one token
        (7, 24, 20, 1, 16, 1, True, True),  # one expert
        (5, 16, 24, 64, 4, 4, False, True),  # 64 experts, raw (not renormalised) gates
        (11, 20, 16, 4, 64, 2, True, False),  # rank 64
        (33, 48, 36, 8, 16, 1, False, True),  # several row blocks, k=1
    ],
)
def test_fused_forward_and_gradients_match_reference(tokens, d_in, d_out, experts, rank, k, renormalize, bias):
    assert_fused_matches(tokens, d_in, d_out, experts, rank, k, renormalize, bias)


def test_frozen_experts_and_base_train_only_the_router():
    # Plug-and-play mixtures: the experts and the base are frozen, the router and x get gradients.
    p = problem(9, 24, 20, 8, 4)
    for name in ("weight", "bias", "A", "B"):
        p[name].requires_grad_(False)
    y, logits, _, _ = fused_backend.fused_mixture_linear(
        p["x"], p["weight"], p["bias"], p["router"], p["A"], p["B"], 1.3, 2, True, FusedTuning()
    )
    ry, rlogits, _, _ = reference(p, 2, True, 1.3)
    ours = torch.autograd.grad(loss(p, y, logits), (p["x"], p["router"]))
    ref = torch.autograd.grad(loss(p, ry, rlogits), (p["x"], p["router"]))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_all_tokens_on_one_expert():
    indices = assert_fused_matches(13, 24, 16, 8, 4, 2, hot_expert=3)
    assert (indices[:, 0] == 3).all()


def test_small_tiles_cover_every_block_and_the_grouped_launch_order():
    # 16-wide tiles: 3 row blocks x 3 column blocks, GROUP_M=2 (a partial last group), K split
    # into several tiles in every segment, for both the forward and the backward GEMM.
    tiles = GemmTiles(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2)
    shrink = ShrinkTiles(block_m=16, block_k=16, num_warps=4, num_stages=2)
    tuning = FusedTuning(gemm=tiles, decode_gemm=tiles, shrink=shrink, decode_shrink=shrink)
    assert_fused_matches(37, 40, 44, 4, 8, 2, tuning=tuning)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    assert_fused_matches(13, 40, 24, 8, 4, 2, dtype=dtype)


def test_inference_reuses_converted_weights_until_they_change():
    # fp16 inputs over fp32 experts: inference keeps the fp16 copies; an in-place update is seen.
    p = problem(6, 24, 16, 4, 4, dtype=torch.float16)
    args = lambda: (p["x"], p["weight"], p["bias"], p["router"], p["A"], p["B"], 1.0, 2, True, FusedTuning())  # noqa: E731
    with torch.no_grad():
        first = fused_backend.fused_mixture_linear(*args())[0]
        assert p["A"]._lomix_fused_a_float16[1].dtype == torch.float16
        kept = p["A"]._lomix_fused_a_float16[1]
        again = fused_backend.fused_mixture_linear(*args())[0]
        assert p["A"]._lomix_fused_a_float16[1] is kept
        p["A"].mul_(3.0)
        p["B"].mul_(-1.0)
        updated = fused_backend.fused_mixture_linear(*args())[0]
    torch.testing.assert_close(again, first)
    expected = reference(p, 2, True, 1.0)[0]
    torch.testing.assert_close(updated.float(), expected, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(updated, first, atol=1e-2)


class _SyncOrDynamicShape(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that read a device value on the host or give data-dependent shapes."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "item")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(name.startswith(f) for f in self.FORBIDDEN):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_decode_step_has_no_host_sync_nor_data_dependent_shapes():
    # What CUDA-graph capture needs: checked here op by op (the GPU check captures a graph).
    p = problem(4, 24, 16, 8, 4)
    tuning = FusedTuning()
    with _SyncOrDynamicShape() as mode:
        y, logits, _, _ = fused_backend.fused_mixture_linear(
            p["x"], p["weight"], p["bias"], p["router"], p["A"], p["B"], 2.0, 2, True, tuning
        )
        torch.autograd.grad(loss(p, y, logits), leaves(p))
    assert mode.seen == []
    layer = make_layer("triton").eval()  # the whole layer's decode step, one token
    token = torch.randn(1, 1, 24, device=DEVICE)
    assert fused.fused_rule(layer, token) is not None
    with torch.no_grad(), _SyncOrDynamicShape() as mode:
        layer(token)
    assert mode.seen == []
    with _SyncOrDynamicShape() as mode:  # the detector does see the sorted torch path's sync
        idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3]], device=DEVICE)
        mixture_lora_sorted(
            p["x"].detach(), p["A"].detach(), p["B"].detach(), idx, torch.ones(4, 2, device=DEVICE), 1.0
        )
    assert mode.seen


# ---------------------------------------------------------------------------------------------
# the layer: which calls take the fused path, and that they match today's path


def make_layer(kernel="triton", router=None, base=None, dropout=0.0, experts=4, rank=4, seed=0):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(24, 20, bias=True)
    config = lomix.MixtureConfig(
        target_modules=["x"],
        num_experts=experts,
        rank=rank,
        kernel=kernel,
        dropout=dropout,
        router=router or lomix.routers.router_config("topk", k=2),
        balance=lomix.BalanceConfig(switch=0.1, z_loss=0.01),
    )
    layer = MixtureLinear(base, config, name="x")
    with torch.no_grad():
        layer.experts.B.normal_(std=0.2)
    return layer.to(DEVICE)


def test_layer_fused_path_matches_the_torch_backend(monkeypatch):
    calls = []
    real = fused_backend.fused_mixture_linear
    monkeypatch.setattr(fused_backend, "fused_mixture_linear", lambda *a: calls.append(1) or real(*a))
    fused_layer, torch_layer = make_layer("triton"), make_layer("torch")
    torch_layer.load_state_dict(fused_layer.state_dict())
    x = torch.randn(2, 5, 24, device=DEVICE)
    results = []
    for layer in (fused_layer, torch_layer):
        layer.train()
        layer.record_routing = True
        y = layer(x)
        total = y.square().mean() + sum(layer.aux_losses.values())
        grads = torch.autograd.grad(total, [p for p in layer.parameters() if p.requires_grad])
        results.append((y, layer.aux_losses, layer.last_routing, grads))
    assert len(calls) == 1  # the triton layer took the fused path, the torch layer did not
    (y, aux, routing, grads), (ry, raux, rrouting, rgrads) = results
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    assert aux.keys() == raux.keys() == {"switch", "z_loss"}
    for name in aux:
        torch.testing.assert_close(aux[name], raux[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(routing.indices, rrouting.indices)
    torch.testing.assert_close(routing.gates, rrouting.gates, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layers_that_do_not_qualify_keep_todays_path(monkeypatch, tmp_path):
    x = torch.randn(3, 24, device=DEVICE)
    assert fused.fused_rule(make_layer("triton"), x) is not None
    assert fused.fused_rule(make_layer("torch"), x) is None  # backend option
    monkeypatch.setenv("LOMIX_FUSED", "0")
    assert fused.fused_rule(make_layer("triton"), x) is None
    monkeypatch.delenv("LOMIX_FUSED")
    jitter = make_layer("triton", router=lomix.routers.router_config("topk", k=2, jitter=0.1))
    assert fused.fused_rule(jitter, x) is None  # noise per token in training
    assert fused.fused_rule(jitter.eval(), x) is not None
    assert fused.fused_rule(make_layer("triton", dropout=0.1), x) is None  # experts see other inputs
    assert fused.fused_rule(make_layer("triton", router=lomix.routers.router_config("dense")), x) is None
    subclass = type("HookedLinear", (nn.Linear,), {})(24, 20)  # bitsandbytes' layers are subclasses
    assert fused.fused_rule(make_layer("triton", base=subclass), x) is None
    hooked = nn.Linear(24, 20)
    hooked.register_forward_hook(lambda *a: None)
    assert fused.fused_rule(make_layer("triton", base=hooked), x) is None
    assert fused.fused_rule(make_layer("triton"), x.double()) is None  # base weight in another dtype
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        assert fused.fused_rule(make_layer("triton"), x) is None  # autocast chooses the GEMM's dtype
    # wider than the GPU's measured threshold: the sorted (grouped) kernels
    tuning = tmp_path / "t.json"
    tuning.write_text(json.dumps({"gpu": "test", "max_columns": 8}))
    monkeypatch.setenv("LOMIX_KERNEL_TUNING", str(tuning))
    fused_tuning.clear_cache()
    assert fused.fused_rule(make_layer("triton", experts=4, rank=2), x) is not None
    assert fused.fused_rule(make_layer("triton", experts=4, rank=4), x) is None


def test_a_bitsandbytes_base_falls_back_and_still_runs():
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear8bitLt(24, 20, has_fp16_weights=False, bias=False)
    layer = make_layer("triton", base=base)
    x = torch.randn(3, 24, device=DEVICE)
    assert fused.fused_rule(layer, x) is None
    layer.record_routing = True
    y = layer(x)
    routing = layer.last_routing
    A, B = layer.experts.A, layer.experts.B
    expected = base(x) + mixture_lora_dense(x, A, B, routing.indices, routing.gates, layer.scale)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_a_failing_fused_kernel_falls_back_once_and_keeps_the_mixture_kernels(monkeypatch):
    import lomix.kernels as kernels

    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(fused, "_fused_broken", None)

    def broken(*args):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(fused_backend, "fused_mixture_linear", broken)
    layer = make_layer("triton")
    layer.record_routing = True
    x = torch.randn(3, 24, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="out of resources"):
        y = layer(x)
    assert fused._fused_broken is not None and kernels._triton_broken is None
    assert fused.fused_rule(layer, x) is None  # off for the rest of the process
    routing = layer.last_routing
    A, B = layer.experts.A, layer.experts.B
    expected = layer.base_layer(x) + mixture_lora_dense(x, A, B, routing.indices, routing.gates, layer.scale)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# per-GPU tuning files


def test_tuning_file_overrides_defaults_and_names_the_file_on_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(fused_tuning, "TUNING_DIR", tmp_path)
    fused_tuning.clear_cache()
    assert fused_tuning.tuning_for(torch.device("cpu")) == FusedTuning()  # no file: defaults
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"gpu": "X", "max_columns": 512, "gemm": {"block_m": 64, "num_stages": 3}}))
    monkeypatch.setenv("LOMIX_KERNEL_TUNING", str(good))
    tuning = fused_tuning.tuning_for(torch.device("cpu"))
    assert (tuning.max_columns, tuning.gemm.block_m, tuning.gemm.num_stages) == (512, 64, 3)
    assert tuning.gemm.block_n == GemmTiles().block_n  # fields not in the file keep their default
    for bad, field in (
        ({"gemm": {"block_m": 48}}, "gemm.block_m"),
        ({"max_colums": 3}, "max_colums"),
        ({"shrink": {"block_m": 0}}, "shrink.block_m"),
    ):
        path = tmp_path / f"bad{len(field)}.json"
        path.write_text(json.dumps(bad))
        monkeypatch.setenv("LOMIX_KERNEL_TUNING", str(path))
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
            fused_tuning.tuning_for(torch.device("cpu"))
        assert str(path) in str(err.value)
    monkeypatch.setenv("LOMIX_KERNEL_TUNING", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="LOMIX_KERNEL_TUNING"):
        fused_tuning.tuning_for(torch.device("cpu"))
    fused_tuning.clear_cache()


def test_gpu_slug_names_the_file():
    assert fused_tuning.gpu_slug("NVIDIA H200") == "nvidia_h200"
    assert fused_tuning.gpu_slug("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia_geforce_rtx_4090_24gb"


@pytest.mark.slow
def test_autotune_script_writes_a_tuning_file_the_layer_reads(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "autotune_fused.py"
    out = tmp_path / "tuning.json"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.setenv("LOMIX_KERNEL_TUNING", str(out))
    fused_tuning.clear_cache()
    tuning = fused_tuning.tuning_for(torch.device("cpu"))
    assert tuning.gpu == "cpu-smoke"
    sweeps = {json.loads(line)["sweep"] for line in result.stdout.splitlines() if line.startswith('{"sweep"')}
    assert sweeps == {"gemm", "decode_gemm", "shrink", "decode_shrink", "max_columns"}
    fused_tuning.clear_cache()
