"""Poly / MHR routers and MHR-z / MHR-mu against PEFT's poly tuner and direct statements of the math."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODEL_CASES, build_pair

import lomix
from lomix.routers import build_router
from lomix.routing import RoutingContext

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # d_out 32, 16 (grouped-query), 48, 32


def mhr_config(heads: int = 2, skills: int = 4, rank: int = 4, **router) -> lomix.MixtureConfig:
    name = "poly" if heads == 1 else "mhr"
    fields = {"n_tasks": 3, **router} if "tasks" not in router else router
    if name == "mhr":
        fields["n_heads"] = heads
    return lomix.MixtureConfig(
        target_modules=TARGETS, num_experts=skills, rank=rank, alpha=1.0, router={"name": name, **fields}
    )


def randomize(model, seed: int = 3, std: float = 0.3) -> None:
    """Non-zero B and router logits far from their tiny init, so every parameter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lomix.mixture_layers(model):
            for param in (layer.experts.B, *layer.router.parameters()):
                param.copy_(torch.randn(param.shape, generator=generator) * (std if param is layer.experts.B else 1.5))


def inputs(batch: int = 3, length: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------
# PEFT's poly tuner as the reference


def peft_pair(heads: int, skills: int = 4, rank: int = 4, tasks: int = 3):
    """(lomix model, PEFT model) on copies of one base, with PEFT's parameters copied into lomix's layout."""
    from peft import PolyConfig, get_peft_model

    case = MODEL_CASES["llama"]
    base, other = build_pair(case)
    torch.manual_seed(5)
    peft_model = get_peft_model(
        other,
        PolyConfig(
            task_type="CAUSAL_LM",
            r=rank,
            target_modules=TARGETS,
            n_tasks=tasks,
            n_skills=skills,
            n_splits=heads,
            init_weights=False,
        ),
    )
    model = lomix.inject(base, mhr_config(heads, skills, rank, n_tasks=tasks))
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if hasattr(module, "poly_lora_A")
    }
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, layer in lomix.mixture_layers(model):
            reference = peft_layers[name]
            logits = reference.poly_router["default"].module_logits
            logits.copy_(torch.randn(logits.shape, generator=generator))  # PEFT starts at U(-1e-3, 1e-3)
            peft_a, peft_b = reference.poly_lora_A["default"], reference.poly_lora_B["default"]
            d_in, d_out = layer.d_in, layer.d_out
            for q in range(heads):  # head q owns the q-th slice of d_in (A) and of d_out (B)
                cols = slice(q * d_in // heads, (q + 1) * d_in // heads)
                rows = slice(q * d_out // heads, (q + 1) * d_out // heads)
                for s in range(skills):
                    layer.experts.A[s, :, cols] = peft_a[q, s].T  # PEFT: (d_in / h, r)
                    layer.experts.B[s, rows, :] = peft_b[q, s].T  # PEFT: (r, d_out / h)
            layer.router.logits.copy_(logits.view(tasks, heads, skills))
    return model, peft_model, peft_layers


def lomix_grads(layer, heads):
    """lomix's gradients in PEFT's layouts: A (h, S, d_in/h, r), B (h, S, r, d_out/h), logits (T, h*S)."""
    skills, rank, d_in = layer.experts.A.shape
    d_out = layer.experts.B.shape[1]
    grad_a = layer.experts.A.grad.view(skills, rank, heads, d_in // heads).permute(2, 0, 3, 1)
    grad_b = layer.experts.B.grad.view(skills, heads, d_out // heads, rank).permute(1, 0, 3, 2)
    return grad_a, grad_b, layer.router.logits.grad.reshape(layer.router.num_tasks, -1)


@pytest.mark.parametrize("heads", [1, 2, 4], ids=lambda h: "poly" if h == 1 else f"mhr{h}")
def test_outputs_and_gradients_equal_peft_poly_in_eval_mode(heads):
    model, peft_model, peft_layers = peft_pair(heads)
    model.eval()
    peft_model.eval()
    batch = inputs()
    task_ids = torch.tensor([2, 0, 2])
    ours = model(**batch, task_ids=task_ids).logits
    theirs = peft_model(**batch, task_ids=task_ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    layers = [layer for _, layer in lomix.mixture_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.disabled = True
        assert (ours - model(**batch).logits).abs().max() > 1e-2, "the adapters changed nothing: a vacuous test"
        for layer in layers:
            layer.disabled = False

    weight = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    (ours * weight).sum().backward()
    (theirs * weight).sum().backward()
    for name, layer in lomix.mixture_layers(model):
        reference = peft_layers[name]
        grad_a, grad_b, grad_logits = lomix_grads(layer, heads)
        torch.testing.assert_close(grad_a, reference.poly_lora_A["default"].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_b, reference.poly_lora_B["default"].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            grad_logits, reference.poly_router["default"].module_logits.grad, rtol=1e-4, atol=1e-6
        )
        assert grad_logits[1].abs().max() == 0 and grad_logits[2].abs().max() > 0  # task 1 is not in the batch


def test_training_mode_draws_the_same_gumbel_noise_as_peft():
    """Same RNG state, same draws: lomix's relaxed-Bernoulli sampling is PEFT's, layer by layer."""
    model, peft_model, _ = peft_pair(4)
    model.train()
    peft_model.train()
    batch, task_ids = inputs(), torch.tensor([1, 0, 2])
    torch.manual_seed(11)
    ours = model(**batch, task_ids=task_ids).logits
    torch.manual_seed(11)
    theirs = peft_model(**batch, task_ids=task_ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    model.eval()
    assert (model(**batch, task_ids=task_ids).logits - ours).abs().max() > 1e-3, "training should be noisy"


# ----------------------------------------------------------------------------------------------
# The router alone


def router(heads=4, skills=5, tasks=3, **fields):
    name = "poly" if heads == 1 else "mhr"
    extra = {"n_heads": heads} if name == "mhr" else {}
    built = build_router(lomix.router_config(name, n_tasks=tasks, **extra, **fields), 16, skills)
    with torch.no_grad():
        built.logits.normal_(generator=torch.Generator().manual_seed(0))
    return built


def test_weights_are_sigmoid_normalised_per_head_and_noisy_only_in_training():
    r = router()
    x = torch.randn(4, 3, 16)
    context = RoutingContext(task_ids=torch.tensor([0, 2, 2, 1]))
    r.eval()
    weights = r(x, context).weights
    assert weights.shape == (4, 4, 5)
    z = torch.sigmoid(r.logits.detach()[[0, 2, 2, 1]])
    torch.testing.assert_close(weights, z / (z.sum(-1, keepdim=True) + 1e-12))
    r.train()
    noisy = [r(x, context).weights for _ in range(2)]
    for w in noisy:
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 4))
        assert (w >= 0).all()
    assert not torch.allclose(noisy[0], noisy[1]) and not torch.allclose(noisy[0], weights)
    plain = router(gumbel=False)
    plain.train()
    torch.testing.assert_close(plain(x, context).weights, weights)


@pytest.mark.parametrize("temperature", [0.25, 3.0])
def test_training_noise_is_the_gumbel_sigmoid_at_the_configured_temperature(temperature):
    """z = sigmoid((Z[t] + log u - log(1 - u)) / tau), u ~ U(0, 1), per head normalised (docs/methods.md),
    replayed from the same RNG state with the configured tau; tau = 1 (the default) would differ."""
    r = router(temperature=temperature).train()
    task_ids = torch.tensor([0, 2, 2, 1])
    x = torch.randn(4, 3, 16)
    torch.manual_seed(21)
    weights = r(x, RoutingContext(task_ids=task_ids)).weights
    torch.manual_seed(21)
    eps = torch.finfo(torch.float32).eps
    u = torch.rand(4, 4, 5).clamp(eps, 1 - eps)
    logits = r.logits.detach()[task_ids]

    def normalised(tau):
        z = torch.sigmoid((logits + u.log() - (-u).log1p()) / tau)
        return z / (z.sum(-1, keepdim=True) + 1e-12)

    torch.testing.assert_close(weights, normalised(temperature), rtol=1e-5, atol=1e-6)
    assert (weights - normalised(1.0)).abs().max() > 0.05, "the temperature must matter for this test to mean anything"


def test_unknown_or_missing_task_ids_are_an_error_unless_the_uniform_fallback_is_set():
    x = torch.randn(3, 2, 16)
    r = router()
    with pytest.raises(lomix.RoutingError, match=r"task id\(s\) \[3, 7\] have no routing row; it knows task ids 0..2"):
        r(x, RoutingContext(task_ids=torch.tensor([7, 0, 3])))
    with pytest.raises(lomix.RoutingError, match=r"got no task ids; pass task_ids=\.\.\."):
        r(x, RoutingContext())
    fallback = router(unknown_task="uniform")
    fallback.load_state_dict(r.state_dict())
    fallback.eval()
    r.eval()
    weights = fallback(x, RoutingContext(task_ids=torch.tensor([7, 1, -1]))).weights
    torch.testing.assert_close(weights[[0, 2]], torch.full((2, 4, 5), 0.2))
    torch.testing.assert_close(weights[1], r(x[:1], RoutingContext(task_ids=torch.tensor([1]))).weights[0])
    torch.testing.assert_close(fallback(x, RoutingContext()).weights, torch.full((3, 4, 5), 0.2))


def test_config_errors_name_the_field():
    with pytest.raises(lomix.ConfigError, match=r"router.n_tasks: is 2 but router.tasks names 3 tasks"):
        mhr_config(tasks=["a", "b", "c"], n_tasks=2)
    with pytest.raises(lomix.ConfigError, match=r"router.tasks: names a task twice: a"):
        mhr_config(heads=1, tasks=["a", "b", "a"])
    with pytest.raises(lomix.ConfigError, match=r"router.n_heads: must be >= 1"):
        lomix.MixtureConfig(router={"name": "mhr", "n_tasks": 2, "n_heads": 0})
    with pytest.raises(lomix.ConfigError, match=r"router.temperature: must be > 0"):
        mhr_config(temperature=0.0)
    with pytest.raises(lomix.ConfigError, match=r"router.n_tasks: poly needs one routing row per task"):
        build_router(lomix.router_config("poly"), 8, 2)
    with pytest.raises(lomix.ConfigError, match=r"router.n_heads: unknown key"):
        lomix.router_config("poly", n_tasks=2, n_heads=2)  # poly has one head; MHR is the multi-head router


def test_heads_must_divide_every_layer_and_the_error_names_it():
    model, _ = build_pair(MODEL_CASES["llama"])
    config = mhr_config(heads=32)
    config.target_modules = ["q_proj", "k_proj"]
    with pytest.raises(
        lomix.ConfigError,
        match=r"router.n_heads: 32 heads do not divide layer model.layers.0.self_attn.k_proj \(d_in=32, d_out=16\)",
    ):
        lomix.inject(model, config)
    assert not list(lomix.mixture_layers(model)), "a failed inject left wrapped layers behind"
    assert getattr(model, "lomix_state", None) is None


def test_experts_start_like_peft_per_head_and_the_router_near_uniform():
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config(heads=4))
    for _, layer in lomix.mixture_layers(model):
        bound = 1 / (layer.d_in / 4) ** 0.5  # kaiming-uniform(a=sqrt(5)) over a head's fan-in d_in / h
        a = layer.experts.A.detach()
        assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
        assert layer.experts.B.abs().max() == 0
        assert layer.router.logits.abs().max() <= 1e-3


def test_routers_get_their_own_learning_rate_by_default():
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config())
    groups = {g["name"]: g["lr"] for g in lomix.parameter_groups(model, 1e-3)}
    assert groups == {"experts": 1e-3, "routers": 0.1}
    assert {g["name"]: g["lr"] for g in lomix.parameter_groups(model, 1e-3, router_lr=0.5)}["routers"] == 0.5
    topk, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(topk, lomix.MixtureConfig(target_modules=TARGETS))
    assert {g["name"]: g["lr"] for g in lomix.parameter_groups(topk, 1e-3)}["routers"] == 1e-3


# ----------------------------------------------------------------------------------------------
# Task ids through the model: batches, generation, save/load


def test_each_sequence_uses_its_own_task_row():
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config())
    assert not any(layer.training for _, layer in lomix.mixture_layers(model))  # new layers follow eval mode
    randomize(model)
    batch, task_ids = inputs(), torch.tensor([2, 0, 1])
    together = model(**batch, task_ids=task_ids).logits
    for row in range(3):
        alone = model(**{k: v[row : row + 1] for k, v in batch.items()}, task_ids=task_ids[row : row + 1]).logits
        torch.testing.assert_close(alone[0], together[row], rtol=1e-5, atol=1e-5)
    swapped = model(**batch, task_ids=torch.tensor([0, 0, 1])).logits
    assert (swapped[0] - together[0]).abs().max() > 1e-3 and torch.allclose(swapped[1:], together[1:])


@pytest.mark.parametrize("mode", ["beams", "return_sequences"])
def test_batched_generation_follows_the_expanded_batch(mode):
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config())
    randomize(model, std=1.0)
    prompts = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    options = {"num_beams": 2} if mode == "beams" else {"num_beams": 3, "num_return_sequences": 2}
    options.update(max_new_tokens=6, do_sample=False, pad_token_id=0)

    def generate(ids, tasks):
        with lomix.routing_context(model, task_ids=tasks):
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)

    together = generate(prompts, [2, 0])
    per = together.shape[0] // 2
    for row, task in enumerate([2, 0]):
        alone = generate(prompts[row : row + 1], [task])
        assert torch.equal(together[row * per : (row + 1) * per], alone)
    # the task really steers generation here, so a wrong expansion would show
    assert not torch.equal(generate(prompts, [0, 2]), together)


