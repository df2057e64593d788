"""LoRA-Mixer (docs/methods.md, "LoRA-Mixer"): the loramixer router's stages against naive references, the
specialization balance loss against a hand-computed example, the hard stage's expert isolation under
AdamW, serial targets on Llama and on an SSM (Mamba), and PEFT adapters as plug-and-play experts."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts
from hubdata import save_peft_adapter

import lomix
import lomix.hub
from lomix.errors import ConfigError, RoutingError, TargetModulesNotFoundError
from lomix.methods.loramixer.library import (
    freeze_experts,
    freeze_unrouted_experts,
    mixer_config,
    serial_targets,
    set_router,
    specialization_balance_loss,
)

LLAMA = MODEL_CASES["llama"]


# ------------------------------------------------------------------------------------------------
# The specialization balance loss


PROBS = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]


def _entropy(row):
    return -sum(p * math.log(p) for p in row)


@pytest.mark.parametrize("sign", ["sharpen", "flatten"])
def test_balance_loss_matches_the_hand_computed_formula(sign):
    # Two real tokens (the third is padding). Top-1: token 0 -> expert 0, token 1 -> expert 1, so
    # fbar = (1/2, 1/2, 0); pbar = (0.4, 0.4, 0.2); sum pbar * fbar = 0.2 + 0.2 = 0.4.
    probs = torch.tensor(PROBS, dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    mean_entropy = (_entropy(PROBS[0]) + _entropy(PROBS[1])) / 2  # 0.8018 and 0.8979 nats
    sign_value = 1.0 if sign == "sharpen" else -1.0
    expected = 0.5 * 0.4 + sign_value * 0.1 * mean_entropy
    got = specialization_balance_loss(probs, k=1, alpha=0.5, lam=0.1, entropy_sign=sign, mask=mask)
    assert math.isclose(float(got), expected, rel_tol=1e-12)
    # Top-2 over all three tokens: assignments 0,1 | 1,2 | 2,(0 or 1: tie) -> with the tie going to
    # the lower index, fbar = (2, 2, 2) / 6 and sum pbar * fbar = 1/3 exactly.
    got2 = specialization_balance_loss(probs, k=2, alpha=1.0, lam=0.0, entropy_sign=sign)
    assert math.isclose(float(got2), 1 / 3, rel_tol=1e-12)


@pytest.mark.parametrize(("sign", "direction"), [("sharpen", -1), ("flatten", +1)])
def test_minimising_the_entropy_term_sharpens_or_flattens_routing(sign, direction):
    torch.manual_seed(0)
    base, _ = build_pair(LLAMA)
    router = {"stage": "soft", "sbl_alpha": 0.0, "sbl_lambda": 1.0, "entropy_sign": sign}
    model = lomix.inject(base, mixer_config(base, 4, router=router)).train()
    with torch.no_grad():  # a sharp start, so that there is room both ways
        for param in _router_params(model):
            param.normal_(0, 0.5)
    inputs = LLAMA.inputs(torch.Generator().manual_seed(0))
    # the per-layer step of the summed loss: aux_loss averages over the layers
    optimizer = torch.optim.SGD(_router_params(model), lr=0.5 * len(list(lomix.mixture_layers(model))))

    def mean_entropy():
        with lomix.RoutingStats(model) as stats:
            model(**inputs)
        return sum(s["entropy"] for s in stats.summary().values()) / len(stats.summary())

    before = mean_entropy()
    for _ in range(5):
        optimizer.zero_grad()
        model(**inputs)
        lomix.aux_loss(model).backward()
        optimizer.step()
    after = mean_entropy()
    assert (after - before) * direction > 0.05, (before, after)


def _router_params(model):
    return [p for _, layer in lomix.mixture_layers(model) for p in layer.router.parameters()]


def test_the_layer_reports_the_weighted_balance_loss_over_real_tokens():
    base, _ = build_pair(LLAMA)
    router = {"stage": "soft", "k": 2, "sbl_alpha": 0.3, "sbl_lambda": 0.05, "entropy_sign": "flatten"}
    model = lomix.inject(base, mixer_config(base, 4, router=router)).train()
    randomize_experts(model)
    inputs = LLAMA.inputs(torch.Generator().manual_seed(0))
    with lomix.RoutingStats(model):
        model(**inputs)
        expected = 0.0
        mask = inputs["attention_mask"].reshape(-1).bool()
        layers = list(lomix.mixture_layers(model))
        for _, layer in layers:
            probs = layer.last_routing.probs[mask].detach().double()
            top = probs.topk(2, dim=-1).indices
            fbar = torch.stack([(top == i).double().sum() / top.numel() for i in range(4)])
            entropy = -(probs * probs.log()).sum(-1).mean()
            expected += float(0.3 * (probs.mean(0) * fbar).sum() - 0.05 * entropy) / len(layers)  # mean over layers
    assert math.isclose(float(lomix.aux_loss(model).detach()), expected, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------
# The router's stages against a naive mixture (y = W x + s * sum_e g_e B_e A_e x, looped by hand)


def _layer(stage, **router):
    torch.manual_seed(0)
    config = lomix.MixtureConfig(
        target_modules=["proj"],
        num_experts=4,
        rank=3,
        alpha=6.0,
        router=lomix.router_config("loramixer", stage=stage, **router),
        balance=lomix.BalanceConfig(switch=0.0),
    )
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(10, 6))
    lomix.inject(model, config)
    layer = model.proj
    with torch.no_grad():
        layer.experts.B.normal_(0, 0.5)
        layer.router.weight.normal_(0, 1.0)
    return model, layer


def _naive(layer, x, gates):
    """x (N, d_in), gates (N, E) dense -> W x + b + s * sum_e gates_e B_e A_e x."""
    out = layer.base_layer(x)
    for e in range(layer.experts.num_experts):
        delta = x @ layer.experts.A[e].T @ layer.experts.B[e].T
        out = out + layer.scale * gates[:, e : e + 1] * delta
    return out


def test_soft_stage_trains_with_dense_softmax_fusion_and_infers_with_sparse_top_k():
    model, layer = _layer("soft", k=3)
    x = torch.randn(2, 5, 10)
    probs = (x.reshape(-1, 10) @ layer.router.weight.T).softmax(-1)
    model.train()
    torch.testing.assert_close(model(x).reshape(-1, 6), _naive(layer, x.reshape(-1, 10), probs))
    model.eval()
    top, idx = probs.topk(3, dim=-1)
    sparse = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    assert (sparse == 0).sum(-1).eq(1).all()  # one of four experts is dropped per token
    torch.testing.assert_close(model(x).reshape(-1, 6), _naive(layer, x.reshape(-1, 10), sparse))
    set_router(model, inference="dense")
    torch.testing.assert_close(model(x).reshape(-1, 6), _naive(layer, x.reshape(-1, 10), probs))


def test_straight_through_is_sparse_forward_and_softmax_backward():
    x = torch.randn(12, 10)
    weight = torch.randn(12, 6)  # a linear loss: dL/dy does not depend on y
    st_model, st = _layer("soft", k=2, straight_through=True)
    soft_model, soft = _layer("soft", k=2)
    st_model.train()
    soft_model.train()
    out = st_model(x)
    st_model.eval()
    torch.testing.assert_close(out, st_model(x))  # the forward is the sparse top-2 of inference
    soft_out = soft_model(x)
    assert not torch.allclose(out, soft_out, atol=1e-4)
    (out * weight).sum().backward()
    (soft_out * weight).sum().backward()
    # With dL/dy fixed, the router gradient through the softmax is the dense fusion's exactly.
    torch.testing.assert_close(st.router.weight.grad, soft.router.weight.grad)


def test_hard_stage_routes_each_sequence_to_its_domain_expert():
    model, layer = _layer("hard")
    x = torch.randn(3, 4, 10)
    task_ids = torch.tensor([2, 0, 3])
    with lomix.routing_context(model, task_ids=task_ids):
        out = model(x)
    gates = torch.nn.functional.one_hot(task_ids.repeat_interleave(4), 4).float()
    torch.testing.assert_close(out.reshape(-1, 6), _naive(layer, x.reshape(-1, 10), gates))
    with pytest.raises(RoutingError, match="needs task_ids"):
        model(x)
    with pytest.raises(RoutingError, match=r"task id 4 has no expert.*4 experts"):
        with lomix.routing_context(model, task_ids=[0, 4, 1]):
            model(x)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("stage", "medium", "router.stage"), ("k", 5, "router.k"), ("sbl_alpha", -1.0, "router.sbl_alpha")],
)
def test_bad_router_fields_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        lomix.MixtureConfig(num_experts=4, router={"name": "loramixer", field: value})


# ------------------------------------------------------------------------------------------------
# The hard stage: expert j changes only on batches of domain j


def _expert_rows(model):
    return {
        (name, e): torch.cat([layer.experts.A[e].flatten(), layer.experts.B[e].flatten()]).clone()
        for name, layer in lomix.mixture_layers(model)
        for e in range(layer.experts.num_experts)
    }


@pytest.mark.parametrize("guard", [True, False])
def test_hard_stage_moves_expert_j_only_on_batches_of_domain_j(guard):
    base, _ = build_pair(LLAMA)
    model = lomix.inject(base, mixer_config(base, 3, rank=2)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if guard:
        freeze_unrouted_experts(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    schedule = [[0, 0], [1, 1], [0, 2], [2, 2], [1, 1], [0, 0]]  # the domains of each batch
    for step, domains in enumerate(schedule):
        before = _expert_rows(model)
        ids = torch.randint(0, 97, (2, 6), generator=generator)
        optimizer.zero_grad()
        out = model(input_ids=ids, labels=ids, task_ids=domains)
        out.loss.backward()
        optimizer.step()
        after = _expert_rows(model)
        for (name, e), row in after.items():
            moved = not torch.equal(row, before[(name, e)])
            if guard:
                assert moved == (e in domains), (step, name, e, domains)
            elif e in domains:
                assert moved
        if not guard and step == 1:  # AdamW's momentum and weight decay move expert 0 on a domain-1 batch
            assert any(not torch.equal(after[k], before[k]) for k in after if k[1] == 0)
    assert all(layer.router.weight.grad is None for layer in _layers(model))  # label routing: no router gradient


def _layers(model):
    return [layer for _, layer in lomix.mixture_layers(model)]


# ------------------------------------------------------------------------------------------------
# Serial targets: attention projections, or an SSM's in/out projections


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=97, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3)
    return MambaForCausalLM(config).eval()


def test_serial_targets_are_attention_projections_or_ssm_in_out_projections():
    llama, _ = build_pair(LLAMA)
    assert serial_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert serial_targets(_mamba()) == ["in_proj", "out_proj"]
    gpt2, _ = build_pair(MODEL_CASES["gpt2"])
    with pytest.raises(TargetModulesNotFoundError, match=r"its linear layers are named: .*c_attn"):
        serial_targets(gpt2)


@pytest.mark.parametrize("case", ["llama", "mamba"])
def test_hard_route_to_expert_j_equals_folding_expert_j_into_the_projections(case):
    base = _mamba() if case == "mamba" else build_pair(LLAMA)[0]
    reference = copy.deepcopy(base)
    model = lomix.inject(base, mixer_config(base, 3, rank=2, alpha=4.0)).eval()
    randomize_experts(model)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    j = 1
    with torch.no_grad():
        for name, layer in lomix.mixture_layers(model):
            reference.get_submodule(name).weight += layer.scale * layer.experts.delta_weight(j)
        expected = reference(input_ids=ids).logits
        got = model(input_ids=ids, task_ids=[j, j]).logits
        assert not torch.allclose(got, model(input_ids=ids, task_ids=[0, 0]).logits, atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    wrapped = {name.rsplit(".", 1)[-1] for name, _ in lomix.mixture_layers(model)}
    assert wrapped == ({"in_proj", "out_proj"} if case == "mamba" else {"q_proj", "k_proj", "v_proj", "o_proj"})


def test_stage_change_is_saved_and_reloaded(tmp_path):
    base, fresh = build_pair(LLAMA)
    model = lomix.inject(base, mixer_config(base, 3))
    randomize_experts(model)
    set_router(model, stage="soft", k=2, sbl_alpha=0.01)
    freeze_experts(model)
    assert not any(layer.experts.A.requires_grad for layer in _layers(model))
    assert all(layer.router.weight.requires_grad for layer in _layers(model))
    lomix.save(model, tmp_path / "m")
    loaded = lomix.load(fresh, tmp_path / "m")
    router = loaded.lomix_state.config.router
    assert (router.name, router.stage, router.k, router.sbl_alpha) == ("loramixer", "soft", 2, 0.01)
    inputs = LLAMA.inputs(torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(LLAMA.output(loaded.eval(), inputs), LLAMA.output(model.eval(), inputs))


# ------------------------------------------------------------------------------------------------
# Plug-and-play: PEFT adapters trained elsewhere as the frozen experts


PEFT_ADAPTERS = [  # different ranks and target modules
    {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "o_proj"]},
    {"r": 8, "lora_alpha": 8, "target_modules": ["v_proj", "o_proj"], "use_rslora": True},
]


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    from peft import PeftModel

    root = tmp_path_factory.mktemp("loramixer-adapters")
    base, _ = build_pair(LLAMA)
    folders = [save_peft_adapter(base, root / f"a{j}", seed=10 + j, **kw) for j, kw in enumerate(PEFT_ADAPTERS)]
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[0]), adapter_name="a0")
    for j in (1, 2):
        reference.load_adapter(str(folders[j]), adapter_name=f"a{j}")
    return base, folders, reference.eval()


@pytest.mark.parametrize("j", range(len(PEFT_ADAPTERS)))
def test_plug_and_play_routing_all_weight_to_expert_j_reproduces_peft_adapter_j(peft_adapters, j):
    base, folders, reference = peft_adapters
    router = lomix.router_config("loramixer", stage="hard")
    model = lomix.hub.load_peft_experts(copy.deepcopy(base), folders, router=router)
    inputs = LLAMA.inputs(torch.Generator().manual_seed(3))
    reference.set_adapter(f"a{j}")
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs, task_ids=[j, j]).logits
        assert not torch.allclose(expected, base(**inputs).logits, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plug_and_play_trains_only_the_routers(peft_adapters):
    base, folders, _ = peft_adapters
    router = lomix.router_config("loramixer", stage="soft", k=2, sbl_alpha=0.01, sbl_lambda=0.01)
    model = lomix.hub.load_peft_experts(copy.deepcopy(base), folders, router=router).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    experts = _expert_rows(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    routers = [layer.router.weight.clone() for layer in _layers(model)]
    out = model(input_ids=ids, labels=ids)
    (out.loss + lomix.aux_loss(model)).backward()
    optimizer.step()
    assert all(torch.equal(v, _expert_rows(model)[k]) for k, v in experts.items())
    assert any(not torch.equal(r, layer.router.weight) for r, layer in zip(routers, _layers(model), strict=True))


def test_plug_and_play_refuses_an_adapter_for_another_shape_naming_adapter_and_module(peft_adapters, tmp_path):
    base, folders, _ = peft_adapters
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97, hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )
    )  # fmt: skip
    odd = save_peft_adapter(wider, tmp_path / "wide", seed=0, r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(lomix.ShapeMismatchError, match=r"wide.*model\.layers\.0\.self_attn\.q_proj"):
        lomix.hub.load_peft_experts(copy.deepcopy(base), [folders[0], odd], router="loramixer", check_base=False)
