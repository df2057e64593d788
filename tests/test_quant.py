"""Mixtures over bitsandbytes 4-bit and 8-bit bases (CPU), checked against fp32 references.

The references are independent of the code under test: the same mixture over an fp32 layer (or a
whole fp32 model) whose weights are the quantized ones decoded by hand or by bitsandbytes' own
forward, and plain torch AdamW for the optimizer.
"""

from __future__ import annotations

import copy
import gc
import re

import pytest
import torch
from conftest import BNB_CPU_PATHS, MODEL_CASES, bnb_cpu_path, randomize_experts
from torch import nn

import lomix
from lomix.checkpoint import mixture_state_dict
from lomix.layer import MixtureLinear
from lomix.quant import (
    compute_dtype,
    dequantized_weight,
    disable_cpu_repacking,
    is_quantized,
    prepare_kbit_training,
    quantized_linears,
    unmap_checkpoint,
)

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.nn import Linear4bit, Linear8bitLt  # noqa: E402

D_IN, D_OUT = 128, 96
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMA_TARGETS = MODEL_CASES["llama"].targets


def fp32_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT)


def quantize(linear: nn.Linear, kind: str, quant_type: str = "nf4", double: bool = False, compute=torch.float32):
    """A bitsandbytes layer holding ``linear``'s weights (bitsandbytes quantizes on the move to a device)."""
    if kind == "8bit":
        layer = Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False, threshold=6.0)
    else:
        layer = Linear4bit(
            linear.in_features, linear.out_features, compute_dtype=compute, quant_type=quant_type,
            compress_statistics=double,
        )  # fmt: skip
    layer.load_state_dict(copy.deepcopy(linear.state_dict()))
    return layer.to("cpu")


def mixture_config(**kwargs) -> lomix.MixtureConfig:
    defaults = dict(
        target_modules=LLAMA_TARGETS, num_experts=4, rank=4, alpha=8, router=lomix.router_config("topk", k=2)
    )
    return lomix.MixtureConfig(**{**defaults, **kwargs})


LAYER_CASES = [
    pytest.param("4bit", qt, dq, cd, id=f"{qt}-{'dq-' if dq else ''}{cd}")
    for qt in ("nf4", "fp4")
    for dq in (False, True)
    for cd in ("float32", "bfloat16", "float16")
] + [pytest.param("8bit", None, False, None, id="int8")]


# ----------------------------------------------------------------------------------------------
# One layer


