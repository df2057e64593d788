"""Arrow routing (`lomix.routers.arrow`) against independent references: the top right-singular
vector from `torch.linalg.svd` of the product B A, a per-token loop of the paper's rule, and PEFT's
own Arrow (`peft.create_arrow_model`) over the same PEFT adapters; on a GLIDER library and on PEFT
adapters loaded as experts."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_CASES, build_pair
from test_glider import DESCRIPTIONS, trained_expert

import lomix
import lomix.hub
from lomix.library import Library, load_library
from lomix.routers.arrow import top_right_singular_vectors


def reference_prototype(delta: torch.Tensor) -> torch.Tensor:
    """(d_out, d_in) -> (d_in,) the top right-singular vector of the full matrix, by torch.linalg.svd."""
    return torch.linalg.svd(delta.double(), full_matrices=False).Vh[0]


def assert_same_direction(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to sign (a singular vector's sign is arbitrary)."""
    sign = torch.sign(got.double() @ expected.double())
    torch.testing.assert_close(got.double() * sign, expected.double(), rtol=0, atol=1e-5)


def reference_route(x: torch.Tensor, prototypes: torch.Tensor, k: int, temperature: float):
    """Per token: [(expert, gate)] of the k largest |<v_e, x>|, gates = softmax(score / T) over them."""
    routes = []
    for token in x.double():
        scores = [abs(float(v.double() @ token)) for v in prototypes]
        kept = sorted(range(len(scores)), key=lambda e: -scores[e])[:k]
        weights = torch.tensor([scores[e] / temperature for e in kept]).softmax(0)
        routes.append(dict(zip(kept, weights.tolist(), strict=True)))
    return routes


def arrow_layer(experts=4, rank=3, d_in=12, d_out=10, k=2, temperature=0.7, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out)
    config = lomix.MixtureConfig(num_experts=experts, rank=rank, alpha=rank,
                                 router=lomix.router_config("arrow", k=k, temperature=temperature))  # fmt: skip
    layer = lomix.MixtureLinear(base, config)
    with torch.no_grad():
        layer.experts.B.normal_()
        layer.experts.A[1, 2:] = 0  # a rank-2 expert padded to rank 3
        layer.experts.B[1, :, 2:] = 0
        layer.experts.B[3] = 0  # an expert that does not adapt this module
    return layer


def test_prototypes_are_the_top_right_singular_vectors_of_b_a():
    layer = arrow_layer()
    got = layer.router.prototypes()
    for e in range(3):
        assert_same_direction(got[e], reference_prototype(layer.experts.delta_weight(e).detach()))
    assert torch.equal(got[3], torch.zeros(12))  # a zero expert has no direction: score 0
    # the helper alone, on a batch of random products
    A, B = torch.randn(5, 4, 20), torch.randn(5, 7, 4)
    for e, vector in enumerate(top_right_singular_vectors(A, B)):
        assert_same_direction(vector, reference_prototype(B[e] @ A[e]))


