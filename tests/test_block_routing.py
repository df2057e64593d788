"""routing_scope: block — one router per feed-forward block, each expert a whole LoRA'd feed-forward
(MixLoRA), checked against a hand-written reference of that definition."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts
from torch.nn import functional as F

import lomix
from lomix.block_routing import block_routers
from lomix.errors import ConfigError, RoutingError

FFN = ["gate_proj", "up_proj", "down_proj"]
FIXED = {"name": "fixed", "experts": [0], "weights": [1.0]}


def block_config(**overrides) -> lomix.MixtureConfig:
    fields = {
        "target_modules": ["q_proj", "v_proj", *FFN],
        "num_experts": 4,
        "rank": 2,
        "routing_scope": "block",
        "router": {"name": "topk", "k": 2},
        "layer_router": FIXED,
    }
    return lomix.MixtureConfig(**{**fields, **overrides})


def block_model(seed: int = 0, **overrides):
    model, base = build_pair(MODEL_CASES["llama"], seed)
    lomix.inject(model, block_config(**overrides))
    randomize_experts(model, seed=seed + 1)
    return model, base


def _inputs(seed: int = 0):
    return MODEL_CASES["llama"].inputs(torch.Generator().manual_seed(seed))


def expert_weight(layer, expert: int) -> torch.Tensor:
    """W + s B_e A_e, (d_out, d_in), in float64."""
    A, B = layer.experts.A[expert].double(), layer.experts.B[expert].double()
    return layer.base_layer.weight.double() + layer.scale * B @ A


def reference_ffn(mlp, x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """sum_j g_j down_e(act(gate_e x) * up_e x), one token at a time, from the router's own weight:
    p = softmax(W_r x), top-k, gates renormalised."""
    router = mlp.gate_proj.router.weight.double()
    flat = x.reshape(-1, x.shape[-1]).double()
    rows = []
    for token in flat:
        probs = (router @ token).softmax(-1)
        top = probs.topk(k)
        gates = top.values / top.values.sum()
        out = torch.zeros(mlp.down_proj.d_out, dtype=torch.float64)
        for gate, expert in zip(gates, top.indices.tolist(), strict=True):
            hidden = F.silu(expert_weight(mlp.gate_proj, expert) @ token) * (expert_weight(mlp.up_proj, expert) @ token)
            out += gate * (expert_weight(mlp.down_proj, expert) @ hidden)
        rows.append(out)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def test_a_block_equals_the_hand_written_mixture_of_whole_lora_feed_forwards():
    model, _ = block_model()
    inputs, outputs = {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        # the feed-forward's input is the post-attention norm's output (its own hooks see k copies)
        handles.append(
            layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: inputs.update({i: out}))
        )
        handles.append(layer.mlp.register_forward_hook(lambda m, a, out, i=i: outputs.update({i: out})))
    with torch.no_grad():
        model(**_inputs())
    for handle in handles:
        handle.remove()
    assert sorted(outputs) == [0, 1]
    for i, layer in enumerate(model.model.layers):
        assert outputs[i].shape == inputs[i].shape  # the slot dimension is gone after the block
        expected = reference_ffn(layer.mlp, inputs[i])
        torch.testing.assert_close(outputs[i].double(), expected, rtol=1e-5, atol=1e-6)


def test_one_router_per_block_is_saved_and_the_attention_layers_keep_their_own():
    model, _ = block_model()
    state = lomix.checkpoint.mixture_state_dict(model)
    routers = sorted(key for key in state if ".mlp." in key and ".router." in key)
    assert routers == [f"model.layers.{i}.mlp.gate_proj.router.weight" for i in range(2)]
    shared = block_routers(model)
    assert sorted(shared) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.router is mlp.gate_proj.router is mlp.down_proj.router
    assert model.model.layers[0].self_attn.q_proj.router.name == "fixed"
    params = list(lomix.mixture_parameters(model))
    assert len(params) == len({id(p) for p in params})  # a shared router is one optimizer entry


def test_attention_targets_need_a_layer_router():
    model, _ = build_pair(MODEL_CASES["llama"])
    with pytest.raises(ConfigError, match="layer_router"):
        lomix.inject(model, block_config(layer_router=None))
    assert not any(True for _ in lomix.mixture_layers(model))  # nothing was swapped in
    with pytest.raises(ConfigError, match="routing_scope"):
        block_config(routing_scope="model")


def test_the_fixed_attention_lora_is_an_ordinary_lora():
    model, _ = block_model()
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.d_in)
    with torch.no_grad():
        expected = x.double() @ expert_weight(q, 0).T
        torch.testing.assert_close(q(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_save_and_load_give_the_same_block_routed_model(tmp_path):
    model, base = block_model()
    lomix.save(model, tmp_path / "mixture")
    loaded = lomix.load(base, tmp_path / "mixture")
    assert loaded.lomix_state.config.routing_scope == "block"
    assert loaded.lomix_state.config.layer_router.name == "fixed"
    inputs = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_the_triton_kernel_computes_the_same_block_routed_model():
    outs = []
    for kernel in ("torch", "triton"):
        model, _ = block_model(kernel=kernel)
        outs.append(model(**_inputs()).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_training_reaches_every_projection_and_counts_each_block_balance_loss_once():
    model, _ = block_model()
    model.train()
    loss = model(**_inputs()).logits.square().mean()
    aux = lomix.aux_loss(model)
    reporting = [name for name, layer in lomix.mixture_layers(model) if layer.aux_losses]
    assert reporting == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    (loss + aux).backward()
    for name, layer in lomix.mixture_layers(model):
        if ".mlp." in name:
            assert layer.experts.B.grad.abs().sum() > 0, name
    assert model.model.layers[0].mlp.gate_proj.router.weight.grad.abs().sum() > 0
    # the balance loss is the Switch loss of the router's own decision, one per block, averaged
    expected = []
    for layer in model.model.layers:
        routing = layer.mlp.gate_proj.aux_losses["switch"]
        expected.append(routing)
    torch.testing.assert_close(aux, sum(expected) / 2)


def test_disabled_runs_the_base_and_a_projection_outside_its_block_is_refused():
    model, base = block_model()
    inputs = _inputs()
    with torch.no_grad(), lomix.disabled(model):
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)
    with pytest.raises(RoutingError, match="outside a call of its block"):
        model.model.layers[0].mlp.down_proj(torch.randn(2, 48))


def test_eject_restores_the_base_model():
    model, base = block_model()
    lomix.eject(model)
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)


def test_update_router_changes_the_block_routers_only():
    model, _ = block_model()
    lomix.update_router(model, k=3)
    mlp, attention = model.model.layers[0].mlp, model.model.layers[0].self_attn
    assert mlp.gate_proj.router.config.k == 3 and attention.q_proj.router.config.name == "fixed"
    assert model.lomix_state.config.router.k == 3
    x = torch.randn(1, 5, mlp.gate_proj.d_in)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x).double(), reference_ffn(mlp, x, k=3), rtol=1e-5, atol=1e-6)


def test_the_projections_reading_the_block_input_run_their_frozen_gemm_once_per_token():
    # gate and up read k stride-0 copies of each token: their base GEMM sees each token once, down
    # (whose input differs per slot) sees every slot; the block still equals its reference.
    model, _ = block_model()
    rows = {}
    mlp = model.model.layers[0].mlp
    handles = [
        getattr(mlp, name).base_layer.register_forward_hook(
            lambda m, args, out, name=name: rows.update({name: args[0].numel() // args[0].shape[-1]})
        )
        for name in FFN
    ]
    inputs = {}
    handles.append(
        model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda m, a, out: inputs.update(x=out))
    )
    outputs = {}
    handles.append(mlp.register_forward_hook(lambda m, a, out: outputs.update(y=out)))
    model.train()
    model(**_inputs()).logits.sum().backward()
    for handle in handles:
        handle.remove()
    tokens = inputs["x"].numel() // inputs["x"].shape[-1]
    assert rows == {"gate_proj": tokens, "up_proj": tokens, "down_proj": 2 * tokens}
    torch.testing.assert_close(
        outputs["y"].detach().double(), reference_ffn(mlp, inputs["x"].detach()), rtol=1e-5, atol=1e-6
    )
    assert mlp.gate_proj.experts.A.grad.abs().sum() > 0 and mlp.gate_proj.router.weight.grad.abs().sum() > 0


def test_merging_a_block_routed_mixture_is_refused_with_the_reason():
    from lomix.merge import MergeOptions, merge_mixture

    model, _ = block_model()
    with lomix.RoutingStats(model) as stats, torch.no_grad():
        model(**_inputs())
    with pytest.raises(lomix.LomixError, match=r"routing_scope is 'block'.*whole feed-forward"):
        merge_mixture(model, stats, MergeOptions(experts=2))
