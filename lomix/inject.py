"""Turn a frozen model into a mixture: find the target modules, wrap them, freeze the rest."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import pretrained
from .block_routing import layer_config, share_block_routing
from .config import MixtureConfig
from .errors import LomixError, TargetModulesNotFoundError, TargetNotCalledError
from .layer import MixtureLinear, linear_dims
from .quant import disable_cpu_repacking
from .routers import Router
from .routing import CONTEXT_KWARGS, ContextHolder, RoutingContext

logger = logging.getLogger(__name__)


@dataclass
class LomixState:
    """What `inject` attaches to a model (as ``model.lomix_state``)."""

    config: MixtureConfig
    context: ContextHolder
    hook: torch.utils.hooks.RemovableHandle
    requires_grad_before: dict[str, bool]
    tokenizer: Any = None
    """The tokenizer ``model.save_pretrained`` writes beside the mixture when it is given none."""


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {100 * self.fraction:.4f}"
        )


def _matches(name: str, patterns: Sequence[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _linear_like(module: nn.Module) -> bool:
    try:
        linear_dims(module)
    except LomixError:
        return False
    return True


def find_targets(model: nn.Module, config: MixtureConfig) -> list[str]:
    """Names of the modules ``config`` targets, in model order.

    Raises `TargetModulesNotFoundError` naming every listed target that matches nothing, with the
    names of the model's linear layers to choose from; `UnsupportedModuleError` for a match that
    is not a linear layer.
    """
    names = [name for name, _ in model.named_modules() if name]
    selected = [n for n in names if _matches(n, config.target_modules)]
    if isinstance(config.target_modules, str):
        unmatched = [] if selected else [config.target_modules]
    else:
        unmatched = [t for t in config.target_modules if not any(_matches(n, [t]) for n in names)]
    if unmatched:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _linear_like(m)})
        raise TargetModulesNotFoundError(
            "target_modules",
            f"{', '.join(repr(u) for u in unmatched)} matched no module of {type(model).__name__}; "
            f"its linear layers are named: {', '.join(available) or '(none)'}",
        )
    selected = [n for n in selected if not _matches(n, config.exclude_modules)]
    if not selected:
        raise TargetModulesNotFoundError("exclude_modules", "excludes every module target_modules selects")
    for name in selected:
        linear_dims(model.get_submodule(name), name)  # raises UnsupportedModuleError naming it
    return selected


# Modules that wrappers put between a model's own modules (FSDP's units, activation checkpointing,
# torch.compile): left out of a layer's name, so a mixture saved from a wrapped model has the plain
# model's keys.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def mixture_layers(model: nn.Module) -> Iterator[tuple[str, MixtureLinear]]:
    """(name, layer) for every `MixtureLinear` in ``model``; names as in the unwrapped model."""
    for name, module in model.named_modules():
        if isinstance(module, MixtureLinear):
            for segment in WRAPPER_SEGMENTS:
                name = name.replace(segment, "")
            yield name, module


def _context_pre_hook(holder: ContextHolder):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        fields = {key: kwargs.pop(key) for key in CONTEXT_KWARGS if key in kwargs}
        task_ids = fields.get("task_ids")
        if task_ids is not None and not isinstance(task_ids, torch.Tensor):
            fields["task_ids"] = torch.as_tensor(task_ids, dtype=torch.long)
        holder.set_current(RoutingContext(attention_mask=kwargs.get("attention_mask"), **fields))
        return args, kwargs

    return hook


def inject(model: nn.Module, config: MixtureConfig, *, verbose: bool = False) -> nn.Module:
    """Wrap ``model``'s target modules with `MixtureLinear`, in place, and freeze everything else.

    Afterwards only expert and router parameters are trainable. The model's forward accepts the
    routing keywords ``task_ids``, ``task_descriptions`` and ``task_embeddings`` (taken out before
    the base model sees them) and reads its attention mask: they form the `RoutingContext` every
    layer sees during that call. The model also gets PEFT's model methods (`lomix.pretrained`):
    ``save_pretrained`` writes the mixture in the lomix format (so `transformers.Trainer.save_model`
    does too), ``disable_adapter()``, ``print_trainable_parameters()``. Returns ``model``.
    """
    if getattr(model, "lomix_state", None) is not None:
        raise LomixError(f"{type(model).__name__} already holds a lomix mixture; load or inject into a fresh model")
    targets = find_targets(model, config)
    disable_cpu_repacking(model)  # the same numbers on every CPU (lomix.quant explains)
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    holder = ContextHolder()
    # Every layer is built before any is swapped in: a layer the router rejects leaves the model untouched.
    layers = {
        name: MixtureLinear(model.get_submodule(name), layer_config(config, name), holder, name) for name in targets
    }
    for name, layer in layers.items():
        # A new layer follows the wrapped module's mode, or a model loaded for inference (eval mode)
        # would route with training noise (Gumbel noise, router jitter, expert dropout).
        layer.train(model.get_submodule(name).training)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    share_block_routing(layers, model, config, holder)  # routing_scope: block (lomix.block_routing)
    trainable = {id(p) for p in mixture_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    hook = model.register_forward_pre_hook(_context_pre_hook(holder), with_kwargs=True)
    model.lomix_state = LomixState(config, holder, hook, requires_grad_before)
    pretrained.bind(model)  # save_pretrained, disable_adapter ... (what Trainer and PEFT users call)
    count = count_parameters(model)
    (logger.warning if verbose else logger.info)("lomix: wrapped %d modules; %s", len(targets), count)
    fused = fused_expert_parameters(model, config)
    if fused:
        leaves = [_words(f.rsplit(".", 1)[-1]) for f in fused]
        wrapped = [name for name in targets if any(_words(name.rsplit(".", 1)[-1]) & leaf for leaf in leaves)]
        logger.warning(
            "lomix: target_modules %s also name %d fused expert weight(s) (3-D parameters, e.g. %s) that lomix "
            "cannot wrap: they stay frozen, without experts. Wrapped instead: %d module(s) (e.g. %s), "
            "which on a mixture-of-experts base may be only the shared expert.",
            config.target_modules, len(fused), ", ".join(fused[:3]), len(wrapped), ", ".join(wrapped[:3]) or "none",
        )  # fmt: skip
    return model


def _words(name: str) -> set[str]:
    return set(name.split("_")) - {"proj", "weight", "bias", ""}


def fused_expert_parameters(model: nn.Module, config: MixtureConfig) -> list[str]:
    """Names of the 3-D (or larger) parameters the targets seem to mean: the routed experts of a
    mixture-of-experts base, fused into one (experts, out, in) tensor in transformers 5 (Qwen2-MoE's
    ``mlp.experts.gate_up_proj``), which target names such as ``gate_proj`` cannot wrap."""
    found = []
    for name, param in model.named_parameters():
        if param.dim() < 3:
            continue
        if isinstance(config.target_modules, str):
            meant = re.fullmatch(config.target_modules, name) is not None
        else:
            meant = any(_words(name.rsplit(".", 1)[-1]) & _words(t.rsplit(".", 1)[-1]) for t in config.target_modules)
        if meant:
            found.append(name)
    return found


def check_targets_run(model: nn.Module, probe: Callable[[], Any], field: str = "target_modules") -> None:
    """Run ``probe`` (a forward of ``model``; no gradients; the random state and the mixture layers'
    buffers are left as they were) and raise `TargetNotCalledError` naming every wrapped module
    whose forward did not run.

    Some modules read a projection's ``.weight`` instead of calling it (Mamba's ``dt_proj``, and
    its fused CUDA path for ``x_proj``/``out_proj``): wrapped, such a module's experts have exactly
    zero effect and training silently learns nothing there.
    """
    layers = list(mixture_layers(model))
    called: set[str] = set()
    handles = [
        layer.register_forward_pre_hook(lambda module, args, name=name: called.add(name)) for name, layer in layers
    ]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # Routers may keep state in buffers (LoRA-Mixer's hard stage marks the experts it routed to):
    # the probe must leave them as they were, like the random state.
    buffers = [buffer for _, layer in layers for buffer in layer.buffers()]
    saved = [buffer.clone() for buffer in buffers]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            probe()
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
    missed = [name for name, _ in layers if name not in called]
    if missed:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in missed})
        shown = ", ".join(missed[:4]) + (f" and {len(missed) - 4} more" if len(missed) > 4 else "")
        raise TargetNotCalledError(
            field,
            f"{len(missed)} wrapped module(s) never ran in a forward pass ({shown}): their parent reads their "
            f"weight directly, so their experts would have no effect and learn nothing; leave them out "
            f"(exclude_modules: {leaves}) or target other modules",
        )


def mixture_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every expert and router parameter of the model's mixture layers (a router shared by a block once)."""
    seen: set[int] = set()
    for _, layer in mixture_layers(model):
        yield from layer.experts.parameters()
        if id(layer.router) not in seen:
            seen.add(id(layer.router))
            yield from layer.router.parameters()


