"""Test-time rerouting (`lomix.reroute`): offsets go through each router's own rule, adapting them
lowers the sequence's own loss, and the model is bit-exactly as it was afterwards."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts
from torch.nn import functional as F

import lomix
import lomix.reroute

LOGIT_ROUTERS = {
    "topk": {"k": 2},
    "dense": {},
    "glider": {"descriptions": ["a", "b", "c", "d"], "missing_task": "local", "k": 2, "alpha": 0.0},
    "arrow": {"k": 2},
}


def mixture(router: str, **fields):
    model, _ = build_pair(MODEL_CASES["llama"])
    config = lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=4, rank=2, alpha=4,
                                 router=lomix.router_config(router, **fields))  # fmt: skip
    lomix.inject(model, config)
    randomize_experts(model)
    return model.eval()


@pytest.mark.parametrize("router", sorted(LOGIT_ROUTERS))
def test_route_logits_reproduces_the_routers_own_routing(router):
    model = mixture(router, **LOGIT_ROUTERS[router])
    layer = next(layer for _, layer in lomix.mixture_layers(model))
    x = torch.randn(2, 5, layer.d_in)
    routing = layer.router(x, lomix.RoutingContext())
    again = layer.router.route_logits(routing.logits, x, lomix.RoutingContext())
    assert torch.equal(again.indices, routing.indices) and torch.equal(again.gates, routing.gates)


def test_offsets_shift_the_logits_through_topk_per_sequence():
    model = mixture("topk", k=2)
    name, layer = next(iter(lomix.mixture_layers(model)))
    offsets = lomix.reroute.RouterOffsets(model, batch=2, layers=[name])
    with torch.no_grad():
        offsets.offsets[name].copy_(torch.tensor([[3.0, 0, 0, -3.0], [0, -2.0, 2.0, 0]]))
    x = torch.randn(2, 5, layer.d_in)
    logits = F.linear(x.reshape(-1, layer.d_in), layer.router.weight)
    shifted = logits + offsets.offsets[name].detach().repeat_interleave(5, dim=0)
    probs = shifted.softmax(-1)  # the naive top-2 of the shifted logits, renormalised
    top, idx = probs.topk(2, dim=-1)
    offsets.install()
    try:
        routing = layer.router(x, lomix.RoutingContext())
    finally:
        offsets.remove()
    assert torch.equal(routing.indices, idx)
    torch.testing.assert_close(routing.gates, top / top.sum(-1, keepdim=True))
    assert not layer.router._forward_hooks


@pytest.mark.parametrize("router", ["topk", "arrow"])
def test_rerouting_lowers_the_prompt_loss_and_leaves_the_model_unchanged(router):
    model = mixture(router, **LOGIT_ROUTERS[router])
    for name, param in model.named_parameters():
        param.requires_grad_(".router." in name)  # a trainable router must not be written either
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        loss_before = float(lomix.reroute.sequence_loss(model, ids, None))
    with lomix.reroute.rerouted(model, ids, steps=8, lr=0.5) as offsets:
        with torch.no_grad():
            loss_after = float(lomix.reroute.sequence_loss(model, ids, None))
        assert all(o.abs().sum() > 0 for o in offsets.parameters())
    assert loss_after < loss_before - 1e-3
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # bit-exact
        assert param.grad is None and param.requires_grad == flags[name]
    assert all(not layer.router._forward_hooks for _, layer in lomix.mixture_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)  # the router state is restored


def test_rerouted_generation_follows_the_offsets_and_restores_the_router():
    model = mixture("topk", k=2)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    plain = model.generate(input_ids=ids, **settings)
    # zero steps: offsets stay 0, so generation (in one piece or re-prefilled every 2 tokens) is unchanged
    assert torch.equal(lomix.reroute.generate(model, ids, steps=0, **settings), plain)
    assert torch.equal(lomix.reroute.generate(model, ids, steps=0, every=2, **settings), plain)
    # adapted: the same as generating inside `rerouted` with the offsets adapted on the prompt
    out = lomix.reroute.generate(model, ids, steps=4, lr=1.0, **settings)
    with lomix.reroute.rerouted(model, ids, steps=4, lr=1.0):
        inside = model.generate(input_ids=ids, **settings)
    assert torch.equal(out, inside) and out.shape == (1, 14)
    again = lomix.reroute.generate(model, ids, steps=4, lr=1.0, every=3, **settings)
    assert again.shape == (1, 14) and torch.equal(again[:, :11], inside[:, :11])  # re-adapted after 3 tokens
    assert torch.equal(model.generate(input_ids=ids, **settings), plain)


def test_routers_without_logits_and_bad_settings_fail_in_one_line():
    model = mixture("fixed", experts=[0, 1])
    ids = torch.randint(0, 97, (1, 6))
    with pytest.raises(lomix.RoutingError, match="needs router logits; router 'fixed'"):
        with lomix.reroute.rerouted(model, ids, steps=1):
            pass
    assert all(not layer.router._forward_hooks for _, layer in lomix.mixture_layers(model))
    topk = mixture("topk")
    with pytest.raises(lomix.ConfigError, match=r"reroute\.layers"):
        lomix.reroute.RouterOffsets(topk, layers=["nothing_here"])
    with pytest.raises(lomix.ConfigError, match=r"reroute\.lr"):
        with lomix.reroute.rerouted(topk, ids, steps=1, lr=0.0):
            pass
