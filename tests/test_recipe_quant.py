"""The recipes over a quantized base: config fields, BitsAndBytesConfig, 8-bit optimizers, and a tiny
config-built Llama that loads in 4 and 8 bits, trains, saves, reloads and gives the same logits."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_jsonl

import lomix
from lomix.errors import ConfigError
from lomix.quant import dequantized_weight, quantized_linears
from lomix.recipes import finetune, quantization
from lomix.recipes.assets import load_model_and_tokenizer
from lomix.recipes.config import ModelConfig, TrainConfig, build_config, load_config

bnb = pytest.importorskip("bitsandbytes")

CONFIGS = Path(finetune.__file__).resolve().parent / "configs"


def minimal(**model) -> dict:
    return {"model": {"name_or_path": "/nonexistent/model", **model}, "data": {"train": "train.jsonl"}}


# ----------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(load_in_4bit=True, load_in_8bit=True), r"model.load_in_8bit: cannot be combined with model.load_in"),
        (minimal(bnb_4bit_quant_type="int4"), r"model.bnb_4bit_quant_type: expected one of 'nf4', 'fp4', got 'int4'"),
        (minimal(bnb_4bit_compute_dtype="float8"), r"model.bnb_4bit_compute_dtype: expected one of 'float32'"),
        (minimal(load_in_4bit="yes"), r"model.load_in_4bit: expected true or false, got 'yes'"),
        (minimal(llm_int8_threshold=-1), r"model.llm_int8_threshold: must be >= 0, got -1"),
        ({**minimal(), "train": {"optimizer": "sgd"}}, r"train.optimizer: expected one of 'adamw', 'adamw8bit'"),
    ],
)
def test_bad_quantization_fields_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_model_fields_map_onto_bitsandbytes_config():
    from transformers import BitsAndBytesConfig

    assert quantization.bnb_config(ModelConfig(name_or_path="m")) is None
    four = quantization.bnb_config(
        ModelConfig(
            name_or_path="m", dtype="bfloat16", load_in_4bit=True, bnb_4bit_quant_type="fp4",
            bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["lm_head", "router"],
        )
    )  # fmt: skip
    assert isinstance(four, BitsAndBytesConfig) and four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "fp4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16  # null compute dtype: model.dtype
    assert four.llm_int8_skip_modules == ["lm_head", "router"]
    explicit = ModelConfig(name_or_path="m", load_in_4bit=True, bnb_4bit_compute_dtype="float16")
    assert quantization.bnb_config(explicit).bnb_4bit_compute_dtype == torch.float16
    eight = quantization.bnb_config(ModelConfig(name_or_path="m", load_in_8bit=True, llm_int8_threshold=4.0))
    assert eight.load_in_8bit and not eight.load_in_4bit and eight.llm_int8_threshold == 4.0


def test_a_missing_bitsandbytes_is_named_with_the_field_that_needs_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ConfigError, match=r"model.load_in_4bit: True needs bitsandbytes, which is not installed"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path), load_in_4bit=True))
    with pytest.raises(ConfigError, match=r"model.load_in_8bit: .*pip install bitsandbytes"):
        quantization.check(ModelConfig(name_or_path="m", load_in_8bit=True))
    with pytest.raises(ConfigError, match=r"train.optimizer: 'paged_adamw8bit' needs bitsandbytes"):
        quantization.check(ModelConfig(name_or_path="m"), TrainConfig(optimizer="paged_adamw8bit"))
    quantization.check(ModelConfig(name_or_path="m"), TrainConfig())  # nothing asks for it: fine
    assert isinstance(quantization.build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]}], TrainConfig()),
                      torch.optim.AdamW)  # fmt: skip


def test_quickstart_4bit_is_the_quickstart_with_a_qlora_base():
    plain = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    four = yaml.safe_load((CONFIGS / "quickstart_4bit.yaml").read_text())
    added = {k: v for k, v in four["model"].items() if k not in plain["model"]}
    assert added == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32",
    }  # fmt: skip
    assert {**four, "model": plain["model"], "output_dir": plain["output_dir"]} == plain
    cfg = load_config(CONFIGS / "quickstart_4bit.yaml")
    assert cfg.model.quantized and cfg.model.load_in_4bit and not cfg.model.load_in_8bit
    assert cfg.output_dir != load_config(CONFIGS / "quickstart.yaml").output_dir


# ----------------------------------------------------------------------------------------------
# Optimizers


def test_eight_bit_optimizers_follow_adamw_with_their_groups():
    """Same groups (lr, weight decay), same three gradients: 32-bit states give torch AdamW's update,
    8-bit states (tensors of >= 4096 values) a close one."""
    generator = torch.Generator().manual_seed(0)
    big, small = torch.randn(64, 128, generator=generator), torch.randn(8, generator=generator)
    grads = [(torch.randn(64, 128, generator=generator), torch.randn(8, generator=generator)) for _ in range(3)]
    moved = {}
    for name in ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"):
        w, r = torch.nn.Parameter(big.clone()), torch.nn.Parameter(small.clone())
        groups = [
            {"name": "experts", "params": [w], "lr": 1e-2, "weight_decay": 0.1},
            {"name": "routers", "params": [r], "lr": 0.1, "weight_decay": 0.0},
        ]
        paged = pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU")
        with paged if "paged" in name else contextlib.nullcontext():
            optimizer = quantization.build_optimizer(groups, TrainConfig(optimizer=name))
            for gw, gr in grads:
                w.grad, r.grad = gw.clone(), gr.clone()
                optimizer.step()
        expected_class = {"adamw": "AdamW", **quantization.OPTIMIZERS}[name]
        assert type(optimizer).__name__ == expected_class
        assert [g["name"] for g in optimizer.param_groups] == ["experts", "routers"]
        if name != "adamw":
            state = optimizer.state[w]["state1"].dtype
            assert state == (torch.uint8 if name.endswith("8bit") else torch.float32)
        moved[name] = (w.detach() - big, r.detach() - small)
    reference_w, reference_r = moved["adamw"]
    for name, (dw, dr) in moved.items():
        torch.testing.assert_close(dr, reference_r, rtol=1e-5, atol=1e-7)  # 8 values: 32-bit state everywhere
        if name.endswith("8bit"):
            assert (dw - reference_w).abs().mean() < 0.05 * reference_w.abs().mean()
        else:
            torch.testing.assert_close(dw, reference_w, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The recipe end to end on a tiny config-built Llama


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_quant")
    return root, make_model_dir(root / "model"), write_jsonl(root / "train.jsonl", tiny_rows(0, 8))


def config(assets, out, model: dict, **train):
    root, model_dir, train_file = assets
    data = tiny_config(
        root, model_dir, train_file, None,
        model={"name_or_path": str(model_dir), **model},
        mixture={"dropout": 0.0},
        train={"max_steps": 4, "batch_size": 4, "lr": 2e-2, "warmup_steps": 1, "progress": False, **train},
        eval={"after_training": False},
    )  # fmt: skip
    data["output_dir"] = str(out)
    return build_config(data)


def _reset():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def test_a_gguf_models_cached_copy_loads_quantized(assets, tmp_path, cpu_path):
    """The safetensors copy of a GGUF model keeps the GGUF file's quantization_config in its config.json;
    transformers refuses to combine it with a BitsAndBytesConfig unless the stale entry is dropped."""
    import json
    import shutil

    folder = shutil.copytree(assets[1], tmp_path / "from_gguf")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": "m.gguf", "quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    plain, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder), load_in_4bit=True))
    assert {type(layer).__name__ for _, layer in quantized_linears(model)} == {"Linear4bit"}
    assert model.config.quantization_config.quant_method == "bitsandbytes"
    ids = torch.tensor([[5, 17, 40, 3]])
    with torch.no_grad():
        difference = (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max()
    assert 0 < difference < 0.5  # the same model, up to 4-bit rounding


@pytest.mark.parametrize(
    ("model", "optimizer", "layer_type"),
    [
        ({"load_in_4bit": True, "bnb_4bit_use_double_quant": True}, "adamw8bit", "Linear4bit"),
        ({"load_in_8bit": True}, "paged_adamw8bit", "Linear8bitLt"),
    ],
    ids=["nf4", "int8"],
)
def test_a_quantized_base_trains_saves_and_reloads_to_the_same_logits(
    assets, tmp_path, model, optimizer, layer_type, cpu_path
):
    cfg = config(assets, tmp_path / "run", model, optimizer=optimizer)
    base, _ = load_model_and_tokenizer(cfg.model)
    weights = {name: dequantized_weight(layer) for name, layer in quantized_linears(base)}
    try:
        run = finetune.setup(cfg)
        assert type(run.optimizer.optimizer).__name__ == quantization.OPTIMIZERS[optimizer]
        model_types = {type(layer).__name__ for _, layer in quantized_linears(run.unwrapped)}
        assert model_types == {layer_type} and len(weights) == 2 * 7  # every projection, not the head
        records = finetune.train(run)
    finally:
        _reset()
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    trained = run.unwrapped.eval()
    for name, layer in quantized_linears(trained):  # the quantized weights never moved
        assert torch.equal(dequantized_weight(layer), weights[name.removesuffix(".base_layer")])
    lomix.save(trained, tmp_path / "mixture")
    ids = torch.tensor([[5, 17, 40, 3, 9, 22], [11, 2, 30, 7, 14, 8]])
    with torch.no_grad():
        expected = trained(input_ids=ids, task_ids=[0, 1]).logits
        reloaded = lomix.load(load_model_and_tokenizer(cfg.model)[0], tmp_path / "mixture")
        assert {type(layer).__name__ for _, layer in quantized_linears(reloaded)} == {layer_type}
        torch.testing.assert_close(reloaded(input_ids=ids, task_ids=[0, 1]).logits, expected, rtol=0, atol=0)
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-3  # the mixture did learn something


@pytest.mark.slow
def test_a_4bit_run_with_an_8bit_optimizer_resumes_exactly_and_evaluates_again(assets, tmp_path, cpu_path):
    """accelerate checkpoints bitsandbytes' optimizer state with the mixture: the resumed steps repeat
    the uninterrupted run's losses. The evaluation recipe reloads the run over a freshly quantized
    base and reproduces the run's own final evaluation."""
    from lomix.recipes import evaluation

    root = assets[0]
    test_file = write_jsonl(root / "test.jsonl", tiny_rows(1, 2))
    model = {"load_in_4bit": True}
    try:
        cfg = config(assets, tmp_path / "full", model, optimizer="adamw8bit", save_every=2)
        cfg.data.test, cfg.eval.after_training, cfg.eval.max_new_tokens = str(test_file), True, 3
        full = finetune.run(cfg)
        checkpoint = tmp_path / "full" / "checkpoints" / "step-000002"
        resumed_cfg = config(assets, tmp_path / "resumed", model, optimizer="adamw8bit")
        resumed_cfg.resume_from = str(checkpoint)
        _reset()
        resumed = finetune.run(resumed_cfg)
        _reset()
        again = evaluation.run(tmp_path / "full")
    finally:
        _reset()
    expected = [r["loss"] for r in full["records"] if "loss" in r][2:]
    got = [r["loss"] for r in resumed["records"] if "loss" in r]
    assert len(got) == 2 and got == pytest.approx(expected, abs=1e-6)
    assert len(set(got)) == 2
    assert full["after"]["mean"]["n"] == 6 and again == full["after"]