def eject(model: nn.Module) -> nn.Module:
    """Undo `inject`: put the base modules back, drop the experts, restore requires_grad."""
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture to remove")
    for name, layer in list(mixture_layers(model)):
        if layer.shared_routing is not None:
            layer.shared_routing.detach()  # the block's hooks (detaching twice is harmless)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    state.hook.remove()
    pretrained.unbind(model)
    del model.lomix_state
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad_before.get(name, param.requires_grad))
    return model


def count_parameters(model: nn.Module) -> ParameterCount:
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return ParameterCount(trainable=trainable, total=total)


def router_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for module in model.modules():
        if isinstance(module, Router):
            yield from module.parameters()


@contextlib.contextmanager
def routing_context(model: nn.Module, **fields) -> Iterator[RoutingContext]:
    """Pin routing information for every forward inside the block (e.g. ``model.generate``).

    ``fields`` are `RoutingContext` fields other than the attention mask, which each call still
    supplies: ``with lomix.routing_context(model, task_ids=[3]): model.generate(...)``.
    """
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture; call lomix.inject first")
    if "task_ids" in fields and fields["task_ids"] is not None and not isinstance(fields["task_ids"], torch.Tensor):
        fields["task_ids"] = torch.as_tensor(fields["task_ids"], dtype=torch.long)
    context = RoutingContext(**fields)
    state.context.push_pinned(context)
    try:
        yield context
    finally:
        state.context.pop_pinned()
