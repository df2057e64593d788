"""The torch backend's one-GEMM router+shrink path (lomix.kernels.routed_dense) against the unfused
path: the router's own forward, then `mixture_lora_dense`, over the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lomix
from lomix.kernels.torch_backend import mixture_lora_dense
from lomix.losses import switch_load_balancing_loss


def make_layer(k=2, experts=4, dtype=torch.float32, **router):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, dtype=dtype).requires_grad_(False)
    config = lomix.MixtureConfig(
        target_modules=["x"], num_experts=experts, rank=3, alpha=6, router=lomix.router_config("topk", k=k, **router)
    )
    layer = lomix.MixtureLinear(base, config)
    with torch.no_grad():
        layer.experts.B.normal_(std=0.5)
    return layer


def reference(layer, x):
    """base(x) + the routed delta, with the routing of the router's own forward."""
    routing = layer.router(x, lomix.RoutingContext())
    flat = x.reshape(-1, layer.d_in)
    delta = mixture_lora_dense(flat, layer.experts.A, layer.experts.B, routing.indices, routing.gates, layer.scale)
    return layer.base_layer(x) + delta.view(*x.shape[:-1], -1), routing


def _refuse(*args, **kwargs):
    raise AssertionError("the router's forward ran: the one-GEMM path was not taken")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_output_routing_balance_loss_and_gradients_equal_the_unfused_path(k):
    layer = make_layer(k=k).train()
    x = torch.randn(2, 5, 12, dtype=torch.float32, requires_grad=True)
    expected, routing = reference(layer, x)
    params = (x, layer.experts.A, layer.experts.B, layer.router.weight)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), params)
    layer.router.forward = _refuse  # the path must not call it
    got = layer(x)
    torch.testing.assert_close(got, expected)
    last = layer.aux_losses["switch"]
    torch.testing.assert_close(last, 0.01 * switch_load_balancing_loss(routing.probs, routing.indices))
    for name, a, b in zip(
        "x A B router".split(), torch.autograd.grad(got.pow(2).sum(), params), expected_grads, strict=True
    ):
        torch.testing.assert_close(a, b, msg=f"d{name} differs")


def test_inference_reuses_the_stacked_factors_until_a_weight_changes():
    layer = make_layer().eval()
    x = torch.randn(3, 12, dtype=torch.float32)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, reference(layer, x)[0])
        layer.experts.A.mul_(2.0)  # an in-place update: the cache must notice
        layer.router.weight.add_(0.3)
        second = layer(x)
        torch.testing.assert_close(second, reference(layer, x)[0])
    assert not torch.allclose(first, second)


def test_an_update_the_version_counters_miss_is_seen_after_a_train_eval_switch():
    """Writes through `.data` (as DeepSpeed's optimizer makes into its flat buffers) bump no version
    counter; an evaluation between training steps switches eval() on, which must drop the cache."""
    layer = make_layer().eval()
    x = torch.randn(3, 12, dtype=torch.float32)
    with torch.no_grad():
        first = layer(x)
    layer.experts.A.data.mul_(2.0)
    layer.router.weight.data.add_(0.3)
    layer.train().eval()
    with torch.no_grad():
        second = layer(x)
        torch.testing.assert_close(second, reference(layer, x)[0])
    assert not torch.allclose(first, second)


def test_router_hooks_and_expert_dropout_keep_the_router_call():
    layer = make_layer().train()
    x = torch.randn(4, 12, dtype=torch.float32)
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, out: seen.append(out))
    layer(x)
    handle.remove()
    assert len(seen) == 1
    dropped = lomix.MixtureLinear(
        nn.Linear(12, 10, dtype=torch.float32),
        lomix.MixtureConfig(target_modules=["x"], num_experts=4, rank=3, dropout=0.5),
    ).train()
    dropped.router.register_forward_hook(lambda module, args, out: seen.append(out))
    dropped(x)
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("k", "experts", "renormalize", "shape"),
    [
        (2, 4, None, (2, 5, 12)),  # E <= 4k: the masked-softmax gate matrix over the dense intermediate
        (2, 4, False, (3, 12)),  # gates without renormalisation: the softmax's top-k values
        (1, 4, None, (1, 1, 12)),
        (2, 12, None, (1, 1, 12)),  # a decode step over many experts: only the selected factors are read
        (3, 16, False, (1, 12)),
        (2, 12, None, (4, 12)),  # T*k >= E: dense again
    ],
)
def test_inference_without_kept_routing_matches_the_unfused_path(k, experts, renormalize, shape):
    layer = make_layer(k=k, experts=experts, renormalize=renormalize).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected, _ = reference(layer, x)
        layer.router.forward = _refuse
        got = layer(x)
        again = layer(x)  # from the cached factors
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)
    assert layer.last_routing is None and layer.aux_losses == {}


@pytest.mark.parametrize(("k", "experts"), [(1, 6), (2, 6), (2, 12)])
def test_an_evaluation_that_keeps_its_routing_returns_the_routers_decision(k, experts):
    # Statistics collection (record_routing) takes the routing-returning path: same output, and the
    # indices and gates the router's own forward would give.
    layer = make_layer(k=k, experts=experts).eval()
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        expected, routing = reference(layer, x)
        layer.router.forward = _refuse
        layer.record_routing = True
        torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer.last_routing.indices, routing.indices)
    torch.testing.assert_close(layer.last_routing.gates, routing.gates)
    torch.testing.assert_close(layer.last_routing.probs, routing.probs)


def test_a_scale_change_rebuilds_the_inference_cache():
    layer = make_layer().eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        layer(x)
        layer.scale = 0.5  # the cache folds the scale into its expand matrix
        torch.testing.assert_close(layer(x), reference(layer, x)[0])
