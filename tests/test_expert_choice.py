"""Expert-choice routing: hand-computed selections in training, the capacity met exactly, and the
causal top-k rule at evaluation (one sequence's output does not depend on the rest of the batch)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts

import lomix
from lomix.errors import ConfigError
from lomix.routers import build_router
from lomix.routing import RoutingContext

PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],
        [0.55, 0.30, 0.15],
        [0.12, 0.80, 0.08],
        [0.25, 0.15, 0.60],
        [0.50, 0.10, 0.40],
        [0.30, 0.40, 0.30],
    ]
)


def router_with_probs(probs: torch.Tensor, **fields):
    """An expert_choice router whose softmax(W x_t) = probs[t] for the one-hot inputs x_t."""
    n, e = probs.shape
    router = build_router(lomix.router_config("expert_choice", **fields), n, e)
    with torch.no_grad():
        router.weight.copy_(probs.log().T)
    return router, torch.eye(n)


def chosen_sets(routing) -> list[list[int]]:
    """Per token, the sorted experts with a non-zero gate."""
    live = routing.gates.detach() > 0
    return [sorted(row[keep].tolist()) for row, keep in zip(routing.indices, live, strict=True)]


def test_training_selection_matches_the_hand_computed_choice():
    # capacity factor 2: C = ceil(2 * 6 / 3) = 4 tokens per expert, by descending probability:
    # expert 0 takes t0 .70, t1 .55, t4 .50, t5 .30; expert 1 t2 .80, t5 .40, t1 .30, t0 .20;
    # expert 2 t3 .60, t4 .40, t5 .30, t1 .15
    router, x = router_with_probs(PROBS, capacity_factor=2.0)
    routing = router.train()(x, RoutingContext())
    assert chosen_sets(routing) == [[0, 1], [0, 1, 2], [1], [2], [0, 2], [0, 1, 2]]
    assert routing.k == 3  # padded to the most experts a token got
    for t, row in enumerate(chosen_sets(routing)):  # gates: the token's probability of the expert
        got = sorted(float(g) for g in routing.gates[t].detach() if g > 0)
        assert got == pytest.approx(sorted(float(PROBS[t, e]) for e in row), abs=1e-6)


def test_every_expert_takes_exactly_its_capacity_of_real_tokens():
    generator = torch.Generator().manual_seed(0)
    n, e, cf = 50, 4, 1.5
    router = build_router(lomix.router_config("expert_choice", capacity_factor=cf), 8, e).train()
    x = torch.randn(1, n, 8, generator=generator)
    mask = torch.ones(1, n, dtype=torch.long)
    mask[0, -7:] = 0  # padding never counts and is never chosen
    routing = router(x, RoutingContext(attention_mask=mask))
    capacity = math.ceil(cf * 43 / e)
    per_expert = torch.zeros(e)
    for row, gates in zip(routing.indices, routing.gates, strict=True):
        per_expert.index_add_(0, row, (gates > 0).float())
    assert per_expert.tolist() == [capacity] * e
    assert float(routing.gates[-7:].abs().sum()) == 0.0
    torch.testing.assert_close(routing.gates, routing.probs.gather(-1, routing.indices) * (routing.gates > 0))


def test_evaluation_is_causal_top_k_of_the_same_scores():
    router, x = router_with_probs(PROBS, capacity_factor=2.0, eval_k=2)
    routing = router.eval()(x, RoutingContext())
    expected = PROBS.topk(2, dim=-1)
    torch.testing.assert_close(routing.gates, expected.values)
    assert torch.equal(routing.indices, expected.indices)


def test_one_sequence_does_not_depend_on_the_batch_at_evaluation_but_does_in_training():
    model, _ = build_pair(MODEL_CASES["llama"])
    config = lomix.MixtureConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, rank=2, alpha=4,
        router=lomix.router_config("expert_choice", capacity_factor=1.0, eval_k=2),
    )  # fmt: skip
    lomix.inject(model, config)
    randomize_experts(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 9), generator=generator)
    mask = torch.ones_like(ids)

    def first_row(batch: int) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids[:batch], attention_mask=mask[:batch]).logits[0]

    model.eval()
    torch.testing.assert_close(first_row(1), first_row(3), rtol=1e-5, atol=1e-6)
    model.train()  # expert choice over the batch: the other sequences change row 0's experts
    assert not torch.allclose(first_row(1), first_row(3), rtol=1e-5, atol=1e-6)


def test_the_router_defaults_to_no_switch_loss_and_refuses_bad_fields():
    config = lomix.MixtureConfig(num_experts=4, router=lomix.router_config("expert_choice"))
    assert config.balance.switch == 0.0  # balanced by construction
    with pytest.raises(ConfigError, match=r"router\.capacity_factor"):
        lomix.router_config("expert_choice", capacity_factor=0.0).validate(4)
    with pytest.raises(ConfigError, match=r"router\.eval_k"):
        lomix.MixtureConfig(num_experts=4, router=lomix.router_config("expert_choice", eval_k=5))
