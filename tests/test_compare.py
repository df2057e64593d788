"""benchmarks/compare.py's pieces against direct references: the PEFT wrapper gives PEFT's own
outputs, the parameter counts and routing supports follow their definitions, the memory probe sees
an allocation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import _llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # benchmarks/compare.py
import peft

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(0))


def test_wrapper_gives_peft_lora_logits_and_drops_descriptions():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS, init_lora_weights=False)
    )
    wrapped = compare.PeftCausalLM(model).eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = wrapped(input_ids=ids, task_ids=torch.tensor([0, 1, 2]), task_descriptions=["a", "b", "c"]).logits
    torch.testing.assert_close(got, expected)


def test_wrapper_routes_poly_by_task_and_support_matches_the_formula():
    torch.manual_seed(0)
    config = peft.PolyConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS, n_tasks=2, n_skills=3, n_splits=1)
    model = peft.get_peft_model(_llama(), config)
    for name, param in model.named_parameters():  # non-zero B and distinct task rows: routing changes outputs
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
        if "module_logits" in name:
            with torch.no_grad():
                param.copy_(torch.tensor([[2.0, -1.0, 0.0], [-3.0, 1.0, 1.0]]))
    wrapped = compare.PeftCausalLM(model, task_ids=True).eval()
    ids = _ids()
    task_ids = torch.tensor([0, 1, 1])
    with torch.no_grad():
        got = wrapped(input_ids=ids, task_ids=task_ids, task_descriptions=["x"] * 3).logits
        expected = model(input_ids=ids, task_ids=task_ids).logits
        other = wrapped(input_ids=ids, task_ids=torch.tensor([1, 0, 0])).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, other)

    # Poly's eval weights: sigmoid(logits) normalised per task; support = ||w||_1^2 / ||w||_2^2
    weights = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 1.0, 1.0]]).sigmoid()
    weights = weights / weights.sum(-1, keepdim=True)
    per_task = weights.sum(-1) ** 2 / (weights**2).sum(-1)
    batch = {"task_ids": task_ids, "input_ids": ids}
    expected_support = float(per_task[task_ids].mean())
    assert compare.poly_support(wrapped, batch) == pytest.approx(expected_support, rel=1e-5)


def test_lomix_counts_active_share_of_a_top2_of_4_mixture():
    import lomix

    model = _llama()
    lomix.inject(
        model,
        lomix.MixtureConfig(target_modules=TARGETS, num_experts=4, rank=2, router=lomix.router_config("topk", k=2)),
    )
    adapter, active = compare.lomix_counts(model)
    experts = routers = 0
    for module_name, module in _llama().named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.split(".")[-1] in TARGETS:
            d_in, d_out = module.in_features, module.out_features
            experts += 4 * 2 * (d_in + d_out)  # A (r x d_in) and B (d_out x r) per expert
            routers += d_in * 4  # a linear gate without bias
    assert adapter == experts + routers == lomix.count_parameters(model).trainable
    assert active == experts // 2 + routers


def test_step_memory_sees_an_allocation_held_during_the_step():
    held = []

    def step() -> None:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        held.append(float(block.sum()))

    measured = compare.step_memory_mib(step)  # Linux: /proc/self/clear_refs resets the peak
    assert measured is not None and 56 <= measured <= 200


def test_loader_gives_the_finetune_recipes_batches(tmp_path):
    """PEFT methods train on exactly the batches a lomix run sees (same sampler, grouping, seed),
    across an epoch boundary."""
    from accelerate.state import AcceleratorState
    from tiny_assets import run_assets, tiny_config

    from lomix.recipes import finetune
    from lomix.recipes.config import build_config

    root, model, train, test = run_assets(tmp_path)
    cfg = build_config(tiny_config(root, model, train, test, train={"batch_size": 3, "group_by_length": 2}))
    data = compare.prepare_data(cfg)
    steps = 2 * (len(data.features) // 3) + 1  # two epochs and a step
    mine = list(compare.loader(data, steps))
    try:
        run = finetune.setup(cfg)
        theirs = [next(batches) for batches in [finetune.micro_batches(run)] for _ in range(steps)]
    finally:
        AcceleratorState._reset_state(True)
    assert len(mine) == steps
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["task_ids"], b["task_ids"])