def test_a_saved_mixture_keeps_its_task_names_and_routes_them_to_the_same_rows(tmp_path):
    model, fresh = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config(tasks=["navigate", "date", "hex"]))
    randomize(model)
    batch = inputs()
    ids = lomix.mhr.task_ids(model, ["hex", "navigate", "hex"])
    assert ids == [2, 0, 2]
    expected = model(**batch, task_ids=ids).logits
    lomix.save(model, tmp_path)
    saved = json.loads((tmp_path / lomix.CONFIG_NAME).read_text())["router"]
    assert saved["name"] == "mhr" and saved["tasks"] == ["navigate", "date", "hex"] and saved["n_heads"] == 2
    loaded = lomix.load(fresh, tmp_path)
    assert lomix.mhr.task_ids(loaded, ["hex", "navigate", "hex"]) == ids
    torch.testing.assert_close(loaded(**batch, task_ids=ids).logits, expected)
    with pytest.raises(lomix.RoutingError, match=r"no routing row for task 'sports'; its tasks: navigate, date, hex"):
        lomix.mhr.task_ids(loaded, ["sports"])


# ----------------------------------------------------------------------------------------------
# MHR-z and MHR-mu


def test_add_tasks_appends_fresh_rows_and_keeps_the_old_ones(tmp_path):
    model, fresh = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config(tasks=["a", "b"]))
    randomize(model)
    old = {name: layer.router.logits.detach().clone() for name, layer in lomix.mixture_layers(model)}
    assert lomix.add_tasks(model, ["c", "a", "d"]) == [2, 0, 3]
    assert model.lomix_state.config.router.tasks == ["a", "b", "c", "d"]
    for name, layer in lomix.mixture_layers(model):
        assert layer.router.logits.shape == (4, 2, 4)
        assert torch.equal(layer.router.logits[:2], old[name])
        assert layer.router.logits[2:].abs().max() <= 1e-3
    batch = inputs()
    expected = model(**batch, task_ids=[3, 0, 1]).logits
    lomix.save(model, tmp_path)
    torch.testing.assert_close(lomix.load(fresh, tmp_path)(**batch, task_ids=[3, 0, 1]).logits, expected)
    topk, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(topk, lomix.MixtureConfig(target_modules=TARGETS))
    with pytest.raises(lomix.ConfigError, match="add_tasks needs a task router"):
        lomix.add_tasks(topk, ["a"])


