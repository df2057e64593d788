"""inject / save / load on real transformers architectures, checked against PEFT and bit-exactness."""

from __future__ import annotations

import collections
import copy

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


def test_load_trainable_continues_training_exactly_like_the_saved_model(llama_case, tmp_path):
    """``trainable=True``: exactly the experts and routers train (the base stays frozen), and one
    optimizer step on the loaded mixture equals one step on the model that was saved."""
    model, fresh = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case, target_modules=["q_proj", "up_proj"]))
    randomize_experts(model)
    lomix.save(model, tmp_path / "mixture")
    loaded = lomix.load(fresh, tmp_path / "mixture", trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in model.named_parameters() if p.requires_grad]
    assert {id(p) for p in loaded.parameters() if p.requires_grad} == {id(p) for p in lomix.mixture_parameters(loaded)}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    inputs = llama_case.inputs(torch.Generator().manual_seed(0))
    for m in (model, loaded):
        m.train()
        optimizer = torch.optim.AdamW(lomix.parameter_groups(m, lr=1e-2))
        (m(**inputs).logits.square().mean() + lomix.aux_loss(m)).backward()
        optimizer.step()
    after = dict(loaded.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(after[name], param, rtol=0, atol=0, msg=name)
        if name in before:
            assert not torch.equal(param, before[name]), f"{name} did not train"


@pytest.mark.parametrize(("k", "renormalize"), [(2, True), (3, False), (4, True)])
def test_topk_layer_output_is_the_routed_sum_over_the_k_best_experts(k, renormalize):
    """A top-k layer's output for k > 1 against y = W x + b + s * sum_{e in topk(p)} g_e B_e A_e x,
    p = softmax(W_r x), g = p_topk (/ their sum), one token at a time in float64."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    config = lomix.MixtureConfig(
        target_modules=["layer"],
        num_experts=5,
        rank=3,
        alpha=6.0,
        router=lomix.router_config("topk", k=k, renormalize=renormalize),
    )
    model = lomix.inject(torch.nn.Sequential(collections.OrderedDict(layer=base)), config)
    layer = model.layer
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=generator))
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator))
    x = torch.randn(2, 4, 12, generator=generator)
    y = model(x)
    W, b = base.weight.detach().double(), base.bias.detach().double()
    A, B, W_r = (t.detach().double() for t in (layer.experts.A, layer.experts.B, layer.router.weight))
    expected = torch.empty(2, 4, 10, dtype=torch.float64)
    for i in range(2):
        for t in range(4):
            token = x[i, t].double()
            p = torch.softmax(W_r @ token, dim=0)
            best = sorted(range(5), key=lambda e: -float(p[e]))[:k]
            total = sum(float(p[e]) for e in best) if renormalize else 1.0
            delta = sum(float(p[e]) / total * (B[e] @ (A[e] @ token)) for e in best)
            expected[i, t] = W @ token + b + 2.0 * delta  # s = alpha / r = 2
    assert (expected - (x.double() @ W.T + b)).abs().max() > 0.1  # the experts matter
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


class ReadsItsWeight(torch.nn.Module):
    """Calls ``called`` but reads ``dt_proj.weight`` directly, as Mamba's fused path does."""

    def __init__(self):
        super().__init__()
        self.called = torch.nn.Linear(8, 8)
        self.dt_proj = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.called(x)) + x @ self.dt_proj.weight.T


def test_a_wrapped_module_whose_forward_never_runs_is_named():
    """Issue 25, item 7: such a module's experts have exactly zero effect and no gradient."""
    from lomix.inject import check_targets_run

    torch.manual_seed(0)
    model = lomix.inject(ReadsItsWeight(), lomix.MixtureConfig(target_modules=["called", "dt_proj"], num_experts=2))
    randomize_experts(model, std=0.5)
    x = torch.randn(3, 8)
    layer = model.dt_proj
    model.eval()
    expected = model.called(x) + x @ layer.base_layer.weight.T  # the experts of dt_proj add nothing
    assert torch.equal(model(x), expected)
    model.train()
    model(x).sum().backward()
    assert layer.experts.A.grad is None and model.called.experts.A.grad.abs().sum() > 0
    state = torch.get_rng_state()
    with pytest.raises(lomix.errors.TargetNotCalledError, match=r"^target_modules: 1 wrapped module\(s\) never") as e:
        check_targets_run(model, lambda: model(x))
    assert "(dt_proj)" in str(e.value) and "exclude_modules: ['dt_proj']" in str(e.value)
    assert torch.equal(torch.get_rng_state(), state)  # the probe's dropout drew from a forked RNG
    called_only = lomix.inject(ReadsItsWeight(), lomix.MixtureConfig(target_modules=["called"], num_experts=2))
    check_targets_run(called_only, lambda: called_only(x))  # every target runs: no error


