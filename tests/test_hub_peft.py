"""PEFT LoRA adapters as the frozen experts of one mixture (`lomix.hub.load_peft_experts`).

The reference is PEFT itself: routing every token to expert j must reproduce PEFT's output with
adapter j active.
"""

from __future__ import annotations

import copy
import json

import hubserver
import pytest
import torch
from conftest import MODEL_CASES, build_pair
from hubdata import LLAMA, folder_files, save_peft_adapter

import lomix
import lomix.hub
from lomix.hub import errors

# Three adapters that differ in every way PEFT allows: rank (2, 4, 8), targets, use_rslora,
# and per-module rank_pattern / alpha_pattern.
ADAPTERS = [
    {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"], "use_rslora": True},
    {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "o_proj", "gate_proj"],
        "rank_pattern": {"o_proj": 3},
        "alpha_pattern": {"q_proj": 5},
    },
]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from hubserver.serve(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(base model, adapter folders, PEFT model holding all three adapters)."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("adapters")
    base, _ = build_pair(LLAMA)
    folders = [save_peft_adapter(base, root / f"a{j}", seed=j, **kw) for j, kw in enumerate(ADAPTERS)]
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[0]), adapter_name="a0")
    for j in (1, 2):
        reference.load_adapter(str(folders[j]), adapter_name=f"a{j}")
    return base, folders, reference.eval()


def _logits(model, case=LLAMA):
    inputs = case.inputs(torch.Generator().manual_seed(3))
    with torch.no_grad():
        return case.output(model, inputs)


@pytest.mark.parametrize("j", range(len(ADAPTERS)))
def test_routing_to_expert_j_reproduces_peft_adapter_j(adapters, hub, j):
    base, folders, reference = adapters
    hub.commit("user/adapter-1", folder_files(folders[1]))  # one expert comes from the hub
    specs = [folders[0], "user/adapter-1", str(folders[2])]
    model = lomix.hub.load_peft_experts(copy.deepcopy(base), specs, router=lomix.router_config("fixed", experts=[j]))

    reference.set_adapter(f"a{j}")
    expected = _logits(reference)
    assert not torch.allclose(expected, _logits(base), atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)

    config = model.lomix_state.config
    assert config.num_experts == 3 and config.rank == 8 and config.alpha == 8.0
    expected_targets = {n for n, _ in base.named_modules() if n.endswith(("q_proj", "v_proj", "k_proj", "o_proj"))}
    expected_targets |= {n for n, _ in base.named_modules() if n.endswith(("down_proj", "gate_proj"))}
    assert set(config.target_modules) == expected_targets


def test_only_the_routers_train(adapters):
    base, folders, _ = adapters
    model = lomix.hub.load_peft_experts(copy.deepcopy(base), folders, router="dense")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    assert len(trainable) == len(list(lomix.mixture_layers(model)))  # one router weight per layer
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = LLAMA.inputs(torch.Generator().manual_seed(0))
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in experts.items())
    assert all(not torch.equal(params[n], v) for n, v in routers.items())


def test_saved_and_reloaded_mixture_keeps_the_experts(adapters, tmp_path):
    base, folders, reference = adapters
    model = lomix.hub.load_peft_experts(copy.deepcopy(base), folders, router=lomix.router_config("fixed", experts=[2]))
    lomix.save(model, tmp_path / "mix")
    reloaded = lomix.load(copy.deepcopy(base), tmp_path / "mix")
    reference.set_adapter("a2")
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_with_fan_in_fan_out(tmp_path):
    from peft import PeftModel

    case = MODEL_CASES["gpt2"]
    base, _ = build_pair(case)
    kwargs = {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}
    folders = [save_peft_adapter(base, tmp_path / f"g{j}", seed=j, r=2 + 2 * j, lora_alpha=8, **kwargs) for j in (0, 1)]
    for j in (0, 1):
        reference = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[j])).eval()
        model = lomix.hub.load_peft_experts(
            copy.deepcopy(base), folders, router=lomix.router_config("fixed", experts=[j])
        )
        torch.testing.assert_close(_logits(model, case), _logits(reference, case), rtol=1e-5, atol=1e-5)


def test_an_adapter_for_other_shapes_is_refused_before_the_model_is_touched(adapters):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, folders, _ = adapters
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    wider.config._name_or_path = "org/wider-llama"
    with pytest.raises(lomix.ShapeMismatchError) as info:
        lomix.hub.load_peft_experts(wider, folders, check_base=False)
    message = str(info.value)
    assert str(folders[0]) in message and "model.layers.0.self_attn.q_proj" in message
    assert "(2, 32)" in message and "maps 48 -> 48" in message and "'org/wider-llama'" in message
    assert not hasattr(wider, "lomix_state") and all(p.requires_grad for p in wider.parameters())

    shallow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(lomix.ArchitectureMismatchError, match=r"adapts module model\.layers\.1\.self_attn\.q_proj"):
        lomix.hub.load_peft_experts(shallow, folders)
    assert not hasattr(shallow, "lomix_state")


def test_base_model_mismatch_names_both(adapters, tmp_path):
    base, folders, _ = adapters
    named = tmp_path / "named"
    named.mkdir()
    for name, data in folder_files(folders[0]).items():
        (named / name).write_bytes(data)
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/llama-a"}))
    model = copy.deepcopy(base)
    model.config._name_or_path = "org/llama-b"
    with pytest.raises(errors.BaseModelMismatchError, match=r"trained on 'org/llama-a'.*model given is 'org/llama-b'"):
        lomix.hub.load_peft_experts(model, [named])
    assert not hasattr(model, "lomix_state")
    model.config._name_or_path = "/models/llama-a"  # the same weights saved locally: accepted
    lomix.hub.load_peft_experts(model, [named])
    assert model.lomix_state.config.num_experts == 1
    other = copy.deepcopy(base)
    other.config._name_or_path = "org/llama-b"
    with pytest.raises(errors.BaseModelMismatchError, match=r"check_base=False"):
        lomix.hub.load_peft_experts(other, [named])
    lomix.hub.load_peft_experts(other, [named], check_base=False)  # the user says they are the same
    assert other.lomix_state.config.num_experts == 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_dora": True}, r"use_dora is true \(DoRA"),
        ({"bias": "lora_only"}, r"trains biases"),
        ({"peft_type": "IA3"}, r"peft_type is 'IA3'"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' also changes the base weights"),
        ({"r": 0}, r"r must be a positive number"),
        (
            {"target_modules": ["q_proj", "v_proj", "k_proj"]},
            r"lists 'k_proj', but adapter_model\.safetensors holds no LoRA tensor",
        ),
        (
            {"target_modules": ["q_proj"]},
            r"tensors for model\.layers\.0\.self_attn\.v_proj, which target_modules \['q_proj'\] .* does not select",
        ),
    ],
)
def test_adapters_that_cannot_be_experts_are_refused_with_the_reason(adapters, tmp_path, change, match):
    _, folders, _ = adapters
    folder = tmp_path / "a"
    folder.mkdir()
    for name, data in folder_files(folders[0]).items():
        (folder / name).write_bytes(data)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(errors.AdapterError, match=match):
        lomix.hub.load_peft_experts(build_pair(LLAMA)[1], [folder])


def test_modules_to_save_tensors_are_refused(tmp_path):
    base, _ = build_pair(LLAMA)
    folder = save_peft_adapter(base, tmp_path / "a", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(errors.UnsupportedAdapterError, match=r"lm_head.*is not a LoRA factor"):
        lomix.hub.pull(folder)
