"""Export a block-routed mixture as a native mixture-of-experts checkpoint (Mixtral, Qwen3-MoE).

A mixture with ``routing_scope: block`` computes, in each decoder block's feed-forward,
``sum_j g_j FFN_{e_j}(x)`` with ``FFN_e`` the base feed-forward whose projections carry LoRA_e
(`lomix.block_routing`). With a Llama/Mistral-family base that is Mixtral's sparse MoE block:

    w1_e = W_gate + s B_gate,e A_gate,e    w3_e = W_up + s B_up,e A_up,e    w2_e = W_down + s B_down,e A_down,e
    gate = the block's router weight (E, d)

provided the router's rule is Mixtral's: a bias-free linear map of the post-attention RMSNorm
output, softmax over ALL experts in fp32, top-k, the k kept probabilities renormalised (transformers
and llama.cpp both compute exactly this). The router is asked through the contract
(`Router.softmax_topk_rule`, in eval mode) and anything else is refused with the reason.

Attention projections with a non-routed adapter (a fixed route, e.g. the ``fixed`` router) are
merged into the attention weights; a block whose feed-forward carries no mixture becomes E copies
of its feed-forward under a zero router (uniform probabilities: the k renormalised gates sum the
same feed-forward back to itself).

A Qwen3 base exports the same way as a ``Qwen3MoeForCausalLM`` (its router rule is the same with
``norm_topk_prob`` = whether the router renormalises, so raw top-k gates are exact there too; the
attention, q/k norms included, is Qwen3's). Qwen2 bases are refused: Qwen2-MoE's block always adds a
sigmoid-gated shared expert that a lomix mixture lacks.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .atomic import atomic_directory
from .block_routing import block_routers
from .errors import LomixError
from .export import EXPORT_INFO_NAME, NotFixedRouteError, dense_weight, fixed_lora
from .inject import mixture_layers
from .layer import MixtureLinear
from .quant import disable_cpu_repacking
from .routing import RoutingContext

# base model_type -> the native MoE model_type it exports to
TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}
FAMILIES = tuple(TARGETS)
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")  # Mixtral's w1, w3, w2
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
REFUSED_FAMILIES = {
    "qwen2": "Qwen2-MoE, its native MoE form, always adds a sigmoid-gated shared expert that a lomix mixture lacks",
}
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "sliding_window",
)


class MoeExportError(LomixError, ValueError):
    """The mixture does not compute what a native MoE checkpoint computes; the message says why."""


def _base_config(model: nn.Module):
    """(the base's config, the MoE model_type it exports to), or the refusal naming why it cannot."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in TARGETS:
        reason = REFUSED_FAMILIES.get(str(family), f"a {family or type(model).__name__!r} base has no native MoE form")
        raise MoeExportError(f"--format moe: {reason}; supported bases: {', '.join(FAMILIES)}")
    target = TARGETS[family]
    sliding = getattr(config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(config, "layer_types", None) or []
    )
    if target == "mixtral":
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(config, flag, False):
                raise MoeExportError(f"--format moe: the base has {flag}=true; Mixtral's projections have no biases")
        if getattr(config, "pretraining_tp", 1) != 1:
            raise MoeExportError("--format moe: the base has pretraining_tp != 1, which Mixtral does not compute")
    elif sliding:
        raise MoeExportError(
            "--format moe: the Qwen3 base has sliding-window layers, which Qwen3-MoE applies differently"
        )
    return config, target


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return name, module
    raise MoeExportError(f"--format moe: found no decoder layers in {type(model).__name__}")


def _router_rule(block: str, router: nn.Module, target: str):
    """(weight (E, d), k, renormalize) of the block's router in eval mode, or the refusal naming the mismatch."""
    was_training = router.training
    router.eval()
    try:
        rule, why = router.softmax_topk_rule(), router.softmax_topk_mismatch()
    finally:
        router.train(was_training)
    native = "the native MoE gate is a bias-free linear softmax over all experts, top-k"
    if rule is None:
        raise MoeExportError(f"{block}: {why}; {native}")
    if target == "mixtral" and not rule.renormalize:
        raise MoeExportError(
            f"{block}: router {router.name!r} keeps the raw top-k probabilities as gates (renormalize false); "
            f"Mixtral always renormalises the k kept"
        )
    return rule.weight, rule.k, rule.renormalize


def _expert_weight(layer: nn.Module, expert: int) -> torch.Tensor:
    """(d_out, d_in) float64 weight of router expert ``expert`` in one FFN projection."""
    if not isinstance(layer, MixtureLinear):
        return dense_weight(layer).detach().double()
    if layer.disabled:
        raise MoeExportError(f"{layer.layer_name}: the mixture is disabled (lomix.disabled); export outside that block")
    bank = expert
    if layer.expert_map is not None:
        bank = int(layer.expert_map[expert])
        if bank < 0:
            raise MoeExportError(
                f"{layer.layer_name}: the merged bank dropped router expert {expert} (MC-SMoE); a native MoE model has "
                "no dropped experts: export a merge that keeps every expert, or the unmerged run"
            )
    base = dense_weight(layer.base_layer).detach().double()
    A, B = layer.experts.A[bank].detach().double(), layer.experts.B[bank].detach().double()
    weight = base + layer.scale * (B @ A).to(base.device)
    if layer.residual is not None:
        weight = weight + layer.scale * layer.residual.dense(bank).detach().double().to(base.device)
    return weight


def moe_state(model: nn.Module, target: str = "mixtral") -> tuple[dict[str, torch.Tensor], tuple, dict[str, Any]]:
    """(the native MoE state dict in float64, (E, k, renormalize), routes of the merged non-routed
    layers) of a block-routed ``model``; raises `MoeExportError` naming the first mismatch."""
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture to export")
    config = state.config
    if config.routing_scope != "block":
        raise MoeExportError(
            "--format moe: the mixture routes per layer (routing_scope: layer), every projection on its own input; "
            "a native MoE model has one router per block reading the feed-forward input: train with "
            "routing_scope: block"
        )
    layers_name, layers = _decoder_layers(model)
    prefix = f"{layers_name}."
    shared = block_routers(model)
    ffn_blocks = {f"{prefix}{i}.mlp" for i in range(len(layers))}
    stray = sorted(set(shared) - ffn_blocks)
    if stray:
        raise MoeExportError(
            f"{stray[0]}: a block router outside the decoder blocks' feed-forward (mlp); a native MoE model routes "
            "only the feed-forward (block_modules: gate_proj, up_proj, down_proj)"
        )
    rules = {block: _router_rule(block, routing.router, target) for block, routing in shared.items()}
    shapes = {(weight.shape[0], k, renormalize) for weight, k, renormalize in rules.values()}
    if not shapes:
        raise MoeExportError("--format moe: no decoder block's feed-forward carries a block-routed mixture")
    if len(shapes) > 1:
        raise MoeExportError(
            f"--format moe: blocks differ in (experts, k, renormalize) {sorted(shapes)}; a native MoE model has "
            "one of each"
        )
    num_experts, k, renormalize = shapes.pop()
    routes: dict[str, Any] = {}
    attention: dict[str, torch.Tensor] = {}
    for name, layer in mixture_layers(model):
        if layer.shared_routing is not None:
            continue
        if not name.startswith(prefix) or ".self_attn." not in name:
            raise MoeExportError(
                f"{name}: a mixture layer outside the decoder blocks' attention and feed-forward; a native MoE "
                "model can hold non-routed adapters on the attention projections only"
            )
        try:
            lora = fixed_lora(name, layer, RoutingContext())
        except NotFixedRouteError:
            raise MoeExportError(
                f"{name}: router {layer.router.name!r} routes the attention projection per token; the MoE model's "
                "attention is dense: give attention a fixed route (layer_router: {name: fixed, ...}) or no adapter"
            ) from None
        base = dense_weight(layer.base_layer).detach().double()
        attention[f"{name}.weight"] = base + lora.delta().to(base.device)
        if getattr(layer.base_layer, "bias", None) is not None:
            attention[f"{name}.bias"] = layer.base_layer.bias.detach()
        routes[name] = lora.route
    wrapped = tuple(f"{n}." for n, _ in mixture_layers(model))
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".mlp." in key or key.startswith(wrapped):
            continue  # feed-forwards and wrapped layers are rebuilt below
        out[key] = value.detach()
    out.update(attention)
    for i, block_layer in enumerate(layers):
        block = f"{prefix}{i}.mlp"
        mlp = block_layer.mlp
        projections = [getattr(mlp, p, None) for p in FFN_NAMES]
        if any(p is None for p in projections):
            raise MoeExportError(f"{block}: expected the projections {', '.join(FFN_NAMES)} of a Llama feed-forward")
        w1, w3, w2 = ([_expert_weight(p, e) for e in range(num_experts)] for p in projections)
        out[f"{block}.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(w1, w3, strict=True)])
        out[f"{block}.experts.down_proj"] = torch.stack(w2)
        if block in rules:
            out[f"{block}.gate.weight"] = rules[block][0].detach().double()
        else:  # no mixture here: E copies of the feed-forward under uniform gates
            out[f"{block}.gate.weight"] = torch.zeros(num_experts, w1[0].shape[1], dtype=torch.float64)
    return out, (num_experts, k, renormalize), routes


def moe_config(base_config, target: str, num_experts: int, k: int, renormalize: bool = True):
    """The config of the native MoE model (``target``: mixtral or qwen3_moe) of ``base_config`` with
    E experts and top-k routing."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    fields = {name: getattr(base_config, name) for name in CONFIG_FIELDS if hasattr(base_config, name)}
    fields.setdefault("head_dim", base_config.hidden_size // base_config.num_attention_heads)
    fields = copy.deepcopy(fields)
    if target == "qwen3_moe":
        fields["sliding_window"] = None  # refused above when the base has sliding layers
        return Qwen3MoeConfig(
            **fields,
            attention_bias=bool(getattr(base_config, "attention_bias", False)),
            use_sliding_window=False,
            num_experts=num_experts,
            num_experts_per_tok=k,
            moe_intermediate_size=base_config.intermediate_size,
            norm_topk_prob=renormalize,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            architectures=["Qwen3MoeForCausalLM"],
        )
    fields.setdefault("sliding_window", None)
    return MixtralConfig(
        **fields,
        num_local_experts=num_experts,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )


def copy_tokenizer_files(source: str | Path, directory: Path) -> list[str]:
    """Copy the tokenizer files of folder ``source`` unchanged into ``directory``; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.is_file():
            shutil.copyfile(path, directory / name)
            copied.append(name)
    return copied


def export_moe(
    model: nn.Module,
    directory: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Write the block-routed mixture of ``model`` as a native MoE checkpoint (config.json +
    model.safetensors) that transformers and llama.cpp load without lomix: ``MixtralForCausalLM``
    for a Llama/Mistral-family base, ``Qwen3MoeForCausalLM`` for a Qwen3 base. Tokenizer files are
    copied unchanged from ``tokenizer_dir``, or saved from ``tokenizer`` when no folder holds them.
    ``dtype``: of the written weights (default: the base's embedding dtype; a quantized base is
    dequantized). Returns the ``lomix_export.json`` info. Raises `MoeExportError` naming why the
    mixture cannot be a native MoE model."""
    from transformers import AutoModelForCausalLM

    base_config, target = _base_config(model)
    disable_cpu_repacking(model)
    state, (num_experts, k, renormalize), routes = moe_state(model, target)
    dtype = dtype or model.get_input_embeddings().weight.dtype
    config = moe_config(base_config, target, num_experts, k, renormalize)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    cast = {key: value.to(dtype).contiguous() if value.is_floating_point() else value for key, value in state.items()}
    if config.tie_word_embeddings:
        cast.pop("lm_head.weight", None)
    missing, unexpected = fresh.load_state_dict(cast, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if unexpected or missing:
        raise LomixError(
            f"internal error: the MoE state does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    fresh.tie_weights()
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        fresh.generation_config = copy.deepcopy(generation)
    info = {
        "format": "moe",
        "architecture": config.architectures[0],
        "lomix_version": __version__,
        "num_experts": num_experts,
        "experts_per_token": k,
        "renormalize": renormalize,
        "dtype": str(dtype).removeprefix("torch."),
        "routes": routes,
        "notes": [],
    }
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        fresh.save_pretrained(str(tmp))
        copied = copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir is not None else []
        if not copied and tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            info["notes"].append("no tokenizer files in the base folder: the loaded tokenizer was saved instead")
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


__all__ = ["MoeExportError", "export_moe", "moe_config", "moe_state"]
