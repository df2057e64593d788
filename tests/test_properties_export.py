"""Property: a fixed-route mixture exported as one PEFT LoRA or as a merged checkpoint gives the
mixture's own logits, after an optional MC-SMoE merge.

Random tiny Llama / GPT-2 mixtures (targets, experts, rank, alpha, rsLoRA) under a fixed route: the
``fixed`` router (any expert set, weights given, zero or negative, or equal), ``dense`` with a zero
router weight (equal gates for every token), Poly/MHR for one task; token-routed ones optionally
merged first (random grouping, weighting, dropping, rank, sparse residual). The references are the
mixture's logits and PEFT / transformers loading the exported folders.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts
from hypothesis import event, given, settings
from hypothesis import strategies as st

import lomix
from lomix.export import export_merged, export_peft
from lomix.merge import MergeOptions, merge_mixture

pytestmark = pytest.mark.slow  # ~1 s per example (two saves and two loads through PEFT / transformers)


@st.composite
def cases(draw):
    family = draw(st.sampled_from(["llama", "gpt2"]))
    targets = draw(st.lists(st.sampled_from(MODEL_CASES[family].targets), min_size=1, max_size=3, unique=True))
    num_experts = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["fixed", "dense", "poly", "mhr"]))
    route = {}
    if kind == "fixed":
        experts = draw(st.lists(st.integers(0, num_experts - 1), min_size=1, max_size=num_experts, unique=True))
        weight = st.one_of(st.just(0.0), st.floats(-1.5, 1.5))
        weights = draw(st.none() | st.lists(weight, min_size=len(experts), max_size=len(experts)))
        router = {"name": "fixed", "experts": experts, "weights": weights}
    elif kind == "dense":
        router = {"name": "dense"}
    else:
        router = {"name": kind, "n_tasks": 3}
        if kind == "mhr":
            router["n_heads"] = draw(st.sampled_from([1, 2, 4]))
        route = {"task_ids": torch.tensor([draw(st.integers(0, 2))])}
    merge = None
    if kind in ("fixed", "dense") and draw(st.booleans()):
        merge = MergeOptions(
            experts=draw(st.integers(1, num_experts)),
            rank=draw(st.none() | st.integers(1, 6)),
            weighting=draw(st.sampled_from(["frequency", "uniform"])),
            grouping="random",
            drop=draw(st.booleans()),
            residual_density=draw(st.sampled_from([0.0, 0.05])),
            seed=draw(st.integers(0, 9)),
        )
    config = lomix.MixtureConfig(
        target_modules=targets,
        num_experts=num_experts,
        rank=draw(st.integers(1, 4)),
        alpha=draw(st.floats(0.5, 16.0)),
        use_rslora=draw(st.booleans()),
        router=router,
    )
    return family, config, route, merge, draw(st.integers(0, 100))


def logits(model, inputs, **route):
    with torch.no_grad():
        return model(**inputs, **route).logits


@settings(max_examples=15)
@given(cases())
def test_fixed_route_exports_give_the_mixture_logits(case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family, config, route, merge, seed = case
    mc = MODEL_CASES[family]
    model, fresh = build_pair(mc)
    lomix.inject(model, config)
    randomize_experts(model, seed=seed, std=0.3)
    if config.router.name == "dense":
        with torch.no_grad():
            for _, layer in lomix.mixture_layers(model):
                layer.router.weight.zero_()
    inputs = mc.inputs(torch.Generator().manual_seed(seed))
    if merge is not None:
        with lomix.RoutingStats(model) as stats, torch.no_grad():
            model(**inputs)
        merge_mixture(model, stats, merge)
    expected = logits(model, inputs, **route)
    merged_kind = "" if merge is None else " merged" + (" with a residual" if merge.residual_density else "")
    event(config.router.name + merged_kind)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        export_merged(model, folder / "merged", **route)
        merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
        torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-4, atol=2e-5, msg="merged export")
        if merge is not None and merge.residual_density > 0:
            with pytest.raises(lomix.LomixError, match="sparse residual"):
                export_peft(model, folder / "peft", **route)
            return
        export_peft(model, folder / "peft", **route)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), folder / "peft").eval()
        torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=1e-4, atol=2e-5, msg="PEFT export")