def test_scores_selections_gates_and_output_equal_the_per_token_rule():
    layer = arrow_layer(k=2, temperature=0.7)
    x = torch.randn(2, 5, 12)
    prototypes = torch.stack([reference_prototype(layer.experts.delta_weight(e).detach()) for e in range(3)]
                             + [torch.zeros(12, dtype=torch.float64)])  # fmt: skip
    routes = reference_route(x.reshape(-1, 12), prototypes, k=2, temperature=0.7)
    routing = layer.router(x, lomix.RoutingContext())
    torch.testing.assert_close(routing.logits.double(), (x.reshape(-1, 12).double() @ prototypes.T).abs() / 0.7,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    for t, route in enumerate(routes):
        got = dict(zip(routing.indices[t].tolist(), routing.gates[t].tolist(), strict=True))
        assert sorted(got) == sorted(route)
        assert all(abs(got[e] - g) < 1e-5 for e, g in route.items())
    with torch.no_grad():
        out = layer(x).reshape(-1, 10).double()
    for t, token in enumerate(x.reshape(-1, 12)):
        expected = layer.base_layer(token).double()
        for e, g in routes[t].items():
            expected += g * (layer.experts.delta_weight(e) @ token).double().detach()
        torch.testing.assert_close(out[t], expected, rtol=0, atol=1e-5)


def test_prototypes_follow_every_change_of_the_experts():
    layer = arrow_layer()
    first = layer.router.prototypes()
    assert layer.router.prototypes() is first  # cached while the experts stay as they are
    with torch.no_grad():
        layer.experts.B[0] = torch.randn(10, 3)
    moved = layer.router.prototypes()
    assert_same_direction(moved[0], reference_prototype(layer.experts.delta_weight(0).detach()))
    assert not torch.allclose(moved[0].abs(), first[0].abs())


def test_config_errors_name_the_field():
    with pytest.raises(lomix.ConfigError, match=r"router\.k"):
        lomix.MixtureConfig(num_experts=2, router=lomix.router_config("arrow", k=3))
    with pytest.raises(lomix.ConfigError, match=r"router\.temperature"):
        lomix.router_config("arrow", temperature=0.0).validate(4)


# ----------------------------------------------------------------------------------------------
# PEFT's Arrow on the same adapters

SPECTRUM = torch.tensor([3.0, 1.0, 0.5, 0.25])  # a clear gap: PEFT's 15 power iterations converge


def save_spectral_adapter(base: torch.nn.Module, folder, seed: int):
    """A PEFT LoRA (r=4, q/v) whose B A per module has the singular values SPECTRUM, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                rows = torch.linalg.qr(torch.randn(A.shape[1], 4, generator=generator)).Q.T  # (4, d_in)
                cols = torch.linalg.qr(torch.randn(B.shape[0], 4, generator=generator)).Q  # (d_out, 4)
                A.copy_(rows)
                B.copy_(cols * SPECTRUM)
    peft_model.save_pretrained(str(folder))
    return str(folder)


def test_arrow_equals_peft_arrow_on_the_same_adapters(tmp_path):
    from peft import ArrowConfig, create_arrow_model

    base, _ = build_pair(MODEL_CASES["llama"])
    folders = [save_spectral_adapter(base, tmp_path / f"a{j}", seed=j) for j in range(4)]
    router = lomix.router_config("arrow", k=2, temperature=0.5)
    ours = lomix.hub.load_peft_experts(copy.deepcopy(base), folders, router=router).eval()
    theirs = create_arrow_model(copy.deepcopy(base), folders, ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=0))
    theirs.eval()

    inputs = MODEL_CASES["llama"].inputs(torch.Generator().manual_seed(3))
    seen: dict[str, torch.Tensor] = {}
    layers = dict(lomix.mixture_layers(ours))
    handles = [layer.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].detach()))
               for name, layer in layers.items()]  # fmt: skip
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(**inputs).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # the whole model, end to end

    assert len(layers) == 4  # q and v of 2 layers
    for name, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(name).lora_arrow["arrow_router"]
        protos = peft_layer.prototypes
        for e in range(4):
            assert_same_direction(layer.router.prototypes()[e], protos[e].double())
        tok = seen[name].reshape(-1, layer.d_in)
        sim = (tok @ protos.T).abs()  # PEFT's scores and selection, as its forward computes them
        top_v, idx = sim.topk(2, dim=1)
        coeff = torch.full_like(sim, float("-inf")).scatter(1, idx, top_v).div(0.5).softmax(1)
        routing = layer.router(seen[name], lomix.RoutingContext())
        torch.testing.assert_close(routing.logits * 0.5, sim, rtol=1e-5, atol=1e-6)
        assert torch.equal(routing.indices.sort(1).values, idx.sort(1).values)
        torch.testing.assert_close(routing.probs, coeff, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# A GLIDER expert library routed by Arrow


def test_arrow_routes_a_glider_library_by_its_experts_weights(tmp_path):
    library = Library.open(tmp_path / "lib", create=True)
    experts = {"dates": (["q_proj", "v_proj"], 4, 8.0), "colors": (["q_proj"], 2, 2.0), "sports": (["v_proj"], 4, 4.0)}
    singles = {}
    for seed, (name, (targets, rank, alpha)) in enumerate(experts.items()):
        singles[name] = trained_expert(seed + 1, targets, rank, alpha)
        library.add(singles[name], name, DESCRIPTIONS[seed])
    torch.manual_seed(0)
    model = load_library(MODEL_CASES["llama"].build().eval(), library, router=lomix.router_config("arrow", k=2))
    assert model.lomix_state.config.router.name == "arrow"
    assert not any(p.requires_grad for p in model.parameters())
    names = list(experts)
    for name, layer in lomix.mixture_layers(model):
        deltas = []
        for e in names:
            single = dict(lomix.mixture_layers(singles[e])).get(name)
            deltas.append(None if single is None else single.scale * single.experts.delta_weight(0).detach())
        prototypes = layer.router.prototypes()
        for e, delta in enumerate(deltas):
            if delta is None:  # the expert does not adapt this module: a zero expert, score 0
                assert torch.equal(prototypes[e], torch.zeros(layer.d_in))
            else:
                assert_same_direction(prototypes[e], reference_prototype(delta))
        x = torch.randn(5, layer.d_in)
        reference = torch.stack([torch.zeros(layer.d_in, dtype=torch.float64) if d is None else reference_prototype(d)
                                 for d in deltas])  # fmt: skip
        with torch.no_grad():
            got = layer(x[None])[0].double()
        for t, route in enumerate(reference_route(x, reference, k=2, temperature=1.0)):
            expected = layer.base_layer(x[t]).double()
            for e, g in route.items():
                if deltas[e] is not None:
                    expected += g * (deltas[e] @ x[t]).double()
            torch.testing.assert_close(got[t], expected, rtol=0, atol=1e-4)
