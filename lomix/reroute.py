"""Test-time rerouting ("Rewiring Experts on the Fly", docs/methods.md, "Test-time rerouting").

Before generating, optimise one additive vector delta_l (size E, one per sequence) per selected
mixture layer, added to that layer's router logits, on the sequence's own next-token loss, for a
few Adam steps; the experts, the routers and the base model stay frozen (their parameters are never
written). Then generate with the offsets, optionally adapting them again every N generated tokens
on the sequence seen so far. The offsets live in forward hooks on the routers and are removed when
the block ends: the model is exactly as it was.

    with lomix.reroute.rerouted(model, prompt_ids, steps=5, lr=0.1) as offsets:
        out = model.generate(prompt_ids, max_new_tokens=32)         # routed with the offsets
    ids = lomix.reroute.generate(model, prompt_ids, steps=5, every=16, max_new_tokens=64)

It applies to any router that produces logits and declares how it routes from them
(`Router.route_logits`); the offset logits go through the router's own selection and gate rule.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, LomixError, RoutingError
from .inject import mixture_layers, routing_context
from .routing import TokenRouting


class RouterOffsets:
    """Additive router-logit offsets: ``offsets[layer]`` (B, E) float32 per selected mixture layer.

    Row b is added to the logits of every token of sequence b (a row count of 1 applies to every
    sequence). Installed as forward hooks on the routers by `install`, removed by `remove`.
    """

    def __init__(self, model: nn.Module, batch: int = 1, layers: Sequence[str] | None = None):
        chosen = [(name, layer) for name, layer in mixture_layers(model) if _selected(name, layers)]
        if not chosen:
            raise ConfigError(
                "reroute.layers", f"select no mixture layer of the model (patterns: {list(layers or [])})"
            )
        self.routers = {name: layer.router for name, layer in chosen}
        self.offsets = {
            name: torch.zeros(batch, layer.router.num_experts, device=layer.experts.A.device, requires_grad=True)
            for name, layer in chosen
        }
        self._handles: list[Any] = []

    def parameters(self) -> list[torch.Tensor]:
        return list(self.offsets.values())

    def install(self) -> None:
        for name, router in self.routers.items():
            self._handles.append(router.register_forward_hook(_offset_hook(self.offsets[name])))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _selected(name: str, patterns: Sequence[str] | None) -> bool:
    """All layers without patterns; else those whose name matches a glob or ends with a pattern."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) or name.endswith(f".{p}") for p in patterns)


def _offset_hook(delta: torch.Tensor):
    def hook(router: nn.Module, args: tuple, routing: Any) -> TokenRouting:
        x, context = args[0], args[1]
        logits = routing.logits if isinstance(routing, TokenRouting) else None
        if logits is None:
            raise RoutingError(
                f"test-time rerouting needs router logits; router {router.name!r} produces none (use a router that "
                "routes from logits, such as topk)"
            )
        rows = delta.shape[0]
        if rows == 1:
            shifted = logits + delta
        elif logits.shape[0] % rows == 0:
            shifted = (logits.view(rows, -1, logits.shape[-1]) + delta[:, None]).reshape(logits.shape)
        else:
            raise RoutingError(f"rerouting offsets for {rows} sequences, but the batch routes {logits.shape[0]} tokens")
        rerouted = router.route_logits(shifted, x, context)
        if rerouted is None:
            raise RoutingError(
                f"test-time rerouting: router {router.name!r} does not declare how it routes from logits "
                "(Router.route_logits); use a router that does, such as topk"
            )
        return rerouted

    return hook


def sequence_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **routing
) -> torch.Tensor:
    """Mean next-token cross-entropy of the sequences themselves (padding masked out)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    logits = model(input_ids=input_ids, attention_mask=mask, **routing).logits[:, :-1]
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)


def adapt(
    model: nn.Module,
    offsets: RouterOffsets,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int,
    lr: float = 0.1,
    **routing: Any,
) -> list[float]:
    """Run ``steps`` Adam steps on the offsets only, minimising `sequence_loss`; returns the loss
    before each step. Gradients go to the offsets alone (no parameter's ``.grad`` is touched)."""
    if steps < 0:
        raise ConfigError("reroute.steps", f"must be >= 0, got {steps}")
    if not lr > 0:
        raise ConfigError("reroute.lr", f"must be > 0, got {lr}")
    tensors = offsets.parameters()
    optimizer = torch.optim.Adam(tensors, lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = sequence_loss(model, input_ids, attention_mask, **routing)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for tensor, grad in zip(tensors, grads, strict=True):
                tensor.grad = torch.zeros_like(tensor) if grad is None else grad
            optimizer.step()
            losses.append(float(loss.detach()))
    for tensor in tensors:
        tensor.grad = None
    return losses


@contextlib.contextmanager
def rerouted(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int,
    lr: float = 0.1,
    layers: Sequence[str] | None = None,
    **routing: Any,
) -> Iterator[RouterOffsets]:
    """Inside the block every forward is routed with offsets adapted on ``input_ids`` (one row per
    sequence, or one row shared when ``input_ids`` holds one sequence); ``routing`` holds the
    batch's routing keywords (task_ids, task_descriptions). The offsets are removed on exit."""
    if getattr(model, "lomix_state", None) is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture; rerouting changes mixture routers")
    offsets = RouterOffsets(model, input_ids.shape[0], layers)
    offsets.install()
    try:
        adapt(model, offsets, input_ids, attention_mask, steps=steps, lr=lr, **routing)
        yield offsets
    finally:
        offsets.remove()


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int,
    lr: float = 0.1,
    every: int = 0,
    layers: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    routing: dict[str, Any] | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``model.generate`` with offsets adapted at prefill and, with ``every`` > 0, again on the whole
    sequence so far after every ``every`` new tokens (each chunk is generated from a fresh prefill).
    ``routing`` is the batch's routing keywords; ``generate_kwargs`` go to ``model.generate``.
    Returns the sequences (B, prompt + new tokens), as ``model.generate`` does."""
    if every < 0:
        raise ConfigError("reroute.every", f"must be >= 0, got {every}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    offsets = RouterOffsets(model, input_ids.shape[0], layers)
    offsets.install()
    try:
        with routing_context(model, **routing) if routing else contextlib.nullcontext():
            return _generate_in_chunks(
                model, offsets, input_ids, mask, steps, lr, every, max_new_tokens, generate_kwargs
            )
    finally:
        offsets.remove()


def _generate_in_chunks(model, offsets, sequences, mask, steps, lr, every, left, generate_kwargs) -> torch.Tensor:
    while True:
        adapt(model, offsets, sequences, mask, steps=steps, lr=lr)
        chunk = left if every == 0 else min(every, left)
        out = model.generate(input_ids=sequences, attention_mask=mask, max_new_tokens=chunk, **generate_kwargs)
        new = out.shape[1] - sequences.shape[1]
        mask = torch.cat([mask, torch.ones_like(out[:, sequences.shape[1] :])], dim=1)
        sequences, left = out, left - new
        if left <= 0 or new < chunk:  # the budget is spent, or every sequence stopped
            return sequences


__all__ = ["RouterOffsets", "adapt", "generate", "rerouted", "sequence_loss"]
