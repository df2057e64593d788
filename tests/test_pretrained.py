"""PEFT's model methods on an injected model: save_pretrained / lomix.from_pretrained, disable_adapter,
print_trainable_parameters (lomix.pretrained)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_pair, randomize_experts
from tiny_assets import make_model_dir

import lomix

CONFIG = lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=4, rank=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("pretrained") / "model")


def _mixture_from(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = lomix.inject(AutoModelForCausalLM.from_pretrained(str(base_dir)).eval(), CONFIG)
    randomize_experts(model)
    return model, AutoTokenizer.from_pretrained(str(base_dir))


def test_save_pretrained_writes_a_mixture_that_from_pretrained_reads_back(base_dir, tmp_path):
    model, tokenizer = _mixture_from(base_dir)
    ids = torch.tensor([tokenizer.encode("repeat apple river")])
    expected = model(input_ids=ids).logits
    out = model.save_pretrained(tmp_path / "out", tokenizer=tokenizer)
    names = {p.name for p in out.iterdir()}
    assert {lomix.CONFIG_NAME, lomix.WEIGHTS_NAME, "tokenizer_config.json"} <= names
    assert not names & {"config.json", "model.safetensors"}  # nothing transformers would take for a full model
    # the mixture only: no tensor of the base model
    weights, _ = lomix.checkpoint.read_weights(out)
    assert all(".experts." in key or ".router." in key for key in weights)

    loaded = lomix.from_pretrained(out)  # the base named in the metadata (the model folder)
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert loaded.lomix_state.tokenizer.encode("repeat apple river") == ids[0].tolist()
    # ... and it saves its tokenizer again unasked
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer_config.json").is_file()


def test_transformers_refuses_a_mixture_folder(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _mixture_from(base_dir)
    model.save_pretrained(tmp_path / "out", tokenizer=tokenizer)
    # transformers 5.24 says "Unrecognized model in OUT. Should have a `model_type` key in its config.json"
    # (a folder with no config.json at all); older versions raise OSError naming config.json
    with pytest.raises((OSError, ValueError), match=r"config\.json"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_from_pretrained_without_a_named_base_says_what_to_pass(llama_case, tmp_path):
    model, _ = build_pair(llama_case)
    lomix.inject(model, CONFIG).save_pretrained(tmp_path / "out")  # a config-built model has no name
    with pytest.raises(lomix.MissingFileError, match=r"pass base_model="):
        lomix.from_pretrained(tmp_path / "out")
    with pytest.raises(lomix.MissingFileError, match=r"lomix_config\.json"):
        lomix.from_pretrained(tmp_path / "nowhere")


def test_save_pretrained_takes_the_mixture_from_a_given_state_dict(llama_case, tmp_path):
    model, base = build_pair(llama_case)
    lomix.inject(model, CONFIG)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("experts.B"))
    state[key] = torch.full_like(state[key], 0.5)  # as if gathered from sharded processes
    model.save_pretrained(tmp_path / "out", state_dict=state)
    loaded = lomix.load(base, tmp_path / "out")
    assert torch.equal(loaded.get_submodule(key.rsplit(".", 1)[0]).B, state[key])
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()


def test_disable_adapter_gives_the_untouched_base(llama_case):
    model, base = build_pair(llama_case)
    inputs = llama_case.inputs(torch.Generator().manual_seed(0))
    base_logits = base(**inputs).logits
    lomix.inject(model, CONFIG)
    randomize_experts(model)
    mixture_logits = model(**inputs).logits
    assert not torch.allclose(mixture_logits, base_logits)
    with model.disable_adapter():
        assert torch.equal(model(**inputs).logits, base_logits)
    assert torch.equal(model(**inputs).logits, mixture_logits)
    with pytest.raises(RuntimeError), model.disable_adapter():
        raise RuntimeError("the mixture comes back after an error too")
    assert torch.equal(model(**inputs).logits, mixture_logits)


def test_print_trainable_parameters_counts_experts_and_routers(llama_case, capsys):
    model, base = build_pair(llama_case)
    lomix.inject(model, CONFIG)
    # by hand: the tiny Llama (hidden 32, 4 heads of 8, 2 key-value heads), 2 layers, q_proj 32 -> 32
    # and v_proj 32 -> 16; per layer E experts A (r, d_in), B (d_out, r) and a router weight (E, d_in)
    experts, rank = 4, 2
    per_layer = {(32, 32), (32, 16)}
    trainable = 2 * sum(experts * rank * (d_in + d_out) + experts * d_in for d_in, d_out in per_layer)
    total = sum(p.numel() for p in base.parameters()) + trainable
    assert model.get_nb_trainable_parameters() == (trainable, total)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}\n"
    )


def test_eject_takes_the_methods_away(llama_case):
    model, _ = build_pair(llama_case)
    lomix.inject(model, CONFIG)
    assert model.save_pretrained.__func__ is lomix.pretrained.save_pretrained
    lomix.eject(model)
    assert model.save_pretrained.__func__ is type(model).save_pretrained
    assert not hasattr(model, "disable_adapter")
