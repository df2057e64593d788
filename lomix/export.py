"""Export: what can leave lomix (docs/deploy.md, "Merge, compress, export").

A mixture whose routing is FIXED (the same experts and gates for every token: Poly/MHR for a known
task, a GLIDER global route, a router frozen to an expert set such as ``fixed``) is one LoRA per
layer:

- token routing fixed to bank experts e_1..e_k with gates g_1..g_k (after router rebinding of a
  merged mixture, duplicates summed): A = [A_e1; ...; A_ek] (k r x d_in) and
  B = [s g_1 B_e1 | ... | s g_k B_ek] (d_out x k r), so B A = s sum_j g_j B_ej A_ej;
- parameter mixing (Poly/MHR) for one task: the mixed A and B of `mix_parameters` (rank r), with
  B scaled by s.

Whether a route is fixed is asked of the router itself, through the same call a forward makes: it
is given probe tokens (two sequences of random hidden states) and a `RoutingContext` holding the
task, and its answer must not depend on the tokens. That works for any router returning
`TokenRouting` or `ParameterMixing`, without knowing its internals.

    loras = fixed_loras(model, task_ids=[3])            # {layer name: FixedLora}
    export_peft(model, "out/peft", task_ids=[3])        # adapter_config.json + adapter_model.safetensors
    export_merged(model, "out/merged", tokenizer=tok)   # a plain transformers checkpoint

Token-routed mixtures keep the lomix runtime: `lomix.save` them (after `lomix.merge` if asked).
Every write goes through `lomix.atomic` (a temporary folder, then a rename).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .atomic import atomic_directory
from .errors import LomixError, RoutingError
from .inject import mixture_layers
from .kernels.torch_backend import mix_parameters
from .layer import MixtureLinear, _conv1d_type
from .quant import dequantized_weight, disable_cpu_repacking, quant_kind
from .routing import ParameterMixing, RoutingContext, TokenRouting

PROBE_TOKENS = 8
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
EXPORT_INFO_NAME = "lomix_export.json"
ROUTE_OPTIONS = (
    "pass --task T for a task-routed mixture (Poly/MHR), use a router with a fixed route (a GLIDER global "
    "route, or `fixed`: a router frozen to an expert set), or export the token-routed mixture with "
    "--format lomix (after `lomix merge` to shrink it)"
)


class NotFixedRouteError(LomixError, ValueError):
    """The mixture's routing depends on the tokens, so it is not one LoRA."""


@dataclass
class FixedLora:
    """One layer's mixture under a fixed route, as one LoRA: delta W = B @ A (+ residual).

    The LoRA scale and the gates are folded into B; ``residual`` is the dense (d_out, d_in) sum of
    the route's sparse residuals (compressed mixtures), already scaled and gated.
    """

    A: torch.Tensor  # (R, d_in)
    B: torch.Tensor  # (d_out, R)
    residual: torch.Tensor | None = None
    route: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """(d_out, d_in) weight update in float64."""
        delta = self.B.double() @ self.A.double()
        return delta if self.residual is None else delta + self.residual.double()


def _probe(layer: MixtureLinear) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, PROBE_TOKENS, layer.d_in, generator=generator)
    return probe.to(device=layer.experts.A.device, dtype=layer.experts.A.dtype)


def _route(name: str, layer: MixtureLinear, context: RoutingContext) -> TokenRouting | ParameterMixing:
    probe = _probe(layer)
    was_training = layer.router.training
    layer.router.eval()
    try:
        with torch.no_grad():
            routing = layer.router(probe, context.for_batch(probe.shape[0]))
    except RoutingError as exc:
        raise NotFixedRouteError(
            f"{name}: router {layer.router.name!r} cannot route here ({exc}); {ROUTE_OPTIONS}"
        ) from None
    finally:
        layer.router.train(was_training)
    if isinstance(routing, TokenRouting):
        same = torch.equal(routing.indices, routing.indices[:1].expand_as(routing.indices)) and torch.allclose(
            routing.gates, routing.gates[:1].expand_as(routing.gates), rtol=1e-6, atol=0
        )
    elif isinstance(routing, ParameterMixing):
        same = torch.allclose(routing.weights, routing.weights[:1].expand_as(routing.weights), rtol=1e-6, atol=0)
    else:
        raise LomixError(f"{name}: router {layer.router.name!r} returned {type(routing).__name__}")
    if not same:
        raise NotFixedRouteError(
            f"{name}: router {layer.router.name!r} routes each token on its own, so this mixture is not one LoRA; "
            f"{ROUTE_OPTIONS}"
        )
    return routing


