"""inject / save / load on real transformers architectures, checked against PEFT and bit-exactness."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts

import lomix


def mixture_config(case, **kwargs):
    defaults = dict(
        target_modules=case.targets, num_experts=4, rank=4, alpha=8, router=lomix.router_config("topk", k=2)
    )
    defaults.update(kwargs)
    return lomix.MixtureConfig(**defaults)


def test_one_expert_with_gate_one_equals_peft_lora(llama_case):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    ours, theirs = build_pair(llama_case)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    lomix.inject(
        ours,
        lomix.MixtureConfig(
            target_modules=targets, num_experts=1, rank=4, alpha=8, router=lomix.router_config("topk", k=1)
        ),
    )
    g = torch.Generator().manual_seed(5)
    for name, layer in lomix.mixture_layers(ours):
        A = torch.randn(4, layer.d_in, generator=g) * 0.3
        B = torch.randn(layer.d_out, 4, generator=g) * 0.3
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.experts.A[0].copy_(A)
            layer.experts.B[0].copy_(B)
            peft_layer.lora_A["default"].weight.copy_(A)
            peft_layer.lora_B["default"].weight.copy_(B)
    inputs = llama_case.inputs(torch.Generator().manual_seed(0))
    ours_logits = ours(**inputs).logits
    theirs_logits = theirs(**inputs).logits
    base_logits = build_pair(llama_case)[0](**inputs).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapters do change the output
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)


def test_save_load_reproduces_logits_bit_exactly(model_case, tmp_path):
    model, fresh = build_pair(model_case)
    lomix.inject(model, mixture_config(model_case))
    randomize_experts(model)
    inputs = model_case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model_case.output(model, inputs)
        base = model_case.output(fresh, inputs)
    assert not torch.equal(expected, base)
    lomix.save(model, tmp_path / "mixture")
    assert sorted(p.name for p in (tmp_path / "mixture").iterdir()) == [lomix.CONFIG_NAME, lomix.WEIGHTS_NAME]
    loaded = lomix.load(fresh, tmp_path / "mixture")
    with torch.no_grad():
        assert torch.equal(model_case.output(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_only_mixture_parameters_train_and_base_is_bit_identical_after_a_step(model_case):
    model, _ = build_pair(model_case)
    model.train()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    lomix.inject(model, mixture_config(model_case))
    randomize_experts(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("experts.A", "experts.B", "router.weight")) for n in trainable)
    mixture_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lomix.parameter_groups(model, lr=1e-2, router_lr=0.1), weight_decay=0.1)
    out = model_case.output(model, model_case.inputs(torch.Generator().manual_seed(0)))
    (out.square().mean() + lomix.aux_loss(model)).backward()
    optimizer.step()
    state = model.state_dict()
    for key, value in base_before.items():
        parts = key.rsplit(".", 1)
        wrapped = f"{parts[0]}.base_layer.{parts[1]}"
        assert torch.equal(state[wrapped] if wrapped in state else state[key], value), key
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, mixture_before[n])]
    assert len(changed) == len(trainable)
    report = lomix.count_parameters(model)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "trainable params" in str(report)


def test_gradients_reach_selected_experts_and_the_router(llama_case):
    model, _ = build_pair(llama_case)
    lomix.inject(
        model,
        lomix.MixtureConfig(
            target_modules=["v_proj", "up_proj"], num_experts=8, rank=4, router=lomix.router_config("topk", k=2)
        ),
    )
    randomize_experts(model)
    for _, layer in lomix.mixture_layers(model):
        layer.record_routing = True
    inputs = {"input_ids": torch.randint(0, 97, (1, 3), generator=torch.Generator().manual_seed(0))}
    model(**inputs).logits.sum().backward()
    for name, layer in lomix.mixture_layers(model):
        selected = set(layer.last_routing.indices.reshape(-1).tolist())
        assert 0 < len(selected) < 8, name  # 3 tokens x top-2 cannot use all 8 experts
        for e in range(8):
            a_grad = layer.experts.A.grad[e].abs().sum().item()
            b_grad = layer.experts.B.grad[e].abs().sum().item()
            if e in selected:
                assert a_grad > 0 and b_grad > 0, (name, e)
            else:
                assert a_grad == 0 and b_grad == 0, (name, e)
        assert layer.router.weight.grad.abs().sum() > 0, name


def test_parameter_groups_split_routers_from_experts(llama_case):
    model, _ = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case))
    groups = {g["name"]: g for g in lomix.parameter_groups(model, lr=1e-3, router_lr=0.1, weight_decay=0.01)}
    assert set(groups) == {"experts", "routers"}
    assert groups["routers"]["lr"] == 0.1 and groups["experts"]["lr"] == 1e-3
    n_layers = len(list(lomix.mixture_layers(model)))
    assert len(groups["routers"]["params"]) == n_layers and len(groups["experts"]["params"]) == 2 * n_layers
    model.lm_head.weight.requires_grad_(True)
    groups = {g["name"]: g for g in lomix.parameter_groups(model, lr=1e-3)}
    assert groups["other"]["params"] == [model.lm_head.weight]


def test_regex_targets_and_exclusions(llama_case):
    model, _ = build_pair(llama_case)
    lomix.inject(
        model,
        lomix.MixtureConfig(
            target_modules=r".*layers\.\d+\.self_attn\.(q|v)_proj", exclude_modules=["layers.1.self_attn.v_proj"]
        ),
    )
    assert [n for n, _ in lomix.mixture_layers(model)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_eject_restores_the_base_model(llama_case):
    model, reference = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case))
    randomize_experts(model)
    lomix.eject(model)
    inputs = llama_case.inputs(torch.Generator().manual_seed(0))
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "lomix_state")


@pytest.mark.parametrize("router", ["dense", "fixed"])
def test_other_builtin_routers_run_inside_a_model(llama_case, router, tmp_path):
    model, fresh = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case, router=lomix.router_config(router)))
    randomize_experts(model)
    inputs = llama_case.inputs(torch.Generator().manual_seed(0))
    expected = model(**inputs).logits
    lomix.save(model, tmp_path)
    assert torch.equal(lomix.load(fresh, tmp_path)(**inputs).logits, expected)


def test_model_cases_cover_the_four_families():
    assert set(MODEL_CASES) == {"llama", "gpt2", "bert", "t5"}


def test_loading_into_a_model_in_eval_mode_routes_without_training_noise(llama_case, tmp_path):
    """Mixture layers take the mode of the layer they wrap: a mixture loaded into an eval-mode base
    for inference must not apply router jitter or expert dropout (different outputs per call)."""
    config = mixture_config(llama_case, dropout=0.3, router=lomix.router_config("topk", k=2, jitter=0.5))
    model, fresh = build_pair(llama_case)
    lomix.inject(model, config)
    randomize_experts(model)
    lomix.save(model, tmp_path / "mixture")
    loaded = lomix.load(fresh.eval(), tmp_path / "mixture")
    assert not any(module.training for module in loaded.modules())
    inputs = llama_case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        first, second = loaded(**inputs).logits, loaded(**inputs).logits
        expected = model.eval()(**inputs).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    training = lomix.inject(build_pair(llama_case)[0].train(), config)  # a base in training mode keeps training
    assert all(layer.training for _, layer in lomix.mixture_layers(training))


def test_disabled_runs_the_base_alone_and_restores_the_mixture(llama_case):
    model, fresh = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case))
    randomize_experts(model)
    inputs = llama_case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(**inputs).logits
        base = fresh(**inputs).logits
        with lomix.disabled(model):
            torch.testing.assert_close(model(**inputs).logits, base, rtol=0, atol=0)
        torch.testing.assert_close(model(**inputs).logits, mixed, rtol=0, atol=0)
        with pytest.raises(RuntimeError), lomix.disabled(model):
            raise RuntimeError("inside the block")
        torch.testing.assert_close(model(**inputs).logits, mixed, rtol=0, atol=0)
    assert not torch.equal(mixed, base)


def test_update_router_changes_every_layer_and_the_saved_config(llama_case, tmp_path):
    model, _ = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case))
    config = lomix.update_router(model, k=3)
    assert config.k == 3 and model.lomix_state.config.router.k == 3
    assert {layer.router.config.k for _, layer in lomix.mixture_layers(model)} == {3}
    lomix.save(model, tmp_path / "m")
    assert lomix.MixtureConfig.load(tmp_path / "m" / lomix.CONFIG_NAME).router.k == 3
    with pytest.raises(lomix.ConfigError, match=r"router\.k"):
        lomix.update_router(model, k=5)  # more than num_experts=4
    assert model.lomix_state.config.router.k == 3
