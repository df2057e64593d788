"""Auxiliary-loss-free balancing (a selection-only bias updated after each optimizer step) and top-1
routing with the raw probability as its gate (the router learns from the task loss)."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts
from torch.nn import functional as F

import lomix
from lomix.errors import ConfigError
from lomix.routers import build_router
from lomix.routing import RoutingContext


def skewed_router(name: str, rate: float, **fields):
    """A router over 4 experts on inputs with a positive mean, where expert 0's weight points along
    that mean: without balancing nearly every token picks expert 0."""
    router = build_router(lomix.router_config(name, bias_update_rate=rate, **fields), 8, 4)
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 0.1)
        router.weight[0] += 0.4
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1)) + 1.0
    return router.train(), x


def load_of(routing, num_experts: int = 4) -> torch.Tensor:
    live = (routing.gates.detach() != 0).float()
    return torch.zeros(num_experts).index_add_(0, routing.indices.reshape(-1), live.reshape(-1)) / live.sum()


def test_the_bias_selects_and_the_unbiased_probabilities_gate():
    router = build_router(lomix.router_config("topk", k=2, bias_update_rate=0.1), 3, 3)
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    with torch.no_grad():
        router.weight.copy_(probs.log().T)
        router.selection_bias.copy_(torch.tensor([0.0, -0.2, 0.05]))  # biased scores 0.5, 0.1, 0.25
    routing = router.eval()(torch.eye(3)[:1], RoutingContext())
    assert routing.indices.tolist() == [[0, 2]]
    torch.testing.assert_close(routing.gates, torch.tensor([[0.5 / 0.7, 0.2 / 0.7]]))  # from p, renormalised


def test_one_update_is_rate_times_the_sign_of_mean_load_minus_load():
    router, x = skewed_router("topk", 0.01, k=1)
    mask = torch.ones(1, 256, dtype=torch.long)
    mask[0, :56] = 0  # padding is not load
    routing = router(x, RoutingContext(attention_mask=mask))
    counts = torch.bincount(routing.indices[56:, 0], minlength=4).float()
    router.after_optimizer_step()
    torch.testing.assert_close(router.selection_bias, 0.01 * torch.sign(counts.mean() - counts))
    assert float(router.pending_load.sum()) == 0.0  # the next step counts afresh
    router.eval()(x, RoutingContext())
    router.after_optimizer_step()  # evaluation forwards are not load
    torch.testing.assert_close(router.selection_bias, 0.01 * torch.sign(counts.mean() - counts))


@pytest.mark.parametrize(("name", "fields"), [("topk", {"k": 1}), ("topp", {"p": 0.5, "max_k": 2})])
def test_the_bias_moves_a_skewed_load_toward_uniform_without_a_gradient(name, fields):
    router, x = skewed_router(name, 0.01, **fields)
    before = load_of(router(x, RoutingContext()))
    router.pending_load.zero_()
    assert float(before[0]) > 0.8  # the skew
    weight = router.weight.detach().clone()
    for _ in range(60):
        routing = router(x, RoutingContext())
        routing.gates.sum().backward()  # a loss through the gates reaches the weight, never the bias
        assert router.selection_bias.grad is None and router.weight.grad is not None
        router.weight.grad = None
        router.after_optimizer_step()
    after = load_of(router(x, RoutingContext()))
    assert float(after.std()) < 0.3 * float(before.std())
    assert float(after.max()) < 0.45  # near the uniform 0.25
    assert torch.equal(router.weight, weight)  # only the bias moved
    assert "selection_bias" not in dict(router.named_parameters())


def test_the_bias_is_saved_with_the_mixture_and_not_given_to_the_optimizer(tmp_path):
    model, fresh = build_pair(MODEL_CASES["llama"])
    router = lomix.router_config("topk", k=2, bias_update_rate=1e-3)
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=4, rank=2, router=router))
    randomize_experts(model)
    biases = {}
    for name, layer in lomix.mixture_layers(model):
        layer.router.selection_bias.copy_(torch.randn(4))
        biases[name] = layer.router.selection_bias.clone()
    grouped = {id(p) for group in lomix.parameter_groups(model, lr=1e-3) for p in group["params"]}
    assert all(id(layer.router.selection_bias) not in grouped for _, layer in lomix.mixture_layers(model))
    lomix.save(model, tmp_path / "mixture")
    loaded = lomix.load(fresh, tmp_path / "mixture")
    for name, layer in lomix.mixture_layers(loaded):
        assert torch.equal(layer.router.selection_bias, biases[name])


def test_the_fused_kernel_rule_follows_the_gates_and_declines_with_a_bias():
    def rule(**fields):
        return build_router(lomix.router_config("topk", **fields), 8, 4).softmax_topk_rule()

    assert rule(k=2).renormalize is True and rule(k=1).renormalize is False  # k=1: the raw probability
    assert rule(k=2, renormalize=False).renormalize is False
    assert rule(k=2, bias_update_rate=1e-3) is None  # the kernel would select by p, not p + b


def test_a_mixture_without_the_option_has_no_bias():
    router = build_router(lomix.router_config("topk"), 8, 4)
    assert "selection_bias" not in router.state_dict()  # files saved before the option stay valid


# ------------------------------------------------------------------------------------------------
# top-1


def test_top1_gates_with_the_raw_probability_and_refuses_renormalising():
    router = build_router(lomix.router_config("topk", k=1), 4, 4)
    x = torch.randn(5, 4)
    routing = router(x, RoutingContext())
    probs = (x @ router.weight.T).softmax(-1)
    torch.testing.assert_close(routing.gates, probs.max(-1, keepdim=True).values)
    assert float(routing.gates.detach().max()) < 1.0
    with pytest.raises(ConfigError, match=r"router\.renormalize: must not be true with k=1"):
        lomix.MixtureConfig(num_experts=4, router=lomix.router_config("topk", k=1, renormalize=True))
    raw = build_router(lomix.router_config("topk", k=1, renormalize=False), 4, 4)
    assert raw.config.renormalizes is False and router.config.renormalizes is False
    assert build_router(lomix.router_config("topk", k=2), 4, 4).config.renormalizes is True


def test_a_top1_router_learns_from_the_task_loss():
    """The gradient of the task loss reaches the router and equals a finite difference."""
    model, _ = build_pair(MODEL_CASES["llama"])
    config = lomix.MixtureConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, rank=2, alpha=4, dropout=0.0,
        router=lomix.router_config("topk", k=1), balance=lomix.BalanceConfig(switch=0.0),
    )  # fmt: skip
    lomix.inject(model, config)
    randomize_experts(model)
    model.double().train()
    inputs = MODEL_CASES["llama"].inputs(torch.Generator().manual_seed(0))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def task_loss() -> torch.Tensor:  # in float64 (transformers' own loss rounds to float32)
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)

    router = next(layer.router for _, layer in lomix.mixture_layers(model))
    task_loss().backward()
    grad = router.weight.grad.clone()
    assert float(grad.norm()) > 1e-5  # a renormalised top-1 gate is fixed at 1.0: exactly 0 here (float64)
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(2), dtype=grad.dtype)
    direction /= direction.norm()
    eps = 1e-3  # router logits are float32 (lomix's rule): a step well above their rounding
    with torch.no_grad():
        router.weight += eps * direction
        plus = task_loss()
        router.weight -= 2 * eps * direction
        minus = task_loss()
        router.weight += eps * direction
    # (the selection does not change within eps; the tolerance covers the float32 router logits)
    assert float((plus - minus) / (2 * eps)) == pytest.approx(float((grad * direction).sum()), rel=2e-2)
