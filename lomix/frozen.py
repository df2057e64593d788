"""Changes to a model that holds a mixture: frozen expert factors written in, router fields changed
in place, the mixture switched off for a block. Shared by the GLIDER library, the PEFT-experts
loader, LoRA-Mixer's stages and the recipes.

    lomix.inject_frozen_experts(model, config, [{"model.layers.0.self_attn.q_proj": (A, B, 2.0)}, ...])
    lomix.update_router(model, k=3)                 # every layer and the saved config
    with lomix.disabled(model): base_logits = model(**batch).logits
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import MixtureConfig
from .errors import LomixError
from .inject import eject, inject, mixture_layers
from .layer import MixtureLinear
from .routers import RouterConfig

ExpertFactors = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
"""One expert: module name -> (A of shape (r_j, d_in), B of shape (d_out, r_j), its own LoRA scale s_j)."""


def inject_frozen_experts(
    model: nn.Module,
    config: MixtureConfig,
    experts: Sequence[ExpertFactors],
    *,
    freeze_routers: bool = False,
    fill: Callable[[dict[str, MixtureLinear]], None] | None = None,
) -> dict[str, MixtureLinear]:
    """Inject ``config`` into ``model`` with expert j holding the factors ``experts[j]``, frozen.

    Every expert starts at zero, so a module an expert does not adapt has a zero expert there
    (exactly like that adapter). Ranks r_j <= ``config.rank`` are zero-padded (exact: B_pad A_pad =
    B A), and each expert's own scale s_j is folded into its B as s_j / s with s the mixture's
    scale, so expert j's delta is s_j B_j A_j. ``config`` should set ``alpha = rank`` (s = 1).

    ``fill(layers)`` runs under ``torch.no_grad()`` after the factors are written (a router's own
    state: GLIDER's gate vectors). ``freeze_routers`` freezes the routers too (inference only);
    otherwise they stay trainable. On any error the model is ejected, as it was. Returns the
    mixture layers by module name.
    """
    inject(model, config)
    try:
        layers = dict(mixture_layers(model))
        with torch.no_grad():
            for layer in layers.values():
                layer.experts.A.zero_()
                layer.experts.B.zero_()
            for j, factors in enumerate(experts):
                for module, (lora_a, lora_b, scale) in factors.items():
                    layers[module].experts.load_expert(j, lora_a, lora_b, scale / layers[module].scale)
            if fill is not None:
                fill(layers)
        for layer in layers.values():
            layer.experts.requires_grad_(False)
            if freeze_routers:
                layer.router.requires_grad_(False)
        assert all(math.isclose(layer.scale, 1.0) for layer in layers.values())
    except BaseException:
        eject(model)
        raise
    return layers


def update_router(model: nn.Module, **fields: Any) -> RouterConfig:
    """Change the router config fields ``fields`` (``k=3``, ``stage="soft"``) of every mixture layer
    and of the model's saved config, in place; router weights stay. Returns the new router config.

    The new config is validated like a loaded one (`MixtureConfig`'s checks included).
    """
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture; call lomix.inject or lomix.load first")
    config = dataclasses.replace(state.config.router, **fields)
    config.validate(state.config.num_experts)
    state.config = dataclasses.replace(state.config, router=config)
    own = state.config.layer_router  # block routing: the other targets' own router keeps its config
    for _, layer in mixture_layers(model):
        if own is None or layer.router.config is not own:
            layer.router.config = config
    return config


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the frozen base alone inside the block (every mixture layer returns W x); restored after,
    also on error."""
    layers = [layer for _, layer in mixture_layers(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


__all__ = ["ExpertFactors", "disabled", "inject_frozen_experts", "update_router"]
