"""Block routing (``routing_scope: block``): one router per feed-forward block, MixLoRA style.

The router reads the input x of the block's feed-forward module (the parent of the wrapped
``block_modules``: a Llama/Mistral decoder block's ``mlp``, whose input is the post-attention-norm
hidden state) and picks k experts with gates g per token. Expert e's feed-forward is the base one
with LoRA_e on every wrapped projection, and the block computes

    FFN(x) = sum_j g_j FFN_{e_j}(x),    FFN_e = down_e(act(gate_e x) * up_e x),  W_e = W + s B_e A_e,

which is exactly a native mixture-of-experts block (Mixtral's ``w1/w3/w2``), so such a mixture can
leave lomix as a Mixtral checkpoint (`lomix.export_moe`).

How: a pre-hook on the feed-forward module routes x once and gives the module k copies of each
token, x (..., d) -> (..., k, d): slot j of token t is served by expert e_tj alone, with gate 1, in
every wrapped projection (a feed-forward module maps each token on its own, so the extra dimension
passes through its element-wise activation). A forward hook then reduces the module's output
(..., k, d_out) -> (..., d_out) with the gates. The router module itself lives on the block's first
wrapped projection (the "owner"; saved with it); the others reference it. The layers only see a
`TokenRouting` with one expert per row, so every router and kernel backend works unchanged.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError, RoutingError
from .routing import ContextHolder, TokenRouting

if TYPE_CHECKING:
    from .config import MixtureConfig
    from .layer import MixtureLinear


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_block_member(config: MixtureConfig, name: str) -> bool:
    """Whether target ``name`` shares its block's router under ``config``."""
    return config.routing_scope == "block" and _matches(name, config.block_modules)


def layer_config(config: MixtureConfig, name: str) -> MixtureConfig:
    """The config target ``name`` is built with: ``config`` itself, or for a target outside the
    block modules of a block-routed mixture, the same mixture with ``layer_router`` as its router."""
    if config.routing_scope != "block" or is_block_member(config, name):
        return config
    if config.layer_router is None:
        raise ConfigError(
            "layer_router",
            f"target {name!r} is not one of block_modules {config.block_modules} and routing_scope is block: "
            "give it a router of its own (e.g. {name: fixed, experts: [0], weights: [1.0]}, a non-routed LoRA) "
            "or leave it out of target_modules",
        )
    return dataclasses.replace(config, router=config.layer_router, routing_scope="layer", layer_router=None)


class _SlotState(threading.local):
    routing: TokenRouting | None = None  # the router's decision for the block's current call, (N, k)
    slots: TokenRouting | None = None  # one expert per (token, slot) row, gate 1, (N * k, 1)


class SharedRouting:
    """The router of one feed-forward block and the routing of its current call, shared by the
    block's mixture layers (``MixtureLinear.shared_routing``). Per thread, like `ContextHolder`."""

    def __init__(self, block: str, owner: MixtureLinear, members: list[MixtureLinear], context: ContextHolder):
        self.block = block
        self.owner = owner.layer_name
        self.router = owner.router
        self.members = [m.layer_name for m in members]
        self._owner_layer = [owner]  # a list: not a registered submodule of anything
        self._context = context
        self._state = _SlotState()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ---- the feed-forward module's hooks
    def attach(self, module: nn.Module) -> None:
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: nn.Module, args: tuple) -> tuple | None:
        state = self._state
        state.routing = state.slots = None
        if self._owner_layer[0].disabled:
            return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise RoutingError(f"{self.block}: block routing needs the hidden states as the first positional argument")
        x = args[0]
        if x.shape[-1] != self.router.d_in:
            raise RoutingError(
                f"{self.block}: the block router reads {self.router.d_in} features (the input of {self.owner}) "
                f"but the block's input has {x.shape[-1]}; block_modules must be the projections of one "
                "feed-forward module whose first one reads its input"
            )
        routing = self.router(x, self._context.get())
        if not isinstance(routing, TokenRouting):
            raise RoutingError(
                f"{self.block}: router {self.router.name!r} returned {type(routing).__name__}; block routing "
                "needs a token router (TokenRouting)"
            )
        k = routing.k
        state.routing = routing
        state.slots = TokenRouting(
            indices=routing.indices.reshape(-1, 1), gates=routing.gates.new_ones(routing.num_tokens * k, 1)
        )
        return (x.unsqueeze(-2).expand(*x.shape[:-1], k, x.shape[-1]), *args[1:])

    def _after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        state = self._state
        routing = state.routing
        state.routing = state.slots = None
        if routing is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise RoutingError(f"{self.block}: block routing needs a feed-forward module that returns one tensor")
        gates = routing.gates.reshape(*output.shape[:-2], routing.k, 1).to(output.dtype)
        return (output * gates).sum(dim=-2)

    # ---- what a member layer routes by
    def route(self, layer: MixtureLinear, x: torch.Tensor) -> tuple[TokenRouting, TokenRouting]:
        """(the routing ``layer`` computes with: one expert per row, gate 1; the routing it records:
        the router's own for the owner, without losses, probabilities or log-probabilities for the
        others, so that each block counts its balance loss and its selection once)."""
        state = self._state
        slots, routing = state.slots, state.routing
        if slots is None or routing is None:
            raise RoutingError(
                f"{layer.layer_name} ran outside a call of its block {self.block!r}, whose router it shares "
                "(routing_scope: block)"
            )
        rows = x.numel() // layer.d_in
        if rows != slots.num_tokens:
            raise RoutingError(
                f"{layer.layer_name}: sees {rows} rows but its block's routing has {slots.num_tokens} "
                f"({routing.num_tokens} tokens x {routing.k} slots)"
            )
        if layer.layer_name == self.owner:
            return slots, routing
        return slots, TokenRouting(indices=routing.indices, gates=routing.gates)


def share_block_routing(
    layers: dict[str, MixtureLinear], model: nn.Module, config: MixtureConfig, context: ContextHolder
) -> None:
    """Group the block-routed ``layers`` (in model order) by their parent module, give each group its
    first layer's router (the others drop their own) and hook the parent. No-op for per-layer routing."""
    groups: dict[str, list[MixtureLinear]] = {}
    for name, layer in layers.items():
        if is_block_member(config, name):
            groups.setdefault(name.rpartition(".")[0], []).append(layer)
    for block, members in groups.items():
        owner = members[0]
        shared = SharedRouting(block, owner, members, context)
        for layer in members:
            if layer is not owner:
                del layer.router  # built with the layer; the block's router replaces it, unregistered
                object.__setattr__(layer, "router", owner.router)
            layer.shared_routing = shared
        shared.attach(model.get_submodule(block) if block else model)


def block_routers(model: nn.Module) -> dict[str, SharedRouting]:
    """{feed-forward module name: its `SharedRouting`} of a block-routed model (empty otherwise)."""
    from .inject import mixture_layers

    found: dict[str, SharedRouting] = {}
    for _, layer in mixture_layers(model):
        if layer.shared_routing is not None:
            found.setdefault(layer.shared_routing.block, layer.shared_routing)
    return found


__all__ = ["SharedRouting", "block_routers", "is_block_member", "layer_config", "share_block_routing"]