def test_mhr_z_trains_only_the_new_task_rows():
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config(tasks=["a", "b"]))
    randomize(model)
    new = lomix.add_tasks(model, ["c"])
    lomix.train_only_task_rows(model, new)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("router.logits") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(lomix.parameter_groups(model, 1e-3))
    model.train()
    batch = inputs()
    # the batch also holds the old tasks: their rows get gradients that must not be applied
    out = model(**batch, task_ids=[2, 0, 1]).logits
    out.pow(2).mean().backward()
    optimizer.step()
    changed = 0
    for name, param in model.named_parameters():
        if name.endswith("router.logits"):
            assert torch.equal(param[:2], before[name][:2]), name
            changed += not torch.equal(param[2], before[name][2])
        else:
            assert torch.equal(param, before[name]), name
    assert changed == len(list(lomix.mixture_layers(model)))


def test_mhr_mu_is_the_mean_of_the_skills_as_one_lora():
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, mhr_config(heads=4, skills=3))
    randomize(model)
    skills = {
        name: (layer.experts.A.detach().clone(), layer.experts.B.detach().clone())
        for name, layer in lomix.mixture_layers(model)
    }
    batch = inputs()
    assert not torch.allclose(model(**batch, task_ids=[0, 1, 2]).logits, model(**batch, task_ids=[1, 2, 0]).logits)
    # reference: the same mixture with all routing logits equal, i.e. w = 1/S in every head and task
    with torch.no_grad():
        for _, layer in lomix.mixture_layers(model):
            layer.router.logits.zero_()
    expected = model(**batch, task_ids=[0, 1, 2]).logits

    lomix.average_skills(model)
    assert model.lomix_state.config.num_experts == 1 and model.lomix_state.config.router.name == "fixed"
    for name, layer in lomix.mixture_layers(model):
        a, b = skills[name]
        mean_a = sum(a[s] for s in range(3)) / 3
        mean_b = sum(b[s] for s in range(3)) / 3
        torch.testing.assert_close(layer.experts.A[0], mean_a)
        torch.testing.assert_close(layer.experts.B[0], mean_b)
        x = torch.randn(2, 5, layer.d_in)
        naive = layer.base_layer(x) + layer.scale * x @ mean_a.T @ mean_b.T
        torch.testing.assert_close(layer(x), naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".experts." in n for n in trainable)
