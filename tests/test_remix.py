"""ReMix routing and the RLOO estimator, against enumeration and direct statements of the math."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import lomix
import lomix.rloo
from lomix.errors import ConfigError, RoutingError
from lomix.methods.remix.router import gumbel_top_k, sequential_log_prob
from lomix.routers import build_router
from lomix.routing import RoutingContext
from lomix.stats import RoutingStats


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny ops: on a shared 2-core machine a second intra-op thread only adds waiting
    (measured 30x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def product_log_q(logits: torch.Tensor, order: list[int]) -> torch.Tensor:
    """ReMix's log-likelihood (docs/methods.md), float64: sum_j log q_{i_j} - log(1 - sum_{j'<j} q_{i_j'})."""
    q = logits.double().softmax(-1)
    total, taken = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for i in order:
        total = total + torch.log(q[i]) - torch.log(1 - taken)
        taken = taken + q[i]
    return total


def remix(num_experts=5, d_in=6, **fields):
    return build_router(lomix.router_config("remix", **fields), d_in, num_experts)


# ------------------------------------------------------------------------------------------ log Q


def test_log_q_equals_the_product_formula_of_sequential_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g) * 2
    indices = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(50)])
    got = sequential_log_prob(logits, indices)
    assert got.dtype == torch.float32
    expected = torch.stack([product_log_q(row, order.tolist()) for row, order in zip(logits, indices, strict=True)])
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # the gradient too (the router trains through it)
    leaf = logits.clone().requires_grad_()
    sequential_log_prob(leaf, indices).sum().backward()
    ref = logits.double().requires_grad_()
    torch.stack([product_log_q(row, o.tolist()) for row, o in zip(ref, indices, strict=True)]).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


def test_log_q_stays_finite_where_one_minus_the_drawn_mass_rounds_to_zero_in_fp32():
    logits = torch.tensor([[20.0, 0.0, -1.0, 0.5]])  # q_0 = 1 - 4e-9
    order = torch.tensor([[0, 3]])
    q = logits.softmax(-1)
    naive = torch.log(q[0, 0]) + torch.log(q[0, 3]) - torch.log(1 - q[0, 0])  # fp32: 1 - q_0 == 0
    assert not torch.isfinite(naive)
    got = sequential_log_prob(logits, order)
    assert torch.isfinite(got).all()
    assert float(got) == pytest.approx(float(product_log_q(logits[0], [0, 3])), rel=1e-6)


def test_gumbel_top_k_draws_distinct_experts_with_the_sequential_probabilities():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.2, -0.5, 0.0])
    n = 60_000
    draws = gumbel_top_k(logits.expand(n, -1), 2)
    assert (draws[:, 0] != draws[:, 1]).all()
    for order in itertools.permutations(range(4), 2):
        p = math.exp(float(product_log_q(logits, list(order))))
        freq = float(((draws[:, 0] == order[0]) & (draws[:, 1] == order[1])).double().mean())
        assert abs(freq - p) < 4.5 * math.sqrt(p * (1 - p) / n), (order, freq, p)


# ------------------------------------------------------------------------------------------ router


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_training_samples_distinct_experts_and_inference_is_deterministic_top_k(granularity):
    torch.manual_seed(0)
    router = remix(num_experts=6, k=3, granularity=granularity)
    nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(4, 5, 6)
    context = RoutingContext()
    router.train()
    first, second = router(x, context), router(x, context)
    for routing in (first, second):
        ids = routing.indices.sort(-1).values
        assert (ids[:, 1:] != ids[:, :-1]).all(), "a selection repeats an expert"
        assert routing.log_prob is not None and routing.log_prob.shape == (20,)
    assert not torch.equal(first.indices, second.indices), "training does not sample"
    router.eval()
    a, b = router(x, context), router(x, context)
    assert torch.equal(a.indices, b.indices) and a.log_prob is None
    if granularity == "token":
        probs = torch.softmax(x.reshape(-1, 6) @ router.weight.T, -1)
    else:
        probs = torch.softmax(x.mean(1) @ router.weight.T, -1).repeat_interleave(5, dim=0)
    torch.testing.assert_close(a.probs, probs)
    assert torch.equal(a.indices.sort(-1).values, probs.topk(3, -1).indices.sort(-1).values)