@pytest.mark.parametrize(("kind", "quant_type", "double", "compute"), LAYER_CASES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_mixture_delta_over_a_quantized_layer_equals_the_delta_over_the_fp32_layer(
    kind, quant_type, double, compute, training, cpu_path
):
    """out(quantized) - out(fp32) == base(quantized) - base(fp32): the experts add the same delta."""
    linear = fp32_linear()
    quantized = quantize(linear, kind, quant_type or "nf4", double, DTYPES.get(compute, torch.float32))
    assert is_quantized(quantized) and compute_dtype(quantized) == (DTYPES[compute] if compute else None)
    config = mixture_config(target_modules=["x"])
    over_q = MixtureLinear(quantized, config).train(training)
    over_fp = MixtureLinear(copy.deepcopy(linear), config).train(training)
    # The experts are fp32 master weights whatever the compute dtype (lomix.quant's docstring).
    assert over_q.experts.A.dtype == over_q.experts.B.dtype == torch.float32
    over_fp.experts.load_state_dict(over_q.experts.state_dict())
    over_fp.router.load_state_dict(over_q.router.state_dict())
    with torch.no_grad():
        over_q.experts.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        over_fp.experts.B.copy_(over_q.experts.B)
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_q, base_fp = quantized(x), linear(x)
        out_q, out_fp = over_q(x), over_fp(x)
    assert out_q.dtype == x.dtype
    delta = out_fp - base_fp
    assert delta.abs().max() > 0.1, "the experts must change the output for the test to mean anything"
    assert (base_q - base_fp).abs().max() > 1e-3, "quantization must change the base for the test to mean anything"
    torch.testing.assert_close(out_q - out_fp, base_q - base_fp, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("kind", "quant_type", "double", "compute"), LAYER_CASES)
def test_gradients_reach_experts_and_router_and_the_input_over_a_quantized_layer(
    kind, quant_type, double, compute, cpu_path
):
    linear = fp32_linear()
    quantized = quantize(linear, kind, quant_type or "nf4", double, DTYPES.get(compute, torch.float32))
    layer = MixtureLinear(quantized, mixture_config(target_modules=["x"])).train()
    with torch.no_grad():
        layer.experts.B.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    layer(x).pow(2).sum().backward()
    for name, param in [*layer.experts.named_parameters(), *layer.router.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0 and quantized.weight.grad is None


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantized_4bit_weight_is_the_code_table_times_the_block_scale(quant_type):
    """Decoded by hand: each byte holds two 4-bit codes (high nibble first), each block of 64 values
    shares one absmax; the layer's own forward multiplies with exactly this matrix."""
    linear = fp32_linear()
    layer = quantize(linear, "4bit", quant_type)
    state = layer.weight.quant_state
    table = bnb.functional.get_4bit_type(quant_type, device="cpu")
    expected = (table[_nibbles(layer.weight.data)].reshape(-1, state.blocksize) * state.absmax[:, None]).reshape(
        D_OUT, D_IN
    )
    weight = dequantized_weight(layer)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, rtol=1e-6, atol=1e-6)
    assert 0 < (weight - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()


@pytest.mark.parametrize("double", [False, True], ids=["nf4", "nf4-dq"])
def test_dequantizing_a_layer_bitsandbytes_repacked_is_refused_with_its_shape(double, monkeypatch):
    """A repacked layer's block scales were rounded to bf16: no dequantized weight equals the standard one."""
    layer = quantize(fp32_linear(), "4bit", "nf4", double)
    before = dequantized_weight(layer)
    repack_as_bitsandbytes_does(layer, monkeypatch)
    assert layer.weight.quant_state.packing_format_for_cpu and layer.weight.data.shape == (D_OUT, D_IN // 2)
    with pytest.raises(lomix.RepackedWeightError, match=rf"^Linear4bit \(4-bit, {D_IN} -> {D_OUT}\): bitsandbytes"):
        dequantized_weight(layer)
    fresh = quantize(fp32_linear(), "4bit", "nf4", double)
    torch.testing.assert_close(dequantized_weight(fresh), before, rtol=0, atol=0)


def test_dequantized_8bit_weight_is_int8_rows_times_their_scale():
    linear = fp32_linear()
    layer = quantize(linear, "8bit")
    weight = dequantized_weight(layer)
    codes = layer.weight.data.clone()
    assert codes.dtype == torch.int8
    row_max = linear.weight.detach().abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(weight, codes.float() * row_max / 127, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(weight, linear.weight, rtol=0, atol=float(row_max.max()) / 127)
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
    layer.train()  # on a CPU bitsandbytes trains through exactly this dequantized weight
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(dequantized_weight(layer), weight)  # the forward moved CB into the state: same weight


def test_dequantized_weight_of_plain_layers_and_mixtures_and_what_it_refuses():
    from transformers.pytorch_utils import Conv1D

    linear = fp32_linear()
    assert torch.equal(dequantized_weight(linear), linear.weight) and dequantized_weight(linear) is not linear.weight
    conv = Conv1D(D_OUT, D_IN)
    assert torch.equal(dequantized_weight(conv), conv.weight.T)
    quantized = quantize(linear, "4bit")
    wrapped = MixtureLinear(quantized, mixture_config(target_modules=["x"]))
    assert torch.equal(dequantized_weight(wrapped), dequantized_weight(quantized))
    assert dequantized_weight(quantized, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(lomix.UnsupportedModuleError, match=r"cannot dequantize a torch.nn.modules.conv.Conv2d"):
        dequantized_weight(nn.Conv2d(3, 3, 1))
    never_quantized = Linear4bit(D_IN, D_OUT)  # bitsandbytes quantizes on .to(device) only
    with pytest.raises(lomix.UnsupportedModuleError, match="never quantized"):
        dequantized_weight(never_quantized)


# ----------------------------------------------------------------------------------------------
# A whole model quantized by transformers (BitsAndBytesConfig) on the CPU


def block_multiple_llama():
    """A tiny Llama whose every quantized dimension is a multiple of the 4-bit block size (64) and of
    bitsandbytes' CPU repacking tile (32): on the AVX512-BF16 path bitsandbytes can really repack it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant") / "llama"
    torch.manual_seed(0)
    block_multiple_llama().save_pretrained(folder, safe_serialization=True)
    return folder


def load(folder, kind: str | None, dtype=torch.float32, *, standard_layout: bool = True, **options):
    """``folder`` quantized as asked, in eval mode. ``standard_layout``: call `disable_cpu_repacking` as
    lomix's own model loading does (False: the model as transformers returns it)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if kind == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **options)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, **options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=config).eval()
    return disable_cpu_repacking(model) if standard_layout else model


def fp32_twin(folder, quantized: nn.Module) -> nn.Module:
    """The fp32 model whose every quantized layer holds that layer's dequantized weight."""
    twin = load(folder, None)
    with torch.no_grad():
        for name, layer in quantized_linears(quantized):
            twin.get_submodule(name.replace(".base_layer", "")).weight.copy_(dequantized_weight(layer))
    return twin


def copy_mixture(source: nn.Module, target: nn.Module) -> None:
    target_state = mixture_state_dict(target)
    with torch.no_grad():
        for key, value in mixture_state_dict(source).items():
            target_state[key].copy_(value)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


QUANT_KINDS = [
    pytest.param("4bit", {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, id="nf4-dq"),
    pytest.param("4bit", {"bnb_4bit_quant_type": "fp4"}, id="fp4"),
    pytest.param("8bit", {}, id="int8"),
]


@pytest.mark.parametrize(("kind", "options"), QUANT_KINDS)
def test_a_mixture_over_a_quantized_model_matches_the_fp32_model_of_its_dequantized_weights(
    llama_dir, kind, options, cpu_path
):
    """Logits, loss and every expert and router gradient equal those of the same mixture over the fp32
    twin (training mode: bitsandbytes multiplies by the dequantized weight on a CPU when training)."""
    quantized = load(llama_dir, kind, **options)
    assert {type(m) for _, m in quantized_linears(quantized)} == {Linear4bit if kind == "4bit" else Linear8bitLt}
    assert len(list(quantized_linears(quantized))) == 2 * len(LLAMA_TARGETS)  # the lm_head stays unquantized
    twin = fp32_twin(llama_dir, quantized)
    prepare_kbit_training(quantized)
    lomix.inject(quantized, mixture_config())
    lomix.inject(twin, mixture_config())
    randomize_experts(quantized, std=0.3)
    copy_mixture(quantized, twin)
    outputs = []
    for model in (quantized, twin):
        model.train()
        out = model(**batch())
        (out.loss + lomix.aux_loss(model)).backward()
        outputs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (logits_q, grads_q), (logits_fp, grads_fp) = outputs
    torch.testing.assert_close(logits_q, logits_fp, rtol=1e-4, atol=1e-5)
    assert sorted(grads_q) == sorted(grads_fp) and all(".experts." in n or ".router." in n for n in grads_q)
    for name, grad in grads_q.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads_fp[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize(("kind", "options"), QUANT_KINDS)
def test_training_steps_change_experts_and_routers_never_the_quantized_base(
    llama_dir, kind, options, tmp_path, cpu_path
):
    model = load(llama_dir, kind, **options)
    prepare_kbit_training(model)
    lomix.inject(model, mixture_config())
    frozen = {name: tensor.clone() for name, tensor in model.state_dict().items() if ".experts." not in name}
    frozen = {n: t for n, t in frozen.items() if ".router." not in n}
    weights = {name: dequantized_weight(layer) for name, layer in quantized_linears(model)}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".experts." in n or ".router." in n for n in trained)
    optimizer = torch.optim.AdamW(lomix.parameter_groups(model, 1e-2, weight_decay=0.1))
    model.train()
    for step in range(3):
        loss = model(**batch(step)).loss + lomix.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in trained:
            assert not torch.equal(param, trained[name]), f"{name} did not train"
    state = model.state_dict()
    for name, tensor in frozen.items():  # packed 4-bit bytes, int8 codes, scales, norms, embeddings, head
        assert torch.equal(state[name], tensor), f"{name} changed"
    for name, layer in quantized_linears(model):
        assert torch.equal(dequantized_weight(layer), weights[name]), name
    # The saved mixture holds exactly the tensors a mixture over the fp32 model holds: no base weight.
    lomix.save(model, tmp_path / "mixture")
    from safetensors import safe_open

    reference = lomix.inject(load(llama_dir, None), mixture_config())
    with safe_open(str(tmp_path / "mixture" / lomix.WEIGHTS_NAME), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(mixture_state_dict(reference))
    size = (tmp_path / "mixture" / lomix.WEIGHTS_NAME).stat().st_size
    assert size < 4 * sum(p.numel() for p in trained.values()) + 20_000


@pytest.mark.parametrize(("kind", "options"), QUANT_KINDS[::2])
def test_save_then_load_into_a_freshly_quantized_base_gives_the_same_logits(
    llama_dir, kind, options, tmp_path, cpu_path
):
    model = load(llama_dir, kind, **options)
    prepare_kbit_training(model)
    lomix.inject(model, mixture_config())
    randomize_experts(model, std=0.3)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        base = load(llama_dir, kind, **options)(**inputs).logits
    assert (expected - base).abs().max() > 1e-2
    lomix.save(model, tmp_path / "mixture")
    fresh = lomix.load(load(llama_dir, kind, **options), tmp_path / "mixture")
    assert len(list(quantized_linears(fresh))) == 2 * len(LLAMA_TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected, rtol=0, atol=0)


def test_prepare_kbit_training_keeps_non_quantized_parameters_in_fp32(llama_dir):
    """A bf16 model quantized to 4 bits: norms, embeddings and head go to fp32 (so the fp32 hidden
    states an fp32 norm produces fit every later layer), the packed weights stay as they are."""
    model = load(llama_dir, "4bit", dtype=torch.bfloat16)
    packed = {name: layer.weight.data.clone() for name, layer in quantized_linears(model)}
    floating = [n for n, p in model.named_parameters() if p.is_floating_point()]
    assert {model.get_parameter(n).dtype for n in floating} == {torch.bfloat16}
    prepare_kbit_training(model)
    assert {model.get_parameter(n).dtype for n in floating} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    for name, layer in quantized_linears(model):
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight.data, packed[name])
        assert layer.support_avx512bf16_for_cpu is False  # no in-place repacking for CPU inference
    lomix.inject(model, mixture_config()).train()
    model(**batch()).loss.backward()  # no dtype mismatch anywhere
    assert all(p.grad is not None for p in lomix.mixture_parameters(model))


def test_re_entrant_checkpointing_over_a_quantized_base_gives_the_plain_gradients(llama_dir):
    reference = load(llama_dir, "4bit")
    prepare_kbit_training(reference)
    lomix.inject(reference, mixture_config())
    randomize_experts(reference, std=0.3)
    reference.train()(**batch()).loss.backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}

    model = load(llama_dir, "4bit")
    ids = batch()["input_ids"]
    prepare_kbit_training(model)
    assert not model.get_input_embeddings()(ids).requires_grad
    prepare_kbit_training(model, input_require_grads=True)
    # what re-entrant checkpointing needs: the frozen embeddings' output asks for a gradient
    assert model.get_input_embeddings()(ids).requires_grad
    lomix.inject(model, mixture_config())
    copy_mixture(reference, model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert model.is_activation_checkpointing
    model.train()(**batch()).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(lomix.UnsupportedModuleError, match="enable_input_require_grads"):
        prepare_kbit_training(nn.Sequential(nn.Linear(2, 2)), input_require_grads=True)


def test_unmap_checkpoint_lets_the_full_precision_file_go(llama_dir, tmp_path, cpu_path):
    import shutil

    folder = shutil.copytree(llama_dir, tmp_path / "own")  # a file no other test's model maps
    checkpoint = str((folder / "model.safetensors").resolve())

    def mapped() -> bool:
        return any(line.rstrip().endswith(checkpoint) for line in open("/proc/self/maps"))

    model = load(folder, "4bit")
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    assert mapped(), "transformers no longer maps the checkpoint: this test checks nothing"
    unmap_checkpoint(model)
    gc.collect()
    assert not mapped()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# bitsandbytes' AVX512-BF16 CPU path: lomix never lets it repack, and refuses what it repacked before


def repack_as_bitsandbytes_does(model: nn.Module, monkeypatch) -> list[str]:
    """Run every 4-bit layer's own forward once in eval mode without gradients with its AVX512-BF16
    switch on, as the first evaluation does on such a CPU: bitsandbytes repacks the weight in place
    before it multiplies. The multiplication is stubbed out (its packed-layout kernel exists only on
    such CPUs, and only the repacking matters here), so this runs on any CPU. Returns the layers' names."""
    import bitsandbytes

    def no_matmul(x, weight, bias=None, quant_state=None):
        return x.new_zeros(*x.shape[:-1], quant_state.shape[0])

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", no_matmul)
    names = []
    for name, layer in quantized_linears(model):
        if isinstance(layer, Linear4bit):
            layer.eval().support_avx512bf16_for_cpu = True
            with torch.no_grad():
                layer(torch.zeros(1, layer.in_features))
            names.append(name)
    monkeypatch.undo()
    return names


def first_4bit_layer(model: nn.Module) -> tuple[str, str]:
    """(name, "in -> out") of the model's first 4-bit layer, as errors name it."""
    name, layer = next(iter(quantized_linears(model)))
    return name, f"{layer.in_features} -> {layer.out_features}"


def repacked(model: nn.Module) -> list[str]:
    """Names of the model's layers bitsandbytes has repacked for AVX512-BF16 CPU inference."""
    states = ((name, getattr(layer.weight, "quant_state", None)) for name, layer in quantized_linears(model))
    return [name for name, state in states if getattr(state, "packing_format_for_cpu", False)]


NF4 = [
    pytest.param({"bnb_4bit_quant_type": "nf4"}, id="nf4"),
    pytest.param({"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, id="nf4-dq"),
]
FIXED = dict(router=lomix.router_config("fixed", experts=[0, 2], weights=[0.75, 0.25]))


@pytest.mark.parametrize("options", NF4)
def test_the_avx512bf16_path_repacks_in_place_unless_lomix_turned_it_off(llama_dir, options, monkeypatch):
    """The hazard is real (so the tests below check something): on the AVX512-BF16 path a no-grad eval
    forward repacks every 4-bit layer of a model as transformers returns it; after
    `disable_cpu_repacking` a whole model's no-grad eval forward repacks none, on either path."""
    with bnb_cpu_path("avx512bf16"):
        model = load(llama_dir, "4bit", standard_layout=False, **options)
        assert all(layer.support_avx512bf16_for_cpu for _, layer in quantized_linears(model))
        names = repack_as_bitsandbytes_does(model, monkeypatch)
        assert len(names) == 2 * len(LLAMA_TARGETS) and repacked(model) == names
    for path in BNB_CPU_PATHS:
        with bnb_cpu_path(path):
            model = disable_cpu_repacking(load(llama_dir, "4bit", standard_layout=False, **options))
            with torch.no_grad():
                model(**{k: v for k, v in batch().items() if k != "labels"})
            assert repacked(model) == [], path


def load_fresh_mixture(tmp_path):
    """A saved mixture (fp32 base) to load into a quantized model."""
    folder = tmp_path / "saved"
    if not folder.exists():
        lomix.save(lomix.inject(block_multiple_llama(), mixture_config()), folder)
    return folder


REFUSING_ENTRY_POINTS = {
    "inject": lambda model, tmp_path: lomix.inject(model, mixture_config()),
    "prepare_kbit_training": lambda model, tmp_path: prepare_kbit_training(model),
    "load": lambda model, tmp_path: lomix.load(model, load_fresh_mixture(tmp_path)),
    "disable_cpu_repacking": lambda model, tmp_path: disable_cpu_repacking(model),
}


@pytest.mark.parametrize("entry", sorted(REFUSING_ENTRY_POINTS))
@pytest.mark.parametrize("options", NF4)
def test_a_model_bitsandbytes_repacked_before_lomix_saw_it_is_refused_by_layer_name_and_shape(
    llama_dir, options, entry, tmp_path, monkeypatch
):
    """Repacking rounded the block scales to bf16: nothing lomix computes from such a model could equal
    the standard layout's numbers, so every entry point refuses it, naming the layer and its shape,
    before changing the model."""
    model = load(llama_dir, "4bit", standard_layout=False, **options)
    repack_as_bitsandbytes_does(model, monkeypatch)
    name, shape = first_4bit_layer(model)
    requires_grad = [p.requires_grad for p in model.parameters()]
    dtypes = [p.dtype for p in model.parameters()]
    message = rf"^{re.escape(name)} \(4-bit, {shape}\): bitsandbytes already repacked"
    with pytest.raises(lomix.RepackedWeightError, match=message):
        REFUSING_ENTRY_POINTS[entry](model, tmp_path)
    assert getattr(model, "lomix_state", None) is None
    assert not any(isinstance(m, MixtureLinear) for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert [p.dtype for p in model.parameters()] == dtypes


@pytest.mark.parametrize("options", NF4)
def test_a_layer_repacked_after_injection_is_refused_by_merged_export_and_never_touched_by_save(
    llama_dir, options, tmp_path, monkeypatch
):
    """If the switch is turned back on by hand and a weight repacked inside a mixture: `export_merged`
    refuses it by name; `lomix.save` writes the same mixture as before and leaves the packed base as it
    was (bitsandbytes converts a packed weight in place when asked for its state: lomix never asks)."""
    from safetensors.torch import load_file

    from lomix.export import export_merged

    model = lomix.inject(load(llama_dir, "4bit", **options), mixture_config(**FIXED))
    randomize_experts(model, std=0.3)
    lomix.save(model, tmp_path / "before")
    repack_as_bitsandbytes_does(model, monkeypatch)
    packed = {n: (q.weight.data.clone(), q.weight.quant_state.absmax.clone()) for n, q in quantized_linears(model)}
    lomix.save(model, tmp_path / "after")
    before, after = (load_file(tmp_path / f / lomix.WEIGHTS_NAME) for f in ("before", "after"))
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    for name, layer in quantized_linears(model):
        assert layer.weight.quant_state.packing_format_for_cpu, name
        data, absmax = packed[name]
        assert torch.equal(layer.weight.data, data) and torch.equal(layer.weight.quant_state.absmax, absmax)
    name, shape = first_4bit_layer(model)
    with pytest.raises(lomix.RepackedWeightError, match=rf"^{re.escape(name)} \(4-bit, {shape}\)"):
        export_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


LIFECYCLE_KINDS = [
    pytest.param("4bit", {"bnb_4bit_quant_type": "nf4"}, id="nf4"),
    pytest.param("4bit", {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, id="nf4-dq"),
    pytest.param("8bit", {}, id="int8"),
]


def on_both_cpu_paths(flow) -> list:
    """``flow()`` on the standard and the AVX512-BF16 path; asserts no layer got repacked on either."""
    results = []
    for path in BNB_CPU_PATHS:
        with bnb_cpu_path(path):
            torch.manual_seed(0)  # the same mixture initialisation on both paths
            model, result = flow(path)
            assert repacked(model) == [], path
            results.append(result)
    return results


def assert_identical(results: list[dict[str, torch.Tensor]]) -> None:
    standard, avx = results
    assert sorted(standard) == sorted(avx) and standard
    for key, tensor in standard.items():
        assert torch.equal(tensor, avx[key]), key


def evaluated_mixture(llama_dir, kind, options, **config):
    """What a user has after loading a quantized base (as transformers returns it), injecting a mixture
    and evaluating it once without gradients: the moment bitsandbytes would repack."""
    model = lomix.inject(load(llama_dir, kind, standard_layout=False, **options), mixture_config(**config))
    randomize_experts(model, std=0.3)
    with torch.no_grad():
        logits = model.eval()(**{k: v for k, v in batch().items() if k != "labels"}).logits
    return model, logits


def train_step_gradients(model) -> dict[str, torch.Tensor]:
    model.train()
    out = model(**batch(1))
    (out.loss + lomix.aux_loss(model)).backward()
    return {"loss": out.loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize(("kind", "options"), LIFECYCLE_KINDS)
def test_saving_after_an_evaluation_gives_the_same_mixture_on_both_cpu_paths(llama_dir, kind, options, tmp_path):
    from safetensors.torch import load_file

    def flow(path):
        model, logits = evaluated_mixture(llama_dir, kind, options)
        lomix.save(model, tmp_path / path)
        weights = {f"base:{n}": dequantized_weight(layer) for n, layer in quantized_linears(model)}
        return model, {"logits": logits, **load_file(tmp_path / path / lomix.WEIGHTS_NAME), **weights}

    assert_identical(on_both_cpu_paths(flow))


@pytest.mark.parametrize(("kind", "options"), LIFECYCLE_KINDS)
def test_merged_export_after_an_evaluation_gives_the_same_weights_on_both_cpu_paths(llama_dir, kind, options, tmp_path):
    from safetensors.torch import load_file

    from lomix.export import export_merged

    def flow(path):
        model, logits = evaluated_mixture(llama_dir, kind, options, **FIXED)
        export_merged(model, tmp_path / path)
        return model, {"logits": logits, **load_file(tmp_path / path / "model.safetensors")}

    assert_identical(on_both_cpu_paths(flow))


@pytest.mark.parametrize(("kind", "options"), LIFECYCLE_KINDS)
def test_back_to_training_after_an_evaluation_gives_the_same_gradients_on_both_cpu_paths(llama_dir, kind, options):
    """bitsandbytes' repacked layer multiplies without an autograd path to its input: had it repacked,
    every gradient flowing back through a base weight would be lost (the first layers' experts would
    get only part of theirs). The fp32 twin of the dequantized weights is the reference."""

    models = []

    def flow(path):
        models.append(evaluated_mixture(llama_dir, kind, options)[0])
        return models[-1], train_step_gradients(models[-1])

    results = on_both_cpu_paths(flow)
    assert_identical(results)
    twin = lomix.inject(fp32_twin(llama_dir, models[0]), mixture_config())
    copy_mixture(models[0], twin)
    expected = train_step_gradients(twin)
    for name, grad in results[0].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize(("kind", "options"), LIFECYCLE_KINDS)
def test_prepare_kbit_training_after_a_base_evaluation_gives_the_same_gradients_on_both_cpu_paths(
    llama_dir, kind, options
):
    """The recipes' order: load (lomix's loader keeps the standard layout), evaluate the base, then
    prepare, inject and train."""

    def flow(path):
        model = load(llama_dir, kind, **options)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch().items() if k != "labels"}).logits
        prepare_kbit_training(model)
        lomix.inject(model, mixture_config())
        randomize_experts(model, std=0.3)
        return model, {"base_logits": logits, **train_step_gradients(model)}

    assert_identical(on_both_cpu_paths(flow))


def test_layers_bitsandbytes_cannot_repack_run_under_lomix_on_both_cpu_paths(tmp_path, monkeypatch):
    """bitsandbytes' repacking cannot handle in_features below the block size (64) or out_features that
    are not a multiple of 32 (a reshape traceback): under lomix such layers never repack, so a tiny model
    of those shapes evaluates, and gives the same logits, on both paths."""
    torch.manual_seed(0)
    MODEL_CASES["llama"].build().save_pretrained(tmp_path / "tiny", safe_serialization=True)
    with bnb_cpu_path("avx512bf16"):
        plain = load(tmp_path / "tiny", "4bit", standard_layout=False)
        layer = next(layer for _, layer in quantized_linears(plain))
        assert layer.in_features < 64
        with pytest.raises((RuntimeError, AssertionError)):  # what a user saw without lomix
            repack_as_bitsandbytes_does(plain, monkeypatch)
    inputs = {k: v for k, v in batch().items() if k != "labels"}

    def flow(path):
        model = lomix.inject(load(tmp_path / "tiny", "4bit", standard_layout=False), mixture_config())
        randomize_experts(model, std=0.3)
        with torch.no_grad():
            return model, {"logits": model.eval()(**inputs).logits}

    assert_identical(on_both_cpu_paths(flow))