def test_mamba_dt_proj_is_named_as_never_called():
    from transformers import MambaConfig, MambaForCausalLM

    from lomix.inject import check_targets_run

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, time_step_rank=4)
    model = MambaForCausalLM(config).train()  # training takes the fused path, which reads dt_proj.weight
    lomix.inject(model, lomix.MixtureConfig(target_modules=["in_proj", "dt_proj", "out_proj"], num_experts=2))
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(lomix.errors.TargetNotCalledError, match=r"2 wrapped module\(s\) never ran") as caught:
        check_targets_run(model, lambda: model(input_ids=ids))
    assert "backbone.layers.0.mixer.dt_proj, backbone.layers.1.mixer.dt_proj)" in str(caught.value)
    model = lomix.inject(MambaForCausalLM(config).train(), lomix.MixtureConfig(target_modules=["in_proj", "out_proj"]))
    check_targets_run(model, lambda: model(input_ids=ids))  # every target runs: no error


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(config)


def test_moe_targets_that_match_only_the_shared_expert_warn_naming_both(caplog):
    """Issue 25, item 9: on Qwen2-MoE the routed experts are fused 3-D parameters in transformers 5;
    gate_proj/up_proj/down_proj wrap only the shared expert."""
    model = tiny_qwen2_moe()
    fused = [name for name, p in model.named_parameters() if p.dim() == 3]  # independent list
    assert fused == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    with caplog.at_level("WARNING", logger="lomix.inject"):
        lomix.inject(model, lomix.MixtureConfig(target_modules=["gate_proj", "up_proj", "down_proj"], num_experts=2))
    wrapped = [name for name, _ in lomix.mixture_layers(model)]
    assert all(".shared_expert." in name for name in wrapped) and len(wrapped) == 6
    (record,) = [r for r in caplog.records if "fused expert" in r.getMessage()]
    message = record.getMessage()
    assert "4 fused expert weight(s)" in message and ", ".join(fused[:3]) in message
    assert "Wrapped instead: 6 module(s) (e.g. model.layers.0.mlp.shared_expert.gate_proj" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="lomix.inject"):  # attention targets mean no fused weight: silent
        lomix.inject(tiny_qwen2_moe(), lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=2))
        lomix.inject(tiny_qwen2_moe(), lomix.MixtureConfig(target_modules=r".*self_attn\.(q|v)_proj", num_experts=2))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="lomix.inject"):  # a regex that means them too
        lomix.inject(tiny_qwen2_moe(), lomix.MixtureConfig(target_modules=r".*mlp\..*_proj", num_experts=2))
    assert any("4 fused expert weight(s)" in r.getMessage() for r in caplog.records)


def test_the_probe_leaves_router_buffers_as_they_were():
    """LoRA-Mixer's hard stage marks the experts a training forward routed to (router.used): the
    probe forward must not, or the first optimizer step would move experts no batch routed to."""
    from lomix.inject import check_targets_run

    config = lomix.MixtureConfig(
        target_modules=["proj"], num_experts=4, router=lomix.router_config("loramixer", stage="hard"),
        balance=lomix.BalanceConfig(switch=0.0),
    )  # fmt: skip
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(10, 6))
    lomix.inject(model, config).train()
    x = torch.randn(2, 3, 10)
    check_targets_run(model, lambda: model(x, task_ids=[1, 3]))
    assert not model.proj.router.used.any()
    model(x, task_ids=[1, 3])  # the same forward outside the probe does mark them
    assert model.proj.router.used.tolist() == [False, True, False, True]


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


def test_a_mixture_saved_from_wrapped_layers_has_the_plain_models_keys(llama_case, tmp_path):
    """FSDP units and activation-checkpoint wrappers insert a module into each wrapped layer's path;
    the saved mixture must still load into the plain model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from lomix.checkpoint import mixture_state_dict

    model, _ = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case))
    randomize_experts(model)
    plain = mixture_state_dict(model)
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    wrapped = mixture_state_dict(model)
    assert wrapped.keys() == plain.keys()
    for key in plain:
        assert torch.equal(wrapped[key], plain[key]), key


def test_a_deep_copy_of_a_wrapped_model_computes_the_same_and_routes_on_its_own(llama_case):
    # TRL's reference model and EMA copies deep-copy the model: the copy gets its own routing context.
    model, _ = build_pair(llama_case)
    lomix.inject(model, mixture_config(llama_case))
    randomize_experts(model)
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(input_ids=ids).logits, expected, rtol=0, atol=0)
    holders = {id(layer._context) for _, layer in lomix.mixture_layers(twin)}
    assert len(holders) == 1 and holders != {id(layer._context) for _, layer in lomix.mixture_layers(model)}
