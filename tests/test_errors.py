"""Every bad input raises its LomixError subclass, and the message names the culprit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MODEL_CASES, build_pair

import lomix
from lomix import errors


@pytest.fixture
def saved(tmp_path):
    case = MODEL_CASES["llama"]
    model, fresh = build_pair(case)
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=4, rank=4))
    lomix.save(model, tmp_path / "mix")
    return tmp_path / "mix", fresh


def test_unknown_target_modules_are_named_with_the_available_ones():
    model, _ = build_pair(MODEL_CASES["llama"])
    with pytest.raises(errors.TargetModulesNotFoundError) as info:
        lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj", "qq_proj"]))
    message = str(info.value)
    assert "'qq_proj'" in message and "'q_proj'" not in message.split("matched")[0]
    assert "gate_proj" in message and "lm_head" in message  # the names to choose from
    assert not hasattr(model, "lomix_state")  # nothing was wrapped


def test_regex_matching_nothing_is_an_error():
    model, _ = build_pair(MODEL_CASES["llama"])
    with pytest.raises(errors.TargetModulesNotFoundError, match=r"query_proj"):
        lomix.inject(model, lomix.MixtureConfig(target_modules=r".*query_proj"))


def test_unsupported_module_type_is_named():
    model, _ = build_pair(MODEL_CASES["llama"])
    with pytest.raises(
        errors.UnsupportedModuleError, match=r"'model.embed_tokens' is a torch.nn.modules.sparse.Embedding"
    ):
        lomix.inject(model, lomix.MixtureConfig(target_modules=["embed_tokens"]))
    with pytest.raises(errors.UnsupportedModuleError, match=r"'model.layers.0.self_attn' is a"):
        lomix.inject(model, lomix.MixtureConfig(target_modules=["layers.0.self_attn"]))


def test_k_larger_than_experts_and_bad_rank():
    with pytest.raises(errors.ConfigError, match=r"router.k: must be between 1 and num_experts=4, got 5"):
        lomix.MixtureConfig(num_experts=4, router=lomix.router_config("topk", k=5))
    with pytest.raises(errors.ConfigError, match=r"rank: must be a positive integer, got 0"):
        lomix.MixtureConfig(rank=0)


def test_injecting_twice_is_refused():
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"]))
    with pytest.raises(errors.LomixError, match=r"already holds a lomix mixture"):
        lomix.inject(model, lomix.MixtureConfig(target_modules=["v_proj"]))


def test_load_onto_a_base_with_other_shapes(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory, _ = saved
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(errors.ShapeMismatchError) as info:
        lomix.load(wider, directory)
    assert "lomix_model.safetensors" in str(info.value)
    assert "model.layers.0.self_attn.q_proj.experts.A" in str(info.value) and "(4, 4, 48)" in str(info.value)
    # the failed load left the base model as it was
    assert not hasattr(wider, "lomix_state")
    assert wider.state_dict().keys() == before.keys()


def test_load_onto_a_base_with_fewer_layers(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory, _ = saved
    shallow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(errors.ArchitectureMismatchError, match=r"model.layers.1.self_attn.q_proj"):
        lomix.load(shallow, directory)
    assert not hasattr(shallow, "lomix_state")


def test_load_onto_another_architecture_names_both(saved):
    directory, _ = saved
    gpt2, _ = build_pair(MODEL_CASES["gpt2"])
    with pytest.raises(errors.ArchitectureMismatchError, match=r"'llama' model.*'gpt2' model"):
        lomix.load(gpt2, directory)


def test_corrupt_and_missing_files_are_named(saved):
    directory, fresh = saved
    weights = directory / lomix.WEIGHTS_NAME
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(errors.CorruptFileError, match=r"lomix_model.safetensors: not a readable safetensors"):
        lomix.load(fresh, directory)
    weights.unlink()
    with pytest.raises(errors.MissingFileError, match=r"lomix_model.safetensors is missing"):
        lomix.load(fresh, directory)
    (directory / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(
        errors.MissingFileError, match=r"found pytorch_model.bin, but lomix reads weights from safetensors"
    ):
        lomix.load(fresh, directory)
    (directory / lomix.CONFIG_NAME).write_text("{not json")
    with pytest.raises(errors.CorruptFileError, match=r"lomix_config.json: not valid JSON"):
        lomix.load(fresh, directory)
    (directory / lomix.CONFIG_NAME).write_text(json.dumps({"rank": -1}))
    with pytest.raises(errors.ConfigError, match=r"rank: .*lomix_config.json"):
        lomix.load(fresh, directory)
    (directory / lomix.CONFIG_NAME).unlink()
    with pytest.raises(errors.MissingFileError, match=r"lomix_config.json is missing"):
        lomix.load(fresh, directory)
    with pytest.raises(errors.MissingFileError, match=r"no such folder"):
        lomix.load(fresh, directory / "nope")
    assert not hasattr(fresh, "lomix_state")


def test_a_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    import lomix.checkpoint

    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"]))

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lomix.checkpoint, "save_file", broken_save_file)
    with pytest.raises(OSError, match=r"disk full"):
        lomix.save(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_previous_mixture(tmp_path, monkeypatch):
    import lomix.checkpoint

    case = MODEL_CASES["llama"]
    model, fresh = build_pair(case)
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=2))
    lomix.save(model, tmp_path / "mix")
    (tmp_path / "mix" / "notes.txt").write_text("mine")
    good = (tmp_path / "mix" / lomix.WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(lomix.checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        lomix.save(model, tmp_path / "mix")
    assert (tmp_path / "mix" / lomix.WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]
    monkeypatch.undo()
    lomix.save(model, tmp_path / "mix")  # a good save keeps the user's other files
    assert (tmp_path / "mix" / "notes.txt").read_text() == "mine"
    lomix.load(fresh, tmp_path / "mix")


def test_saving_a_plain_model_is_an_error(tmp_path):
    with pytest.raises(errors.LomixError, match=r"holds no lomix mixture"):
        lomix.save(torch.nn.Linear(2, 2), tmp_path / "x")
