"""Mixture-of-LoRA kernels behind one contract.

``mixture_lora(x, A, B, indices, gates, scale)`` returns the routed LoRA delta
``scale * sum_j gates[t, j] * B[indices[t, j]] @ A[indices[t, j]] @ x[t]`` with autograd through
x, A, B and gates. Shapes: x (T, d_in), A (E, r, d_in), B (E, d_out, r), indices (T, k) int64,
gates (T, k) -> (T, d_out) in x's dtype. With ``out`` (T, d_out, x's dtype) the call returns
``out + delta`` with the add fused into the kernel (the base layer's output, say); a backend may
add into ``out`` in place (Triton does), so do not use ``out`` afterwards.

x may have another float dtype than A and B: the torch backend computes in the experts' dtype,
the Triton backend in x's dtype (tensor cores) with fp32 accumulation.

Backends: ``torch`` (reference, CPU path) and ``triton`` (GPU). ``auto`` picks Triton on CUDA when
it is installed and torch otherwise; the environment variable ``LOMIX_KERNEL=torch|triton``
overrides the config. A requested but unusable backend falls back to torch with one warning.

On the Triton backend a layer with a softmax top-k router over a dense ``nn.Linear`` base can run
base GEMM, router and experts as one fused computation instead (`lomix.kernels.fused` says when;
fused_backend.py how), with launch tiles per GPU from fused_tuning.py.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Literal

import torch

from ..errors import ConfigError
from .torch_backend import mixture_lora_mixed_torch, mixture_lora_torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_triton_broken: str | None = None


def _triton_module():
    """The Triton backend module, or None (with one warning) when Triton cannot be imported."""
    if _triton_broken is not None:
        return None
    try:
        return importlib.import_module("lomix.kernels.triton_backend")
    except Exception as exc:  # ImportError, or a Triton install that fails while importing
        _warn_once(f"lomix: the Triton kernel backend is unavailable ({exc}); using the torch backend")
        return None


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that will run: ``torch`` or ``triton``."""
    env = os.environ.get("LOMIX_KERNEL", "").strip().lower()
    if env:
        if env not in ("torch", "triton"):
            raise ConfigError("LOMIX_KERNEL", f"must be 'torch' or 'triton', got {env!r}")
        requested = env
    if requested not in BACKENDS:
        raise ConfigError("kernel", f"must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "auto" and device.type != "cuda":
        return "torch"
    module = _triton_module()
    if module is None:
        return "torch"
    reason = module.unusable_reason(device)
    if reason is not None:
        _warn_once(f"lomix: {reason}; using the torch backend")
        return "torch"
    return "triton"


def _check(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"mixture_lora expects x (T, d_in), A (E, r, d_in), B (E, d_out, r); got "
            f"{tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}"
        )
    if A.shape[2] != x.shape[1] or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ValueError(f"inconsistent shapes x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if indices.shape != gates.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices {tuple(indices.shape)} and gates {tuple(gates.shape)} must be (T={x.shape[0]}, k)")
    if out is not None and (out.shape != (x.shape[0], B.shape[1]) or out.dtype != x.dtype):
        raise ValueError(f"out must be ({x.shape[0]}, {B.shape[1]}) in {x.dtype}, got {tuple(out.shape)} {out.dtype}")


def mixture_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed LoRA delta, or ``out + delta`` (see module docstring for the math and shapes)."""
    global _triton_broken
    _check(x, A, B, indices, gates, out)
    if resolve_backend(backend, x.device) == "triton":
        try:
            return _triton_module().mixture_lora_triton(x, A, B, indices, gates, scale, out)
        except (ValueError, TypeError):
            raise
        except Exception as exc:  # a broken Triton (compiler, driver): never wrong results, fall back
            _triton_broken = f"{type(exc).__name__}: {exc}"
            _warn_once(f"lomix: the Triton kernels failed ({_triton_broken}); using the torch backend from now on")
    if x.dtype != A.dtype:
        delta = mixture_lora_torch(x.to(A.dtype), A, B, indices, gates, scale).to(x.dtype)
        return delta if out is None else out + delta
    return mixture_lora_torch(x, A, B, indices, gates, scale, out)


def mixture_lora_mixed(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, scale: float
) -> torch.Tensor:
    """Parameter-mixing delta (Poly / MHR): x (batch, S, d_in), weights (batch, h, E) -> (batch, S, d_out).

    Batched matmuls on every backend: the mixed factors are per sequence, so the work is one
    (S x d x r) LoRA per sequence and needs no routing kernel.
    """
    return mixture_lora_mixed_torch(x, A, B, weights, scale)


__all__ = ["BACKENDS", "mixture_lora", "mixture_lora_mixed", "resolve_backend"]