def test_token_granularity_log_prob_is_each_tokens_log_q():
    torch.manual_seed(1)
    router = remix(k=2, granularity="token").train()
    x = torch.randn(3, 4, 6)
    routing = router(x, RoutingContext())
    logits = x.reshape(-1, 6) @ router.weight.T
    expected = torch.stack([product_log_q(lg, o.tolist()) for lg, o in zip(logits, routing.indices, strict=True)])
    torch.testing.assert_close(routing.log_prob.double(), expected, atol=1e-5, rtol=1e-5)


def test_sequence_granularity_shares_one_selection_per_row_routed_on_its_real_tokens():
    torch.manual_seed(2)
    router = remix(k=2, granularity="sequence").train()
    x = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    routing = router(x, RoutingContext(attention_mask=mask))
    rows = routing.indices.view(3, 4, 2)
    assert (rows == rows[:, :1]).all(), "tokens of one row use different experts"
    pooled = torch.stack([x[b][mask[b].bool()].mean(0) for b in range(3)])
    logits = pooled @ router.weight.T
    torch.testing.assert_close(routing.probs.view(3, 4, -1)[:, 0], logits.softmax(-1))
    # summing a row's log_prob over its tokens gives the row's log Q once; padding carries 0
    per_row = routing.log_prob.view(3, 4).sum(1)
    expected = torch.stack([product_log_q(logits[b], rows[b, 0].tolist()) for b in range(3)])
    torch.testing.assert_close(per_row.double(), expected, atol=1e-5, rtol=1e-5)
    assert (routing.log_prob.view(3, 4)[mask == 0] == 0).all()
    # padding does not move the route
    router.eval()
    moved = x.clone()
    moved[1, :2] += 100.0
    a = router(x, RoutingContext(attention_mask=mask))
    b = router(moved, RoutingContext(attention_mask=mask))
    torch.testing.assert_close(a.probs, b.probs)
    with pytest.raises(RoutingError, match="has no real token"):
        router(x, RoutingContext(attention_mask=torch.zeros(3, 4, dtype=torch.long)))


class TwoLayers(nn.Module):
    """A position-wise two-layer net: each token's output depends on its own input only."""

    def __init__(self, d: int = 3):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, d)

    def forward(self, x, attention_mask=None):
        return self.second(torch.tanh(self.first(x)))


def mixture(granularity: str, omega: str = "lora", num_experts: int = 4, rank: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = TwoLayers()
    config = lomix.MixtureConfig(
        target_modules=["first", "second"],
        num_experts=num_experts,
        rank=rank,
        alpha=4.0,
        balance={"switch": 0.0},
        router=lomix.router_config("remix", k=2, granularity=granularity, omega=omega),
    )
    lomix.inject(model, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lomix.mixture_layers(model):
            layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=generator))
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator))
    return model


@pytest.mark.parametrize("omega", ["lora", "rslora"])
def test_each_selected_expert_gets_the_constant_weight_omega(omega):
    model = mixture("token", omega=omega).eval()
    layer = model.first
    k, r = 2, 2
    expected_omega = 2 / (k * r) if omega == "lora" else 2 / math.sqrt(k * r)
    assert layer.router.omega == pytest.approx(expected_omega)
    x = torch.randn(5, 3)
    layer.record_routing = True
    y = layer(x)
    idx = layer.last_routing.indices
    A, B = layer.experts.A, layer.experts.B
    ref = layer.base_layer(x) + expected_omega * torch.stack(
        [sum(B[e] @ A[e] @ x[t] for e in idx[t].tolist()) for t in range(5)]
    )
    torch.testing.assert_close(y, ref)
    with RoutingStats(model) as stats:
        model.train()(torch.randn(2, 4, 3))
    assert all(s["effective_support"] == pytest.approx(2.0) for s in stats.summary().values())


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"router.k: must be between 1 and num_experts=4, got 5"):
        lomix.MixtureConfig(num_experts=4, balance={"switch": 0.0}, router=lomix.router_config("remix", k=5))
    # no Switch loss is the remix router's default; one set explicitly is refused
    assert lomix.MixtureConfig(num_experts=4, router=lomix.router_config("remix", k=2)).balance.switch == 0.0
    with pytest.raises(ConfigError, match=r"balance.switch: must be 0 with the remix router"):
        lomix.MixtureConfig(num_experts=4, balance={"switch": 0.01}, router=lomix.router_config("remix", k=2))
    with pytest.raises(ConfigError, match=r"router.granularity: expected one of 'sequence', 'token'"):
        lomix.router_config("remix", granularity="layer")
    with pytest.raises(ConfigError, match=r"router.omega_alpha: must be > 0"):
        lomix.MixtureConfig(balance={"switch": 0.0}, router=lomix.router_config("remix", omega_alpha=0))
    # round trip through JSON
    config = lomix.MixtureConfig(
        num_experts=4, balance={"switch": 0.0}, router=lomix.router_config("remix", k=3, granularity="token")
    )
    assert lomix.MixtureConfig.from_json(config.to_json()) == config