def fixed_lora(name: str, layer: MixtureLinear, context: RoutingContext) -> FixedLora:
    """The single LoRA equal to ``layer`` under ``context``'s fixed route (see the module docstring)."""
    routing = _route(name, layer, context)
    A, B, scale = layer.experts.A.detach(), layer.experts.B.detach(), layer.scale
    if isinstance(routing, ParameterMixing):
        if layer.expert_map is not None:
            raise LomixError(f"{name}: a merged bank cannot serve a parameter-mixing router")
        a_mix, b_mix = mix_parameters(A, B, routing.weights[:1].to(A.dtype))
        route = {"mixing": routing.weights[0].tolist()}
        return FixedLora(a_mix[0].clone(), b_mix[0] * scale, route=route)
    indices, gates = routing.indices[0], routing.gates[0].double()
    if layer.expert_map is not None:
        mapped = layer.expert_map[indices]
        gates = gates * (mapped >= 0)
        indices = mapped.clamp(min=0)
    summed: dict[int, float] = {}
    for expert, gate in zip(indices.tolist(), gates.tolist(), strict=True):
        summed[expert] = summed.get(expert, 0.0) + gate
    chosen = [(e, g) for e, g in sorted(summed.items()) if g != 0.0] or [(0, 0.0)]
    a = torch.cat([A[e] for e, _ in chosen])
    b = torch.cat([(B[e].double() * (scale * g)).to(B.dtype) for e, g in chosen], dim=1)
    residual = None
    if layer.residual is not None:
        residual = sum(layer.residual.dense(e).double() * (scale * g) for e, g in chosen)
    return FixedLora(a.clone(), b, residual, route={"experts": [e for e, _ in chosen], "gates": [g for _, g in chosen]})


def routing_context_for(**fields) -> RoutingContext:
    """A one-sequence `RoutingContext` from keyword fields (``task_ids=[3]``, ``task_descriptions=[...]``)."""
    task_ids = fields.get("task_ids")
    if task_ids is not None and not isinstance(task_ids, torch.Tensor):
        fields["task_ids"] = torch.as_tensor(task_ids, dtype=torch.long)
    return RoutingContext(**fields)


def fixed_loras(model: nn.Module, context: RoutingContext | None = None, **fields) -> dict[str, FixedLora]:
    """{layer name: FixedLora} of every mixture layer under one fixed route.

    ``context`` (or keyword fields such as ``task_ids=[3]``) is what a batch of ONE sequence would
    tell the routers. Raises `NotFixedRouteError`, naming the options, when a router's choice
    depends on the tokens.
    """
    if getattr(model, "lomix_state", None) is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture to export")
    context = context if context is not None else routing_context_for(**fields)
    return {name: fixed_lora(name, layer, context) for name, layer in mixture_layers(model)}


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else None


def _info(kind: str, loras: dict[str, FixedLora], notes: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": kind,
        "lomix_version": __version__,
        "notes": notes,
        "routes": {name: lora.route for name, lora in loras.items()},
        **extra,
    }


def export_peft(
    model: nn.Module,
    directory: str | Path,
    context: RoutingContext | None = None,
    *,
    base_model_name_or_path: str | None = None,
    **fields,
) -> Path:
    """Write the fixed-route mixture as ONE standard PEFT LoRA (rank k*r, zero-padded to the largest
    layer's rank) that ``peft.PeftModel.from_pretrained`` loads without lomix. Returns the folder."""
    from peft import LoraConfig

    loras = fixed_loras(model, context, **fields)
    with_residual = [name for name, lora in loras.items() if lora.residual is not None]
    if with_residual:
        raise LomixError(
            f"{with_residual[0]} keeps a sparse residual (a compressed mixture), which a LoRA cannot hold; "
            "export it with --format merged, or merge without a residual"
        )
    rank = max(lora.rank for lora in loras.values())
    conv1d = _conv1d_type()
    fan_in_fan_out = conv1d is not None and any(
        isinstance(layer.base_layer, conv1d) for _, layer in mixture_layers(model)
    )
    tensors = {}
    for name, lora in loras.items():
        a = lora.A.new_zeros(rank, lora.A.shape[1])
        b = lora.B.new_zeros(lora.B.shape[0], rank)
        a[: lora.rank], b[:, : lora.rank] = lora.A, lora.B
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
    name_or_path = base_model_name_or_path or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # PEFT scale alpha / r = 1: the lomix scale and the gates are folded into lora_B
        target_modules=sorted(loras),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        task_type=_task_type(model),
        base_model_name_or_path=name_or_path or None,
    )
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        info = _info("peft", loras, [], {"rank": rank})
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return directory


