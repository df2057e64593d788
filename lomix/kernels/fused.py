"""When a mixture layer runs as ONE fused Triton computation, and the call that does it.

The fused path (fused_backend.py) replaces the base layer's GEMM, the router and the mixture
kernels by a router+shrink launch and one extended-K GEMM. A layer takes it only when all of
these hold; otherwise it runs today's path (base layer, router, `mixture_lora`) unchanged:

- the layer's kernel backend resolves to ``triton`` (``kernel: triton``, or ``auto`` on CUDA;
  ``LOMIX_KERNEL`` overrides) and ``LOMIX_FUSED`` is not ``0``;
- the GPU has a measured tuning file (`benchmarks/autotune_fused.py` writes it), or ``LOMIX_FUSED=1``
  forces the path on: an unmeasured GPU keeps today's kernels (fused_tuning.py);
- no autocast is active; the base layer is a plain dense ``torch.nn.Linear`` (not a subclass
  such as bitsandbytes' 4-bit/8-bit layers), without hooks, whose weight has x's dtype; the call
  has no extra arguments;
- the router declares a linear softmax top-k rule (`Router.softmax_topk_rule`; jitter in training
  or a loss-free balancing bias declines), there is no merged-expert map or sparse residual, and
  expert dropout is inactive;
- E*r is at most the GPU's measured ``max_columns`` (fused_tuning.py): wider mixtures keep the
  sorted (grouped) kernels, which skip the unselected experts' FLOPs.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..routing import TokenRouting
from .fused_tuning import tuning_for

# Set when the fused kernels failed to compile or run here: the fused path stays off for the
# process, the (separately checked) mixture kernels stay on.
_fused_broken: str | None = None


@dataclass(frozen=True)
class SoftmaxTopK:
    """A router rule the fused kernel computes itself: p = softmax(x W^T), keep the k largest,
    gates = p_topk / sum(p_topk) when ``renormalize`` else p_topk. ``weight``: (E, d_in)."""

    weight: torch.Tensor
    k: int
    renormalize: bool


def plain_linear(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module(x)`` is exactly ``F.linear(x, module.weight, module.bias)`` with a plain weight of
    x's dtype and device: a torch Linear with no hooks (its own or global) and no instance-level
    ``forward`` (accelerate's offload hooks replace it), so a kernel may read its weight directly."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return False
    weight = module._parameters["weight"]
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype == x.dtype and weight.device == x.device


def fused_rule(layer: nn.Module, x: torch.Tensor) -> SoftmaxTopK | None:
    """The router rule when ``layer`` (a `MixtureLinear`) may run fused on ``x``, else None."""
    from . import _triton_module, resolve_backend

    # Cheapest first: on the CPU's torch backend this is the only check a forward pays.
    if _fused_broken is not None or resolve_backend(layer.kernel, x.device) != "triton":
        return None
    if os.environ.get("LOMIX_FUSED", "").strip() == "0":
        return None
    if x.dim() < 2 or not x.dtype.is_floating_point:
        return None
    if torch.is_autocast_enabled(x.device.type):  # autocast picks the base GEMM's dtype per op
        return None
    if layer.expert_map is not None or layer.residual is not None:
        return None
    if layer.training and not isinstance(layer.dropout, nn.Identity):
        return None
    if not plain_linear(layer.base_layer, x):
        return None
    from .routed_dense import router_has_hooks

    if router_has_hooks(layer.router):  # the fused kernel would skip them (test-time rerouting's offsets)
        return None
    rule = layer.router.softmax_topk_rule()  # a declared hook (lomix.routers.base.Router)
    if rule is None:
        return None
    experts = layer.experts
    if experts.A.device != x.device or rule.weight.device != x.device:
        return None
    if experts.A.shape[0] * experts.A.shape[1] > tuning_for(x.device).max_columns:
        return None
    if _triton_module() is None:
        return None
    return rule


def fused_layer_forward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, TokenRouting] | None:
    """(output (..., d_out), routing) of a `MixtureLinear` computed by the fused kernels, or None
    when the layer does not qualify (the caller then runs its usual path)."""
    global _fused_broken
    from . import _warn_once

    rule = fused_rule(layer, x)
    if rule is None:
        return None
    base = layer.base_layer
    try:
        backend = importlib.import_module("lomix.kernels.fused_backend")
        y, logits, indices, gates = backend.fused_mixture_linear(
            x.reshape(-1, x.shape[-1]),
            base.weight,
            base.bias,
            rule.weight,
            layer.experts.A,
            layer.experts.B,
            layer.scale,
            rule.k,
            rule.renormalize,
            tuning_for(x.device),
        )
    except (ValueError, TypeError):
        raise
    except Exception as exc:  # a compiler or driver failure: never wrong results, run the usual path
        _fused_broken = f"{type(exc).__name__}: {exc}"
        _warn_once(f"lomix: the fused Triton kernels failed ({_fused_broken}); using the unfused kernels from now on")
        return None
    # The full distribution feeds the balance loss and statistics only: no extra launch in inference.
    probs = logits.softmax(-1) if layer.training or layer.record_routing else None
    routing = TokenRouting(indices=indices, gates=gates, probs=probs, logits=logits)
    return y.view(*x.shape[:-1], y.shape[-1]), routing