# ------------------------------------------------------------------------------------------ RLOO


def test_m_equal_1_is_rejected_with_a_clear_error():
    with pytest.raises(ConfigError, match=r"samples: must be an integer >= 2, got 1: RLOO's baseline"):
        lomix.rloo.rloo_surrogate(torch.zeros(3), torch.zeros(3), 1)
    with pytest.raises(ConfigError, match=r"samples: must be an integer >= 2, got 1"):
        lomix.rloo.replicate({"x": torch.zeros(2, 3)}, 1)
    from lomix.recipes.config import build_config

    with pytest.raises(ConfigError, match=r"rloo.samples: must be an integer >= 2, got 1"):
        build_config({"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "rloo": {"samples": 1}})


def test_replicate_and_the_surrogate_are_the_leave_one_out_estimator():
    batch = {"ids": torch.arange(6).view(3, 2), "names": ["a", "b", "c"], "none": None}
    big = lomix.rloo.replicate(batch, 2)
    assert big["ids"][:, 0].tolist() == [0, 2, 4, 0, 2, 4] and big["names"] == ["a", "b", "c"] * 2
    assert big["none"] is None
    g = torch.Generator().manual_seed(0)
    M, B = 4, 3
    losses = torch.rand(M * B, generator=g)
    log_q = torch.randn(M * B, generator=g, requires_grad=True)
    lomix.rloo.rloo_surrogate(losses, log_q, M).backward()
    L = losses.view(M, B)
    for m, b in itertools.product(range(M), range(B)):
        others = torch.cat([L[:m, b], L[m + 1 :, b]]).mean()
        # (1/M) (L_m - mean of the others): the RLOO form of the spec's 1/(M-1) (L_m - Lbar)
        assert float(log_q.grad[m * B + b]) == pytest.approx(float(L[m, b] - others) / M, rel=1e-5)


def lin(layer_params, h, order):
    weight, bias, A, B, omega = layer_params
    delta = sum(h @ A[e].T @ B[e].T for e in order)
    return h @ weight.T + bias + omega * delta


def exact_expected_loss(model, x, mask, target, granularity):
    """E_Q[sum_b L_b] by enumerating every ordered selection of both layers, in float64, as a function
    of float64 copies of the two router weights (returned for autograd)."""
    layers = [layer for _, layer in lomix.mixture_layers(model)]
    routers = [layer.router.weight.detach().double().requires_grad_() for layer in layers]
    params = [
        (
            layer.base_layer.weight.detach().double(),
            layer.base_layer.bias.detach().double(),
            layer.experts.A.detach().double(),
            layer.experts.B.detach().double(),
            layer.router.omega,
        )
        for layer in layers
    ]
    orders = list(itertools.permutations(range(layers[0].experts.num_experts), 2))

    def pooled(h, m):
        return (h * m[:, None]).sum(0) / m.sum()

    def unit(h0, m, tgt):  # one selection per layer for these tokens
        total = torch.zeros((), dtype=torch.float64)
        logits1 = routers[0] @ pooled(h0, m)
        for first in orders:
            h1 = torch.tanh(lin(params[0], h0, first))
            logits2 = routers[1] @ pooled(h1, m)
            for second in orders:
                loss = (((lin(params[1], h1, second) - tgt) ** 2).sum(-1) * m).sum()
                total = total + torch.exp(product_log_q(logits1, first) + product_log_q(logits2, second)) * loss
        return total

    x, mask, target = x.double(), mask.double(), target.double()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(x.shape[0]):
        if granularity == "sequence":
            total = total + unit(x[b], mask[b], target[b])
        else:
            for t in range(x.shape[1]):
                if mask[b, t] > 0:
                    total = total + unit(x[b, t : t + 1], mask[b, t : t + 1], target[b, t : t + 1])
    return total, routers


def rloo_gradients(model, batch, samples, estimates, groups):
    """(groups, P) router gradients, each the mean of ``estimates`` RLOO estimates, through lomix.rloo."""
    layers = [layer for _, layer in lomix.mixture_layers(model)]
    model.train()
    out = []
    for _ in range(groups):
        model.zero_grad(set_to_none=True)
        big = lomix.rloo.replicate(lomix.rloo.replicate(batch, estimates), samples)
        with lomix.rloo.recording(model):
            y = model(big["x"], attention_mask=big["attention_mask"])
            losses = (((y - big["target"]) ** 2).sum(-1) * big["attention_mask"]).sum(1)
            log_q = lomix.rloo.selection_log_prob(model, losses.shape[0])
        (lomix.rloo.rloo_surrogate(losses, log_q, samples) / estimates).backward()
        out.append(torch.cat([layer.router.weight.grad.flatten() for layer in layers]).double())
    return torch.stack(out)


@pytest.mark.parametrize(("granularity", "samples"), [("sequence", 2), ("token", 4)])
def test_rloo_is_an_unbiased_estimate_of_the_exact_router_gradient(granularity, samples):
    """The mean of many RLOO estimates matches the gradient of the expected loss, computed by
    enumerating every selection of both layers, within a few standard errors; an estimator scaled by
    1/M instead of 1/(M-1) (biased) does not."""
    model = mixture(granularity)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 3, generator=g)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    target = torch.randn(2, 3, 3, generator=g)
    exact_loss, routers = exact_expected_loss(model, x, mask, target, granularity)
    exact = torch.cat([grad.flatten() for grad in torch.autograd.grad(exact_loss, routers)])

    torch.manual_seed(4)
    batch = {"x": x, "attention_mask": mask, "target": target}
    grads = rloo_gradients(model, batch, samples, estimates=100, groups=40)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    z = (mean - exact) / se
    assert z.abs().max() < 4.0, (z, exact, mean)
    assert exact.abs().max() > 0.1, "a vanishing gradient would test nothing"
    biased = mean * (samples - 1) / samples
    assert ((biased - exact) / se).abs().max() > 6.0, "the test cannot tell a biased estimator apart"


def test_token_granularity_log_q_of_a_row_sums_its_real_tokens_only():
    """Per-token routing: a row's log Q is the sum, over layers and over its REAL tokens, of each
    token's log-probability of its sampled selection; padded tokens' selections change nothing and
    are left out. (The unbiasedness test cannot see this: padding adds variance, not bias.)"""
    model = mixture("token").train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, layer in lomix.mixture_layers(model)
    ]
    with lomix.rloo.recording(model):
        model(x, attention_mask=mask)
        log_q = lomix.rloo.selection_log_prob(model, 3)
        routings = {name: layer.last_routing for name, layer in lomix.mixture_layers(model)}
    for hook in hooks:
        hook.remove()
    expected = torch.zeros(3, dtype=torch.float64)
    padded = torch.zeros(3, dtype=torch.float64)
    for name, layer in lomix.mixture_layers(model):
        logits = inputs[name].reshape(-1, 3) @ layer.router.weight.detach().T  # (12, E): each token's own logits
        selections = routings[name].indices
        for token in range(12):
            row, position = divmod(token, 4)
            term = product_log_q(logits[token], selections[token].tolist())
            if mask[row, position]:
                expected[row] += term
            else:
                padded[row] += term
    torch.testing.assert_close(log_q.double(), expected, atol=1e-4, rtol=1e-5)
    # the padded tokens did sample selections of non-zero log-probability: counting them would differ
    assert (padded[1:].abs() > 0.5).all() and padded[0] == 0


def test_selection_log_prob_needs_a_sampling_router_in_training():
    model = mixture("token").eval()
    with lomix.rloo.recording(model):
        model(torch.randn(2, 3, 3))
        with pytest.raises(RoutingError, match="recorded no sampled selection"):
            lomix.rloo.selection_log_prob(model, 2)
    assert all(layer.last_routing is None and not layer.record_routing for _, layer in lomix.mixture_layers(model))
