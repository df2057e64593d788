"""Mixtures over bitsandbytes 4-bit and 8-bit bases (CPU), checked against fp32 references.

The references are independent of the code under test: the same mixture over an fp32 layer (or a
whole fp32 model) whose weights are the quantized ones decoded by hand or by bitsandbytes' own
forward, and plain torch AdamW for the optimizer.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from conftest import MODEL_CASES, randomize_experts
from torch import nn

import lomix
from lomix.checkpoint import mixture_state_dict
from lomix.layer import MixtureLinear
from lomix.quant import (
    compute_dtype,
    dequantized_weight,
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
    kind, quant_type, double, compute, training
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
def test_gradients_reach_experts_and_router_and_the_input_over_a_quantized_layer(kind, quant_type, double, compute):
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


@pytest.mark.parametrize("double", [False, True])
def test_dequantized_weight_of_a_layer_repacked_for_cpu_inference(double):
    """bitsandbytes repacks 4-bit weights in place on AVX512-BF16 CPUs (the repacked layer computes with
    bf16 block scales): the dequantized weight is the same codes times those bf16 scales."""
    layer = quantize(fp32_linear(), "4bit", "nf4", double)
    before = dequantized_weight(layer)
    state = layer.weight.quant_state
    absmax = before.reshape(-1, 64).abs().amax(dim=1)  # each block's largest code is +-1: this is its scale
    codes_times_scale = before.reshape(-1, 64) / absmax[:, None]
    packed = copy.deepcopy(layer)
    packed.weight.data, packed.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        packed.weight.data, packed.weight.quant_state
    )
    assert packed.weight.quant_state.packing_format_for_cpu and packed.weight.data.shape == (D_OUT, D_IN // 2)
    expected = (codes_times_scale * absmax.bfloat16().float()[:, None]).reshape(D_OUT, D_IN)
    torch.testing.assert_close(dequantized_weight(packed), expected, rtol=1e-6, atol=1e-7)
    assert state is layer.weight.quant_state and torch.equal(dequantized_weight(layer), before)  # untouched


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


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant") / "llama"
    torch.manual_seed(0)
    MODEL_CASES["llama"].build().save_pretrained(folder, safe_serialization=True)
    return folder


def load(folder, kind: str | None, dtype=torch.float32, **options):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if kind == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **options)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, **options)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=config).eval()


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
def test_a_mixture_over_a_quantized_model_matches_the_fp32_model_of_its_dequantized_weights(llama_dir, kind, options):
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
        torch.testing.assert_close(grad, grads_fp[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize(("kind", "options"), QUANT_KINDS)
def test_training_steps_change_experts_and_routers_never_the_quantized_base(llama_dir, kind, options, tmp_path):
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
def test_save_then_load_into_a_freshly_quantized_base_gives_the_same_logits(llama_dir, kind, options, tmp_path):
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


def test_unmap_checkpoint_lets_the_full_precision_file_go(llama_dir, tmp_path):
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