def dense_weight(module: nn.Module) -> torch.Tensor:
    """(d_out, d_in) weight of a linear layer lomix wraps: nn.Linear, GPT-2's Conv1D (stored
    transposed) or a bitsandbytes 4/8-bit layer (dequantized to fp32 by `lomix.quant.dequantized_weight`,
    which refuses a 4-bit weight bitsandbytes repacked for AVX512-BF16 CPU inference)."""
    if quant_kind(module) is not None:
        return dequantized_weight(module)
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.t()
    return module.weight


def export_merged(
    model: nn.Module,
    directory: str | Path,
    context: RoutingContext | None = None,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    **fields,
) -> dict[str, Any]:
    """Fold the fixed-route mixture into the base weights and save a plain transformers checkpoint
    (safetensors; with the tokenizer when given) that ``AutoModelForCausalLM.from_pretrained`` loads
    without lomix. ``model`` is not changed.

    A bitsandbytes 4/8-bit base is dequantized, merged and saved in full precision (``dtype``, by
    default the dtype of the model's input embeddings); the returned info's ``notes`` say so.
    Returns the info written to ``lomix_export.json``.
    """
    disable_cpu_repacking(model)  # a weight bitsandbytes repacked is refused with its name, before any work
    loras = fixed_loras(model, context, **fields)
    conv1d = _conv1d_type()
    quantized = sorted({kind for m in model.modules() if (kind := quant_kind(m))})
    if dtype is None and quantized:
        dtype = model.get_input_embeddings().weight.dtype
    notes = []
    state: dict[str, torch.Tensor] = {}
    handled: list[str] = []
    for name, module in model.named_modules():
        if any(name == h or name.startswith(h + ".") for h in handled) or not name:
            continue
        if isinstance(module, MixtureLinear):
            base = module.base_layer
            folded = dense_weight(base).double() + loras[name].delta().to(base.weight.device)
            target = dtype or (torch.float32 if quant_kind(base) else base.weight.dtype)
            weight = folded.t() if conv1d is not None and isinstance(base, conv1d) else folded
            state[f"{name}.weight"] = weight.to(target).contiguous()
            if getattr(base, "bias", None) is not None:
                state[f"{name}.bias"] = base.bias.detach().to(dtype or base.bias.dtype)
            handled.append(name)
        elif quant_kind(module) is not None:
            state[f"{name}.weight"] = dense_weight(module).to(dtype).contiguous()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().to(dtype)
            handled.append(name)
    for key, value in model.state_dict().items():
        if not any(key.startswith(h + ".") for h in handled):
            state[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if quantized:
        notes.append(
            f"the base was quantized with bitsandbytes ({', '.join(quantized)}): it was dequantized, merged and "
            f"saved in full precision ({str(dtype).removeprefix('torch.')})"
        )
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = type(model)._from_config(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise LomixError(f"internal error: folded state has keys the base model lacks: {unexpected[:3]}")
    if missing:
        raise LomixError(f"internal error: folded state lacks keys of the base model: {missing[:3]}")
    fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    directory = Path(directory)
    info = _info("merged", loras, notes, {"dtype": str(dtype or "as the base").removeprefix("torch.")})
    with atomic_directory(directory) as tmp:
        fresh.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


__all__ = [
    "FixedLora",
    "NotFixedRouteError",
    "dense_weight",
    "export_merged",
    "export_peft",
    "fixed_lora",
    "fixed_loras",
    "routing_context_for",
]
