"""Routers, routing context and balance losses, each against a direct statement of its math."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts

import lomix
from lomix.routers import build_router
from lomix.routing import ContextHolder, RoutingContext


def route(name, x, num_experts=6, **fields):
    router = build_router(lomix.router_config(name, **fields), x.shape[-1], num_experts)
    return router, router(x, RoutingContext())


def test_topk_router_keeps_the_k_most_probable_experts_with_renormalised_gates():
    x = torch.randn(2, 5, 8)
    router, routing = route("topk", x, k=2)
    probs = torch.softmax(x.reshape(-1, 8) @ router.weight.T, dim=-1)
    torch.testing.assert_close(routing.probs, probs)
    expected_idx = probs.argsort(dim=-1, descending=True)[:, :2]
    assert torch.equal(routing.indices.sort(-1).values, expected_idx.sort(-1).values)
    top = probs.gather(1, routing.indices)
    torch.testing.assert_close(routing.gates, top / top.sum(-1, keepdim=True))
    _, raw = route("topk", x, k=2, renormalize=False)
    assert (raw.gates.sum(-1) < 1).all()


def test_topk_jitter_only_in_training():
    x = torch.randn(4, 8)
    router, _ = route("topk", x, jitter=0.5)
    router.eval()
    assert torch.equal(router(x, RoutingContext()).logits, router(x, RoutingContext()).logits)
    router.train()
    assert not torch.equal(router(x, RoutingContext()).logits, router(x, RoutingContext()).logits)


def test_dense_router_uses_all_experts_with_softmax_gates():
    x = torch.randn(3, 8)
    router, routing = route("dense", x, num_experts=4)
    assert routing.indices.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(routing.gates, torch.softmax(x @ router.weight.T, -1))


def test_fixed_router_gives_every_token_the_same_route():
    x = torch.randn(2, 3, 8)
    router, routing = route("fixed", x, experts=[4, 1], weights=[0.7, 0.3])
    assert routing.indices.tolist() == [[4, 1]] * 6
    torch.testing.assert_close(routing.gates, torch.tensor([[0.7, 0.3]] * 6))
    assert list(router.parameters()) == []
    _, default = route("fixed", x, experts=[0, 2, 5])
    torch.testing.assert_close(default.gates, torch.full((6, 3), 1 / 3))


def test_switch_loss_and_z_loss_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 4, generator=g)
    probs = logits.softmax(-1)
    indices = probs.topk(2, -1).indices
    mask = torch.tensor([True] * 7 + [False] * 3)
    f = torch.zeros(4)
    for row in indices[:7]:
        for e in row:
            f[e] += 1 / 14
    expected = 4 * sum(f[i] * probs[:7, i].mean() for i in range(4))
    torch.testing.assert_close(lomix.switch_load_balancing_loss(probs, indices, mask), expected)
    z = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits[:7]]).mean()
    torch.testing.assert_close(lomix.router_z_loss(logits, mask), z)
    uniform = torch.full((8, 4), 0.25)
    assert lomix.switch_load_balancing_loss(uniform, torch.arange(8).remainder(4).view(8, 1)).item() == pytest.approx(
        1.0
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_aux_loss_reduces_weighted_layer_losses_over_real_tokens_only(reduction):
    case = MODEL_CASES["llama"]
    model, _ = build_pair(case)
    model.train()
    lomix.inject(
        model,
        lomix.MixtureConfig(
            target_modules=["q_proj", "up_proj"],
            num_experts=4,
            rank=2,
            balance=lomix.BalanceConfig(switch=0.5, z_loss=0.25, reduction=reduction),
        ),
    )
    randomize_experts(model)
    layers = [layer for _, layer in lomix.mixture_layers(model)]
    for layer in layers:
        layer.record_routing = True
    inputs = case.inputs(torch.Generator().manual_seed(0))
    model(**inputs)
    mask = inputs["attention_mask"].reshape(-1).bool()
    expected = sum(
        0.5 * lomix.switch_load_balancing_loss(layer.last_routing.probs, layer.last_routing.indices, mask)
        + 0.25 * lomix.router_z_loss(layer.last_routing.logits, mask)
        for layer in layers
    )
    if reduction == "mean":  # the per-layer formula averaged over the mixture layers
        expected = expected / len(layers)
    assert len(layers) == 4  # q_proj and up_proj of 2 layers: mean and sum differ
    torch.testing.assert_close(lomix.aux_loss(model), expected)
    model.eval()
    model(**inputs)
    assert lomix.aux_loss(model).item() == 0.0


# A router defined outside lomix, registered in a test: proves the registry and the
# ParameterMixing path need no edit anywhere else. It records the context it saw.
@dataclass
class TaskMixConfig(lomix.RouterConfig):
    num_tasks: int = 3
    heads: int = field(default=2)


@lomix.register_router("test_task_mix", TaskMixConfig)
class TaskMixRouter(lomix.Router):
    def __init__(self, config, d_in, num_experts):
        super().__init__(config, d_in, num_experts)
        self.logits = torch.nn.Parameter(torch.randn(config.num_tasks, config.heads, num_experts))
        self.seen: list[RoutingContext] = []

    def forward(self, x, context):
        self.seen.append(context)
        context = context.for_batch(x.shape[0])
        if context.task_ids is None:
            raise lomix.RoutingError("test_task_mix needs task_ids")
        return lomix.ParameterMixing(weights=self.logits[context.task_ids].softmax(-1))


def test_a_registered_parameter_mixing_router_drives_the_layer_and_sees_task_ids(tmp_path):
    case = MODEL_CASES["llama"]
    model, fresh = build_pair(case)
    lomix.inject(
        model,
        lomix.MixtureConfig(
            target_modules=["v_proj", "down_proj"], num_experts=3, rank=2, router={"name": "test_task_mix"}
        ),
    )
    randomize_experts(model)
    ids = torch.randint(0, 97, (2, 5))
    task_ids = torch.tensor([2, 0])
    logits = model(input_ids=ids, task_ids=task_ids).logits
    for _, layer in lomix.mixture_layers(model):
        assert torch.equal(layer.router.seen[-1].task_ids, task_ids)
    # each row equals running that sequence alone with its own task
    for row in range(2):
        alone = model(input_ids=ids[row : row + 1], task_ids=task_ids[row : row + 1]).logits
        torch.testing.assert_close(alone[0], logits[row])
    # the next call carries no task ids: nothing leaks from the previous call
    with pytest.raises(lomix.RoutingError, match="needs task_ids"):
        model(input_ids=ids)
    # pinned context (generation): batch expansion follows repeat_interleave
    with lomix.routing_context(model, task_ids=[2, 0]):
        expanded = model(input_ids=ids.repeat_interleave(2, dim=0)).logits
    torch.testing.assert_close(expanded[::2], logits)
    torch.testing.assert_close(expanded[1::2], logits)
    lomix.save(model, tmp_path)
    torch.testing.assert_close(lomix.load(fresh, tmp_path)(input_ids=ids, task_ids=task_ids).logits, logits)


def test_context_for_batch_rejects_sizes_that_are_not_multiples():
    context = RoutingContext(task_ids=torch.tensor([1, 2]), task_descriptions=["a", "b"])
    assert context.for_batch(4).task_descriptions == ["a", "a", "b", "b"]
    with pytest.raises(lomix.RoutingError, match="task_ids has 2 rows but the layer sees a batch of 3"):
        context.for_batch(3)


def test_context_is_per_thread():
    holder = ContextHolder()
    holder.set_current(RoutingContext(task_ids=torch.tensor([1])))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(holder.get()))
    thread.start()
    thread.join()
    assert seen[0].task_ids is None
    assert holder.get().task_ids.tolist() == [1]
