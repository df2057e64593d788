"""LoRA-Mixer (METHODS.md section 2) around the ``loramixer`` router: targets, stages, the hard stage's optimizer guard.

    model = lomix.inject(model, lomix.loramixer.mixer_config(model, num_experts=3))   # hard stage
    lomix.loramixer.freeze_unrouted_experts(model, optimizer)  # expert j moves only on domain j
    ... train with task_ids=domain ids ...
    lomix.loramixer.set_router(model, stage="soft", sbl_alpha=0.01)   # then train the router
    lomix.loramixer.freeze_experts(model)

The routed experts sit "in series" inside the attention input projections (q, k, v) and the output
projection (o): the routed sum is part of each projection's output, which flows straight into
attention. `serial_targets` finds those projections by name, and the input/output projections
(``in_proj``, ``out_proj``) of SSM blocks (Mamba), in any model whose projections are linear layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lomix.config import BalanceConfig, MixtureConfig
from lomix.errors import LomixError, TargetModulesNotFoundError
from lomix.frozen import update_router
from lomix.inject import mixture_layers
from lomix.layer import linear_dims
from lomix.methods.loramixer.router import LoRAMixerRouter, LoRAMixerRouterConfig, specialization_balance_loss
from lomix.routers import router_config

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SSM_PROJECTIONS = ("in_proj", "out_proj")


def _linear_names(model: nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        try:
            linear_dims(module, name)
        except LomixError:
            continue
        names.add(name.rsplit(".", 1)[-1])
    return names


def serial_targets(model: nn.Module, groups: Sequence[Sequence[str]] = (ATTENTION_PROJECTIONS, SSM_PROJECTIONS)):
    """The projection names LoRA-Mixer wraps in ``model``: q/k/v/o of attention blocks and in/out of
    SSM blocks, those the model has as linear layers (a hybrid model gets both).

    Raises `TargetModulesNotFoundError` listing the model's linear layers when it has none of them.
    """
    present = _linear_names(model)
    found = [name for group in groups for name in group if name in present]
    if not found:
        wanted = ", ".join(name for group in groups for name in group)
        raise TargetModulesNotFoundError(
            "target_modules",
            f"{type(model).__name__} has no linear projection named {wanted}; its linear layers are named: "
            f"{', '.join(sorted(present)) or '(none)'}. Name the projections in mixture.target_modules",
        )
    return found


def mixer_config(model: nn.Module, num_experts: int, *, router: dict[str, Any] | None = None, **fields):
    """A `MixtureConfig` for LoRA-Mixer on ``model``: the serial projections, a ``loramixer`` router
    (``router`` holds its fields, default the hard stage) and no Switch loss (the router's SBL replaces it).
    ``fields`` are other `MixtureConfig` fields (rank, alpha, ...)."""
    fields.setdefault("target_modules", serial_targets(model))
    fields.setdefault("balance", BalanceConfig(switch=0.0))
    return MixtureConfig(
        num_experts=num_experts, router=router_config("loramixer", **{"stage": "hard", **(router or {})}), **fields
    )


def _mixer_layers(model: nn.Module) -> list:
    layers = [layer for _, layer in mixture_layers(model) if isinstance(layer.router, LoRAMixerRouter)]
    if not layers:
        raise LomixError(f"{type(model).__name__} holds no mixture layer with a loramixer router")
    return layers


def set_router(model: nn.Module, **fields: Any) -> LoRAMixerRouterConfig:
    """Change the loramixer routers' config fields (``stage="soft"``, ``k=3``, ...) in place, for every
    layer and in the model's saved config; the router weights stay. Returns the new router config."""
    layers = _mixer_layers(model)
    config = update_router(model, **fields)
    for layer in layers:
        layer.router.used.zero_()
    return config


def freeze_experts(model: nn.Module) -> None:
    """Freeze every expert of the loramixer layers: only the routers train (the soft stage, plug-and-play)."""
    for layer in _mixer_layers(model):
        layer.experts.requires_grad_(False)


class _Handles:
    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def freeze_unrouted_experts(model: nn.Module, optimizer: torch.optim.Optimizer) -> _Handles | None:
    """Make an optimizer step leave alone the experts the hard stage routed no token to.

    Experts are stacked (one A and one B tensor per layer), so an expert that got no token still
    has a zero gradient row, and Adam's momentum or weight decay would move it. Before each step
    this saves the rows of the unrouted experts (parameters and every optimizer-state tensor of the
    parameter's shape, e.g. Adam's moments) and restores them after, so expert j changes only on
    steps whose batch held domain j and its moments see only those steps. (Adam's step counter,
    one per tensor, still counts every step: its bias correction is that of the global step.)
    Under torch.distributed the routed experts are combined over processes first.

    Layers in the soft stage are untouched. Returns a handle whose ``remove()`` undoes this, or None
    when the model has no loramixer router. ``optimizer`` may be accelerate's wrapper.
    """
    layers = [layer for _, layer in mixture_layers(model) if isinstance(layer.router, LoRAMixerRouter)]
    if not layers:
        return None
    inner = getattr(optimizer, "optimizer", optimizer)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def shaped(state: dict, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}

    def before(opt, args, kwargs) -> None:
        saved.clear()
        for layer in layers:
            if layer.router.config.stage != "hard":
                continue
            used = layer.router.used
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                combined = used.to(torch.int32)
                torch.distributed.all_reduce(combined, op=torch.distributed.ReduceOp.MAX)
                used = combined.bool()
            frozen = ~used
            if frozen.any():
                for param in layer.experts.parameters():
                    if param.requires_grad:
                        state = shaped(opt.state.get(param, {}), param)
                        kept = {k: v[frozen].clone() for k, v in state.items()}
                        saved.append((param, frozen, param.detach()[frozen].clone(), kept))
            layer.router.used.zero_()

    def after(opt, args, kwargs) -> None:
        with torch.no_grad():
            for param, frozen, values, kept in saved:
                param[frozen] = values
                for key, tensor in shaped(opt.state.get(param, {}), param).items():
                    tensor[frozen] = kept[key] if key in kept else 0  # state born this step: as if never stepped
        saved.clear()

    return _Handles([inner.register_step_pre_hook(before), inner.register_step_post_hook(after)])


def expert_histogram(stats_summary: dict[str, dict[str, Any]]) -> list[float]:
    """Mean expert load over layers from a `lomix.RoutingStats` summary: the fraction of tokens whose
    selection includes each expert, averaged over the layers."""
    loads = [torch.tensor(s["load"], dtype=torch.float64) for s in stats_summary.values() if "load" in s]
    if not loads:
        raise LomixError("the routing statistics hold no token-routed layer")
    return torch.stack(loads).mean(0).tolist()


__all__ = [
    "ATTENTION_PROJECTIONS",
    "SSM_PROJECTIONS",
    "LoRAMixerRouterConfig",
    "expert_histogram",
    "freeze_experts",
    "freeze_unrouted_experts",
    "mixer_config",
    "serial_targets",
    "set_router",
    "specialization_balance_loss",
]
