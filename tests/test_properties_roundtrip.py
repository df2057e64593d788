"""Properties: save/load round trips of random mixtures, and a damaged config never worse than an error.

Random mixture configs (router, its own fields, experts, rank, alpha, rsLoRA, targets, balance,
kernel) on a tiny two-layer model with every mixture tensor randomised: `lomix.save` then
`lomix.load` into a fresh copy of the base gives the same config, bit-identical tensors and
bit-identical outputs. A saved config with one field replaced by an arbitrary JSON value loads as a
valid mixture or raises a `LomixError`, leaving the base model as it was. Examples per property:
see each test's settings (derandomized, conftest profile).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import lomix
from lomix.checkpoint import CONFIG_NAME, describe, mixture_state_dict, read_config

D_IN, D_HIDDEN, D_OUT = 8, 12, 4  # MHR heads: any common divisor (1, 2, 4)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(D_IN, D_HIDDEN)
        self.second = nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x, attention_mask=None):
        return self.second(torch.tanh(self.first(x)))


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6)
std = st.floats(0.0, 1.0)


@st.composite
def router_fields(draw, num_experts):
    name = draw(st.sampled_from(["dense", "fixed", "topk", "poly", "mhr", "remix", "loramixer"]))
    k = st.integers(1, num_experts)
    if name == "dense":
        return {"name": name, "init_std": draw(std)}
    if name == "fixed":
        experts = draw(st.lists(st.integers(0, num_experts - 1), min_size=1, max_size=num_experts, unique=True))
        weights = draw(st.none() | st.lists(st.floats(-2, 2), min_size=len(experts), max_size=len(experts)))
        return {"name": name, "experts": experts, "weights": weights}
    if name == "topk":
        top = draw(k)
        renormalize = st.sampled_from([None, False]) if top == 1 else st.sampled_from([None, False, True])
        return {"name": name, "k": top, "renormalize": draw(renormalize), "jitter": draw(st.floats(0, 0.9)),
                "init_std": draw(std), "bias_update_rate": draw(st.sampled_from([0.0, 1e-3]))}  # fmt: skip
    if name in ("poly", "mhr"):
        fields = {"name": name, "gumbel": draw(st.booleans()), "temperature": draw(st.floats(0.05, 5.0)),
                  "init_range": draw(std), "unknown_task": draw(st.sampled_from(["error", "uniform"]))}  # fmt: skip
        if draw(st.booleans()):
            fields["tasks"] = draw(st.lists(names, min_size=1, max_size=3, unique=True))
        else:
            fields["n_tasks"] = draw(st.integers(1, 3))
        if name == "mhr":
            fields["n_heads"] = draw(st.sampled_from([1, 2, 4]))
        return fields
    if name == "remix":
        return {"name": name, "k": draw(k), "granularity": draw(st.sampled_from(["sequence", "token"])),
                "omega": draw(st.sampled_from(["lora", "rslora"])), "omega_alpha": draw(st.floats(0.1, 4.0)),
                "detach_input": draw(st.booleans()), "init_std": draw(std)}  # fmt: skip
    return {"name": name, "k": draw(k), "inference": draw(st.sampled_from(["topk", "dense"])),
            "straight_through": draw(st.booleans()), "sbl_alpha": draw(std), "sbl_lambda": draw(std),
            "entropy_sign": draw(st.sampled_from(["sharpen", "flatten"])), "init_std": draw(std)}  # fmt: skip


@st.composite
def mixture_configs(draw):
    num_experts = draw(st.integers(1, 5))
    router = draw(router_fields(num_experts))
    targets = draw(st.sampled_from([["first"], ["second"], ["first", "second"], r"^(first|second)$", "sec.*"]))
    balance = {"switch": 0.0 if router["name"] == "remix" else draw(st.floats(0, 1)), "z_loss": draw(st.floats(0, 1))}
    return lomix.MixtureConfig(
        target_modules=targets,
        num_experts=num_experts,
        rank=draw(st.integers(1, 4)),
        alpha=draw(st.floats(0.1, 32.0)),
        use_rslora=draw(st.booleans()),
        dropout=draw(st.floats(0.0, 0.5)),
        router=router,
        balance=balance,
        kernel=draw(st.sampled_from(["auto", "torch"])),
    )


def build(config: lomix.MixtureConfig, seed: int):
    torch.manual_seed(seed)
    base = Tiny().eval()
    fresh = copy.deepcopy(base)
    model = lomix.inject(base, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in mixture_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model, fresh


def batch(config: lomix.MixtureConfig, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed + 2)
    mask = torch.ones(2, 3, dtype=torch.long)
    mask[1, 0] = 0
    inputs = {"x": torch.randn(2, 3, D_IN, generator=generator), "attention_mask": mask}
    if config.router.name in ("poly", "mhr"):
        inputs["task_ids"] = torch.randint(0, config.router.rows, (2,), generator=generator)
    return inputs


@settings(max_examples=40)
@given(mixture_configs(), st.integers(0, 1000))
def test_save_then_load_gives_the_same_mixture_bit_for_bit(config, seed):
    assert lomix.MixtureConfig.from_json(config.to_json()).to_dict() == config.to_dict()
    model, fresh = build(config, seed)
    inputs = batch(config, seed)
    with torch.no_grad():
        expected = model(**inputs)
    with tempfile.TemporaryDirectory() as folder:
        lomix.save(model, folder)
        assert read_config(folder).to_dict() == config.to_dict()
        assert describe(folder)["config"] == config.to_dict()
        loaded = lomix.load(fresh, folder)
    saved, restored = mixture_state_dict(model), mixture_state_dict(loaded)
    assert saved.keys() == restored.keys()
    for key, tensor in saved.items():
        assert torch.equal(restored[key], tensor), key
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), expected)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def paths(data, prefix=()):
    """Every key path of a nested JSON mapping, leaves and sections."""
    for key, value in data.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from paths(value, (*prefix, key))


@settings(max_examples=60)
@given(mixture_configs(), st.data())
def test_a_damaged_config_loads_or_raises_a_lomix_error_leaving_the_base_as_it_was(config, data):
    model, fresh = build(config, 0)
    with tempfile.TemporaryDirectory() as folder:
        lomix.save(model, folder)
        path = Path(folder) / CONFIG_NAME
        saved = json.loads(path.read_text())
        where = data.draw(st.sampled_from(sorted(paths(saved), key=str)) | st.lists(names, min_size=1, max_size=2))
        node = saved
        for part in where[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else {}
        node[where[-1]] = data.draw(json_values)
        path.write_text(json.dumps(saved))
        before = copy.deepcopy(fresh.state_dict())
        try:
            loaded = lomix.load(fresh, folder)
        except lomix.LomixError as exc:
            event(f"refused: {type(exc).__name__}")
            assert not hasattr(fresh, "lomix_state") and not list(lomix.mixture_layers(fresh))
            assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
            return
    event("loaded")
    with torch.no_grad():
        loaded(**batch(loaded.lomix_state.config, 0))


@pytest.mark.parametrize(("field", "value"), [("num_experts", 2**40), ("rank", 2**40), ("num_experts", 3), ("rank", 1)])
def test_a_config_whose_sizes_do_not_fit_the_weights_is_refused_before_anything_is_built(tmp_path, field, value):
    """Found while fuzzing the loader: a huge num_experts or rank made inject try to allocate the
    bank (a RuntimeError from the allocator) instead of saying that the files disagree."""
    config = lomix.MixtureConfig(target_modules=["first"], num_experts=2, rank=2, router={"name": "topk", "k": 1})
    model, fresh = build(config, 0)
    lomix.save(model, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**saved, field: value}))
    with pytest.raises(
        lomix.ShapeMismatchError, match=r"tensor first\.experts\.[AB] has shape .* says \d+ experts of rank"
    ):
        lomix.load(fresh, tmp_path)
    assert not hasattr(fresh, "lomix_state")
