"""Quantized bases: mixtures over bitsandbytes 4-bit (`Linear4bit`) and 8-bit (`Linear8bitLt`) layers.

QLoRA-style training keeps the base model's linear weights quantized and frozen and trains only the
experts and routers on top. Both bitsandbytes layer types subclass ``torch.nn.Linear``, so
`lomix.inject` wraps them like any linear layer; this module holds what is specific to them:

- `quantized_linears`, `is_quantized`, `compute_dtype`: which layers are quantized and in which
  dtype they multiply.
- `dequantized_weight`: the (d_out, d_in) weight a quantized layer really multiplies with (merging
  a mixture into a quantized base, or exporting it, starts from this).
- `unmap_checkpoint`: let go of the full-precision checkpoint file a quantized model was loaded from.
- `disable_cpu_repacking`: keep 4-bit weights in bitsandbytes' standard layout on every CPU (below).
- `prepare_kbit_training`: the setup peft's ``prepare_model_for_kbit_training`` does, without its
  side effects on gradient checkpointing: freeze the base, keep every non-quantized parameter in
  fp32, give the embeddings' output a gradient for re-entrant checkpointing, and stop
  bitsandbytes from repacking 4-bit weights for CPU inference while a model trains.

One layout on every CPU: on a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight IN PLACE
into a CPU-specific layout the first time the layer runs in eval mode without gradients. That layout
multiplies in bf16 with block scales rounded to bf16 (not reversible exactly), has no autograd path to
the input (a later training step loses every gradient through the base), is mutated back by
``state_dict()`` (re-quantizing double-quantized scales), and its reshape fails for layers whose
in_features is not a multiple of the block size or whose out_features is not a multiple of 32. The same
mixture would then give other numbers, or a traceback, depending on the machine. So lomix turns the
repacking off on every 4-bit layer of a model it loads, wraps or prepares (`disable_cpu_repacking`,
called by `lomix.inject`, `lomix.load`, `prepare_kbit_training` and the recipes' model loading), and
refuses, naming the layer, a weight that bitsandbytes repacked before lomix saw the model.

Experts over a quantized layer are fp32 (`lomix.layer._expert_dtype`): that IS the compute dtype
of the fp32 case, and for bf16/fp16 compute it keeps fp32 master weights, as peft does for LoRA
adapters (``autocast_adapter_dtype``): AdamW updates of ~1e-3 relative size vanish in an fp16/bf16
parameter. The torch kernel computes the delta in the experts' dtype and casts it to the layer's
output dtype; under ``train.mixed_precision`` autocast runs it in the half dtype.

bitsandbytes is optional: nothing here imports it unless asked to dequantize a layer of it, and
`is_quantized` answers False for every layer while bitsandbytes has not been imported (no layer
can be one of its types then).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import nn

from .errors import RepackedWeightError, UnsupportedModuleError

INSTALL_HINT = "pip install bitsandbytes (or pip install 'lomix[quant]')"


def _bnb_classes() -> tuple[type | None, type | None]:
    """(Linear4bit, Linear8bitLt) when bitsandbytes is imported, else (None, None)."""
    modules = sys.modules.get("bitsandbytes.nn")
    if modules is None:
        return None, None
    return getattr(modules, "Linear4bit", None), getattr(modules, "Linear8bitLt", None)


def _base(module: nn.Module) -> nn.Module:
    """The wrapped layer of a `MixtureLinear`, the module itself otherwise."""
    return getattr(module, "base_layer", module)


def quant_kind(module: nn.Module) -> str | None:
    """``"4bit"`` for a bitsandbytes Linear4bit, ``"8bit"`` for a Linear8bitLt, None otherwise."""
    module = _base(module)
    linear4, linear8 = _bnb_classes()
    if linear4 is not None and isinstance(module, linear4):
        return "4bit"
    if linear8 is not None and isinstance(module, linear8):
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (or a `MixtureLinear` over one)."""
    return quant_kind(module) is not None


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every bitsandbytes linear layer of ``model`` (inside mixtures too)."""
    for name, module in model.named_modules():
        if is_quantized(module) and not hasattr(module, "base_layer"):
            yield name, module


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a quantized layer multiplies in: a 4-bit layer's ``compute_dtype`` (None until its
    first forward when none was given: it then adopts the input's fp32/bf16 dtype); None for an
    8-bit layer, which computes in its input's dtype (fp16 int8 kernels at inference)."""
    module = _base(module)
    if quant_kind(module) == "4bit":
        return module.compute_dtype
    return None


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (d_out, d_in) weight ``module`` multiplies its input with, as a new ``dtype`` tensor.

    Accepts a bitsandbytes Linear4bit (nf4/fp4, with or without double quantization) or Linear8bitLt
    (int8 rows times their scale / 127), a plain ``nn.Linear``, transformers' Conv1D (stored
    transposed), or a `MixtureLinear` (its base layer). The module is not modified. The bias is not
    included. A 4-bit weight that bitsandbytes repacked for AVX512-BF16 CPU inference is refused
    (`RepackedWeightError`): its block scales were rounded to bf16, so no weight it yields equals the
    layer's standard-layout weight.
    """
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    module = _base(module)
    kind = quant_kind(module)
    with torch.no_grad():
        if kind == "4bit":
            return _dequantize_4bit(module).to(dtype)
        if kind == "8bit":
            return _dequantize_8bit(module).to(dtype)
        if isinstance(module, nn.Linear):
            return module.weight.detach().to(dtype, copy=True)
        from .layer import _conv1d_type

        conv1d = _conv1d_type()
        if conv1d is not None and isinstance(module, conv1d):
            return module.weight.detach().t().to(dtype, copy=True)
    raise UnsupportedModuleError(
        f"cannot dequantize a {name}: expected torch.nn.Linear, transformers' Conv1D, or a bitsandbytes "
        "Linear4bit / Linear8bitLt (with has_fp16_weights=False)"
    )


def _dequantize_4bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise UnsupportedModuleError(
            f"{type(module).__name__} holds no quantization state: its weight was never quantized "
            "(bitsandbytes quantizes when the layer is moved to a device, e.g. module.to('cpu'))"
        )
    check_standard_layout(module)
    return bnbf.dequantize_4bit(weight.data, state).float()


def _dequantize_8bit(module: nn.Module) -> torch.Tensor:
    state = module.state
    if state.has_fp16_weights:
        return module.weight.detach().float()
    codes = state.CB if state.CB is not None else getattr(module.weight, "CB", None)
    scales = state.SCB if state.SCB is not None else getattr(module.weight, "SCB", None)
    if codes is None or scales is None:
        raise UnsupportedModuleError(
            f"{type(module).__name__} holds no int8 weight and row scales: it was never quantized "
            "(bitsandbytes quantizes when the layer is moved to a device, e.g. module.to('cpu'))"
        )
    return codes.float() * (scales.float().unsqueeze(1) / 127.0)


def repacked_for_cpu(module: nn.Module) -> bool:
    """True when bitsandbytes has repacked ``module``'s 4-bit weight into its AVX512-BF16 CPU layout."""
    state = getattr(getattr(_base(module), "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def check_standard_layout(module: nn.Module, name: str | None = None) -> None:
    """Raise `RepackedWeightError` (naming ``name`` or the layer's type, and its shape) when bitsandbytes
    has repacked ``module``'s 4-bit weight for AVX512-BF16 CPU inference."""
    if repacked_for_cpu(module):
        raise RepackedWeightError(name or type(_base(module)).__name__, linear_shape(_base(module)))


def linear_shape(module: nn.Module) -> str:
    """``"in_features -> out_features"`` of a linear layer, for messages."""
    return f"{getattr(module, 'in_features', '?')} -> {getattr(module, 'out_features', '?')}"


def disable_cpu_repacking(model: nn.Module, prefix: str = "") -> nn.Module:
    """Keep every bitsandbytes 4-bit layer of ``model`` in the standard layout on every CPU; returns ``model``.

    Turns off ``support_avx512bf16_for_cpu`` (bitsandbytes' in-place repacking at the first no-grad
    eval forward on AVX512-BF16 CPUs; see the module docstring for why lomix never lets it happen), so
    that a mixture computes the same numbers, through the same autograd path, on every CPU. Raises
    `RepackedWeightError` naming the first layer bitsandbytes has ALREADY repacked (before changing
    anything): call this right after loading a quantized model, before running it. 8-bit layers have
    no CPU-specific layout and are left as they are. ``prefix``: ``model``'s own name, for the error.
    """
    layers = [(name, layer) for name, layer in quantized_linears(model) if quant_kind(layer) == "4bit"]
    for name, layer in layers:
        check_standard_layout(layer, ".".join(part for part in (prefix, name) if part))
    for _, layer in layers:
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return model


def _floating_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    quantized = {id(m.weight) for _, m in quantized_linears(model)}
    for param in model.parameters():
        if id(param) not in quantized and param.is_floating_point():
            yield param


def unmap_checkpoint(model: nn.Module) -> nn.Module:
    """Copy every non-quantized parameter and buffer of ``model`` into process memory; returns ``model``.

    transformers loads safetensors weights as views of the memory-mapped file. For a quantized model
    those views (embeddings, norms, head) keep the WHOLE file mapped, and every page of it that
    quantization read (all of the full-precision weights) stays resident: ~500 MiB of a 160 MiB 4-bit
    SmolLM2. The pages are clean and reclaimable, but they count in the process's resident size (and
    a container's memory). Copying the few unquantized tensors out lets the mapping go.
    """
    quantized = {id(layer.weight) for _, layer in quantized_linears(model)}
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if id(tensor) not in quantized:
                tensor.data = tensor.data.clone()
    return model


def prepare_kbit_training(model: nn.Module, *, input_require_grads: bool = False) -> nn.Module:
    """Set up a bitsandbytes-quantized model for training a mixture on it; call before `lomix.inject`.

    - every parameter is frozen (`lomix.inject` then unfreezes only experts and routers);
    - every non-quantized floating parameter (layer norms, embeddings, head, biases) in fp16/bf16 is
      cast to fp32: norms then run in fp32, and as an fp32 norm makes the hidden states fp32, every
      non-quantized layer after it must accept them (peft casts the same set);
    - ``input_require_grads``: the input embeddings' output requires grad, which re-entrant gradient
      checkpointing needs to reach the experts inside a checkpointed block (the non-re-entrant
      variant, which the recipes use, needs nothing);
    - 4-bit layers keep the standard layout on every CPU (`disable_cpu_repacking`: a repacked layer
      multiplies without an autograd path to its input, so a later training step would lose every
      gradient that flows through the base weights).

    Returns ``model``; raises `RepackedWeightError` (before changing anything) when bitsandbytes has
    already repacked a layer.
    """
    disable_cpu_repacking(model)  # first: a repacked model is refused before anything changes
    for param in model.parameters():
        param.requires_grad_(False)
    for param in _floating_parameters(model):
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if input_require_grads:
        if not hasattr(model, "enable_input_require_grads"):
            raise UnsupportedModuleError(
                f"{type(model).__name__} has no enable_input_require_grads(); input_require_grads=True needs a "
                "transformers model (or use non-re-entrant checkpointing, which needs no input gradients)"
            )
        model.enable_input_require_grads()
    return model


__all__ = [
    "INSTALL_HINT",
    "check_standard_layout",
    "compute_dtype",
    "dequantized_weight",
    "disable_cpu_repacking",
    "is_quantized",
    "prepare_kbit_training",
    "quant_kind",
    "quantized_linears",
    "repacked_for_cpu",
    "unmap_checkpoint",
]
