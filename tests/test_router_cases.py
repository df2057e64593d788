"""The router case table: every registered router, one row each, through the same checks.

A new router is one file plus one row here. Each row builds the router in a tiny Llama (2 layers,
q/v projections), then: save and load reproduce the logits bit-exactly; one AdamW step on the
answer loss changes its trainable parameters (the router's own, and the experts'); and export as
one PEFT LoRA is accepted exactly when the row says the route is fixed, refused otherwise with the
documented `NotFixedRouteError`. An accepted export is checked against the mixture's own output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts
from torch.nn import functional as F

import lomix
from lomix.export import NotFixedRouteError, fixed_loras
from lomix.routers import router_class

TARGETS = ["q_proj", "v_proj"]


@dataclasses.dataclass
class RouterCase:
    name: str
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # the router's config fields
    context: dict[str, Any] = dataclasses.field(default_factory=dict)  # routing keywords of a forward
    fixed_route: bool = False  # export as one LoRA is accepted for this context
    trains_router: bool = True  # the router has parameters a training step moves


CASES = [
    RouterCase("topk", {"k": 2}),
    RouterCase("topp", {"p": 0.5, "max_k": 3, "bias_update_rate": 1e-3}),
    RouterCase("expert_choice", {"capacity_factor": 1.5, "eval_k": 2}),
    RouterCase("dense"),
    RouterCase("fixed", {"experts": [0, 2], "weights": [0.7, 0.3]}, fixed_route=True, trains_router=False),
    RouterCase("remix", {"k": 2}),
    RouterCase("poly", {"n_tasks": 2}, {"task_ids": [1, 1]}, fixed_route=True),
    RouterCase("mhr", {"n_tasks": 2, "n_heads": 2}, {"task_ids": [0, 0]}, fixed_route=True),
    RouterCase("loramixer", {"stage": "soft", "k": 2}),
    RouterCase("glider", {"descriptions": ["a", "b", "c", "d"], "missing_task": "local", "k": 2}),
    RouterCase("phatgoose"),
    RouterCase("arrow", {"k": 2, "temperature": 0.5}, trains_router=False),
]


def test_every_registered_router_has_exactly_one_row():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    shipped = [
        n
        for n in lomix.available_routers()
        if router_class(n).__module__.startswith(("lomix.routers.", "lomix.methods."))
    ]
    assert sorted(names) == shipped  # (tests and plugins may register others in this process)


def _build(case: RouterCase):
    model, fresh = build_pair(MODEL_CASES["llama"])
    config = lomix.MixtureConfig(
        target_modules=TARGETS, num_experts=4, rank=2, alpha=4, router=lomix.router_config(case.name, **case.fields)
    )
    lomix.inject(model, config)
    randomize_experts(model)
    inputs = MODEL_CASES["llama"].inputs(torch.Generator().manual_seed(0))
    return model, fresh, {**inputs, **case.context}


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> RouterCase:
    return request.param


def test_save_and_load_reproduce_the_logits(case, tmp_path):
    model, fresh, inputs = _build(case)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        base = fresh(**{k: v for k, v in inputs.items() if k not in case.context}).logits
    assert not torch.equal(expected, base)  # the mixture changes the output
    lomix.save(model, tmp_path / "mixture")
    loaded = lomix.load(fresh, tmp_path / "mixture")
    assert loaded.lomix_state.config == model.lomix_state.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)


def training_loss(model, inputs) -> torch.Tensor:
    """The next-token loss, or for a router trained by RLOO (its config's ``estimator``) the mean
    loss of 3 sampled selections plus the RLOO surrogate that carries the router's gradient."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def per_row(batch, labels):
        logits = model(**batch).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none").sum(1)

    if model.lomix_state.config.router.estimator != "rloo":
        return per_row(inputs, labels).sum()
    samples = 3
    with lomix.rloo.recording(model):
        batch = lomix.rloo.replicate({**inputs, "labels": labels}, samples)
        rows = per_row({k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
        log_q = lomix.rloo.selection_log_prob(model, rows.shape[0])
    return rows.sum() / samples + lomix.rloo.rloo_surrogate(rows, log_q, samples)


def test_one_training_step_changes_the_trainable_parameters(case):
    model, _, inputs = _build(case)
    model.train()
    routers = {n: p for n, p in model.named_parameters() if ".router." in n and p.requires_grad}
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n and p.requires_grad}
    assert bool(routers) == case.trains_router and experts
    before = {n: p.detach().clone() for n, p in {**routers, **experts}.items()}
    optimizer = torch.optim.AdamW(lomix.parameter_groups(model, lr=1e-2))
    torch.manual_seed(0)
    (training_loss(model, inputs) + lomix.aux_loss(model)).backward()
    optimizer.step()
    unchanged = [n for n, p in {**routers, **experts}.items() if torch.equal(p.detach(), before[n])]
    assert unchanged == []


def test_export_is_accepted_exactly_for_a_fixed_route(case):
    model, fresh, inputs = _build(case)
    model.eval()
    route = {k: v[:1] for k, v in case.context.items()}  # one task
    if not case.fixed_route:
        with pytest.raises(NotFixedRouteError, match="--format lomix"):
            fixed_loras(model, **route)
        return
    loras = fixed_loras(model, **route)
    assert sorted(loras) == sorted(name for name, _ in lomix.mixture_layers(model))
    # the one LoRA per layer IS the mixture: fold it into the base and compare the logits
    with torch.no_grad():
        for name, lora in loras.items():
            fresh.get_submodule(name).weight += lora.delta().to(torch.float32)
        row = {k: v[:1] for k, v in inputs.items()}
        expected = model(**row).logits
        torch.testing.assert_close(fresh(**{k: v for k, v in row.items() if k not in route}).logits, expected,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
