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


def _replace_router_weight(layer):
    layer.router.weight = nn.Parameter(layer.router.weight.detach() + 0.3)


def _replace_expert_bank_factor(layer):
    layer.experts.A = nn.Parameter(layer.experts.A.detach() * 2.0)


def _replace_base_layer(layer):
    base = nn.Linear(12, 10).requires_grad_(False)
    layer.base_layer = base


@pytest.mark.parametrize(
    "change",
    [_replace_router_weight, _replace_expert_bank_factor, _replace_base_layer],
    ids=["router-weight", "expert-factor", "base-layer"],
)
def test_the_inference_plan_follows_replaced_modules_and_parameters(change):
    # A decode step reuses the path the first call chose (InferencePlan); replacing a parameter or
    # a module object (as accelerate's offload hooks do) must not leave it computing with the old one.
    layer = make_layer(experts=12).eval()
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        layer(x)
        assert "_inference_plan" in layer.__dict__
        change(layer)
        torch.testing.assert_close(layer(x), reference(layer, x)[0])


def test_the_inference_plan_yields_to_recording_disabling_hooks_and_other_token_counts():
    layer = make_layer(experts=12).eval()
    one, many = torch.randn(1, 1, 12), torch.randn(2, 7, 12)
    with torch.no_grad():
        layer(one)
        plan = layer.__dict__["_inference_plan"]
        # the dense branch for many tokens, the selected-experts branch for one, from the same plan
        torch.testing.assert_close(layer(many), reference(layer, many)[0])
        torch.testing.assert_close(layer(one), reference(layer, one)[0])
        assert layer.__dict__["_inference_plan"] is plan
        layer.record_routing = True
        layer(one)
        assert layer.last_routing is not None  # statistics collection sees every call
        layer.record_routing = False
        layer.disabled = True
        torch.testing.assert_close(layer(one), layer.base_layer(one))
        layer.disabled = False
        seen = []
        layer(one)
        for module in (layer.router, layer.base_layer):
            handle = module.register_forward_hook(lambda module, args, out: seen.append(module))
            torch.testing.assert_close(layer(one), reference(layer, one)[0])
            handle.remove()
        assert seen == [layer.router, layer.router, layer.base_layer, layer.base_layer]  # ours, reference's
        layer.double()  # another dtype: decided again (router logits and gates stay float32 in both)
        torch.testing.assert_close(layer(one.double()), reference(layer, one.double())[0], rtol=1e-5, atol=1e-6)


def test_projections_reading_one_input_share_one_gemm_with_the_output_of_each_alone(llama_case):
    # Decode steps group the layers that read the same tensor (q/k/v, gate/up): the first computes
    # every member's routers and shrinks in one GEMM. Reference: each layer's own routing path.
    from conftest import build_pair, randomize_experts

    model, _ = build_pair(llama_case)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lomix.inject(model, lomix.MixtureConfig(target_modules=targets, num_experts=4, rank=4, alpha=8))
    randomize_experts(model)
    layers = [layer for _, layer in lomix.mixture_layers(model)]
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        for layer in layers:
            layer.record_routing = True  # the routing-returning path: no plans, no groups
        expected = model(input_ids=ids).logits
        for layer in layers:
            layer.record_routing = False
        outputs = [model(input_ids=ids).logits for _ in range(3)]  # plans, then groups, then grouped
    groups = {}
    for name, layer in lomix.mixture_layers(model):
        group = layer.__dict__["_inference_plan"].group
        if group is not None:
            groups.setdefault(id(group), []).append(name.rsplit(".", 1)[-1])
    assert {tuple(sorted(names)) for names in groups.values()} == {
        ("gate_proj", "up_proj"),
        ("k_proj", "q_proj", "v_proj"),
    }
    assert len(groups) == 2 * model.config.num_hidden_layers  # per block: q/k/v and gate/up
    for got in outputs:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _TwoReaders(nn.Module):
    """Two mixture layers that read the same input, or (``other`` given) the second reads another."""

    def __init__(self):
        super().__init__()
        self.first, self.second = make_layer(experts=4), make_layer(experts=4)
        self.second._context = self.first._context  # one model's layers share a context holder
        with torch.no_grad():
            self.second.experts.A.mul_(-1.5)

    def forward(self, x, other=None):
        return self.first(x), self.second(x if other is None else other)


def test_a_member_that_reads_another_input_computes_alone_and_leaves_the_group():
    pair = _TwoReaders().eval()
    x, y = torch.randn(2, 12), torch.randn(2, 12)
    with torch.no_grad():
        pair(x)
        pair(x)  # the second joined the first's group; this call ran grouped
        assert pair.first.__dict__["_inference_plan"].group is pair.second.__dict__["_inference_plan"].group
        first, second = pair(x, other=y)
        torch.testing.assert_close(first, reference(pair.first, x)[0])
        torch.testing.assert_close(second, reference(pair.second, y)[0])
        assert pair.second.__dict__["_inference_plan"].group is None
        pair(x)  # observed together again: re-formed
        assert pair.second.__dict__["_inference_plan"].group is not None
        pair.first.experts.A.add_(0.25)  # an update between grouped calls rebuilds the grouped factors
        first, second = pair(x)
    torch.testing.assert_close(first, reference(pair.first, x)[0])
    torch.testing.assert_close(second, reference(pair.second, x)[0])
