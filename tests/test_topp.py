"""Dynamic top-p routing against hand-computed selections, the paper's rule (the smallest set of
experts whose mass reaches p) and its dynamic loss; the experts-per-token statistics it is read by."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lomix
from lomix.errors import ConfigError
from lomix.layer import MixtureLinear
from lomix.routers import build_router
from lomix.routers.topp import top_p_selection
from lomix.routing import RoutingContext

PROBS = torch.tensor(
    [
        [0.50, 0.30, 0.15, 0.05],  # p=0.6: {0, 1} (0.5 < 0.6 <= 0.8)
        [0.10, 0.20, 0.30, 0.40],  # p=0.6: {3, 2}
        [0.25, 0.25, 0.25, 0.25],  # p=0.6: three experts (0.5 < 0.6 <= 0.75)
        [0.70, 0.10, 0.10, 0.10],  # p=0.6: {0} alone
    ]
)


def router_with_probs(probs: torch.Tensor, **fields) -> tuple[nn.Module, torch.Tensor]:
    """A topp router whose weight makes softmax(W x_t) = probs[t] for the one-hot inputs x_t."""
    n, e = probs.shape
    router = build_router(lomix.router_config("topp", **fields), n, e)
    with torch.no_grad():
        router.weight.copy_(probs.log().T)
    return router, torch.eye(n)


def test_selection_and_gates_match_the_hand_computed_sets():
    router, x = router_with_probs(PROBS, p=0.6, max_k=3)
    routing = router.eval()(x, RoutingContext())
    live = routing.gates.detach() > 0
    kept = [sorted(row[keep].tolist()) for row, keep in zip(routing.indices, live, strict=True)]
    assert kept == [[0, 1], [2, 3], [0, 1, 2], [0]]
    assert routing.k == 3  # padded to max_k
    expected = torch.tensor([[0.50, 0.30, 0.0], [0.40, 0.30, 0.0], [0.25, 0.25, 0.25], [0.70, 0.0, 0.0]])
    torch.testing.assert_close(routing.gates.sort(-1, descending=True).values, expected)  # raw probabilities
    renormalized = router_with_probs(PROBS, p=0.6, max_k=3, renormalize=True)[0].eval()(x, RoutingContext())
    torch.testing.assert_close(renormalized.gates.sum(-1), torch.ones(4))
    capped = router_with_probs(PROBS, p=0.6, max_k=2)[0].eval()(x, RoutingContext())
    assert [int((g > 0).sum()) for g in capped.gates] == [2, 2, 2, 1]  # the uniform row stops at max_k


@pytest.mark.parametrize("p", [0.1, 0.4, 0.8, 0.95, 1.0])
def test_the_kept_set_is_the_smallest_that_reaches_p(p):
    probs = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)).double().mul(2).softmax(-1)
    indices, keep = top_p_selection(probs, p, max_k=6)
    for row, ids, kept in zip(probs, indices, keep, strict=True):
        chosen = ids[kept]
        mass = float(row[chosen].sum())
        assert mass >= p - 1e-12  # reaches p
        assert float(row[chosen[:-1]].sum()) < p  # one fewer does not: minimal
        others = [e for e in range(6) if e not in chosen.tolist()]
        if others:  # the kept ones are the most probable
            assert float(row[chosen].min()) >= float(row[others].max())


def test_the_layer_adds_only_the_kept_experts():
    torch.manual_seed(0)
    config = lomix.MixtureConfig(
        target_modules=["x"], num_experts=4, rank=2, alpha=4, router=lomix.router_config("topp", p=0.6, max_k=4)
    )
    layer = MixtureLinear(nn.Linear(5, 3), config).eval()
    with torch.no_grad():
        layer.experts.B.normal_()
        layer.router.weight.normal_()
    x = torch.randn(7, 5)
    probs = (x @ layer.router.weight.T).softmax(-1).detach()
    expected = layer.base_layer(x)
    for t in range(7):  # the naive rule: sort, keep while the mass above is below p
        order = probs[t].argsort(descending=True)
        mass = 0.0
        for e in order.tolist():
            if mass >= 0.6:
                break
            delta = layer.experts.B[e] @ (layer.experts.A[e] @ x[t])
            expected[t] += config.scale * probs[t, e] * delta
            mass += float(probs[t, e])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_the_dynamic_loss_is_the_weighted_mean_entropy_over_real_tokens():
    router, x = router_with_probs(PROBS, p=0.6, dynamic_loss=0.5)
    mask = torch.tensor([[1, 1, 0, 1]])
    routing = router.train()(x, RoutingContext(attention_mask=mask))
    entropies = [-sum(q * math.log(q) for q in row.tolist()) for row in PROBS]
    expected = 0.5 * (entropies[0] + entropies[1] + entropies[3]) / 3
    assert math.isclose(routing.aux["loss_dynamic"].item(), expected, rel_tol=1e-5)
    assert "loss_dynamic" not in router.eval()(x, RoutingContext()).aux  # a training loss only


def test_statistics_report_the_mean_and_histogram_of_experts_per_token():
    router, x = router_with_probs(PROBS, p=0.6, max_k=3)
    config = lomix.MixtureConfig(target_modules=["x"], num_experts=4, router=lomix.router_config("topp", p=0.6))
    model = nn.Sequential(MixtureLinear(nn.Linear(4, 2), config)).eval()
    model[0].router.load_state_dict(router.state_dict())
    with lomix.RoutingStats(model) as stats:
        model(x)
    summary = stats.summary()["0"]
    assert summary["experts_per_token_histogram"] == [0.0, 0.25, 0.5, 0.25, 0.0]  # 1 token alone, 2 pairs, 1 triple
    assert summary["experts_per_token"] == pytest.approx((1 + 2 + 2 + 3) / 4)


def test_the_switch_loss_does_not_count_padded_slots():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    indices = torch.tensor([[0, 1], [1, 2]])
    gates = torch.tensor([[0.6, 0.0], [0.7, 0.1]])  # token 0 uses expert 0 only
    # live assignments: 0, 1, 2 -> f = (1/3, 1/3, 1/3); P = (0.4, 0.5, 0.1)
    expected = 3 * (0.4 + 0.5 + 0.1) / 3
    got = lomix.switch_load_balancing_loss(probs, indices, gates=gates)
    assert math.isclose(float(got), expected, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"p": 0.0}, "router.p"), ({"p": 1.5}, "router.p"), ({"max_k": 5}, "router.max_k"),
     ({"dynamic_loss": -1.0}, "router.dynamic_loss"), ({"bias_update_rate": -1.0}, "router.bias_update_rate")],
)  # fmt: skip
def test_bad_fields_are_refused_by_name(fields, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        lomix.MixtureConfig(num_experts=4, router=lomix.router_config("topp", **fields))
