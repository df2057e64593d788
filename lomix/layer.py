"""`MixtureLinear`: a frozen linear layer plus a routed mixture of LoRA experts.

    y = W x + s * sum_{e in I(x)} g_e(x) * B_e A_e x

The layer knows nothing about which router feeds it: only `TokenRouting` (per-token experts and
gates, served by `lomix.kernels.mixture_lora`) or `ParameterMixing` (per-sequence mixed A and B).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import MixtureConfig
from .errors import RoutingError, UnsupportedModuleError
from .experts import ExpertBank
from .kernels import mixture_lora, mixture_lora_mixed, resolve_backend
from .kernels.fused import fused_layer_forward
from .kernels.inference_plan import InferencePlan
from .kernels.routed_dense import softmax_topk_dense_forward, softmax_topk_dense_inference, softmax_topk_dense_rule
from .layout import SparseResidual, residual_size
from .losses import router_z_loss, switch_load_balancing_loss
from .quant import disable_cpu_repacking
from .routers import build_router
from .routing import ContextHolder, ParameterMixing, RoutingContext, TokenRouting

if TYPE_CHECKING:
    from .block_routing import SharedRouting


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the library core
        return None
    return Conv1D


def linear_dims(module: nn.Module, name: str = "") -> tuple[int, int]:
    """(d_in, d_out) of a module lomix can wrap, or `UnsupportedModuleError` naming it."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        # GPT-2's Conv1D stores its weight as (d_in, d_out) and computes x @ W + b.
        return module.weight.shape[0], module.weight.shape[1]
    raise UnsupportedModuleError(
        f"module {name or '?'!r} is a {type(module).__module__}.{type(module).__qualname__}; lomix wraps "
        "torch.nn.Linear and transformers' Conv1D. Target its linear sub-modules instead."
    )


def _expert_dtype(base: nn.Module) -> torch.dtype:
    """Experts train in fp32 over half-precision or quantized bases, in the base dtype otherwise."""
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


class MixtureLinear(nn.Module):
    """Wraps a frozen linear ``base_layer`` with E LoRA experts and a router.

    Attributes:
        base_layer: the original module (frozen by `lomix.inject`).
        experts: `ExpertBank`, A (E, r, d_in) and B (E, d_out, r).
        router: the registered router built from ``config.router``.
        aux_losses: weighted balance losses of the last training forward (see `lomix.aux_loss`).
        last_routing: the last routing decision, kept only while ``record_routing`` is True
            (statistics collection); otherwise None so no graph is held.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        config: MixtureConfig,
        context: ContextHolder | None = None,
        name: str = "",
    ):
        super().__init__()
        self.d_in, self.d_out = linear_dims(base_layer, name)
        disable_cpu_repacking(base_layer, name)  # one 4-bit layout on every CPU (lomix.quant explains)
        self.base_layer = base_layer
        weight = getattr(base_layer, "weight", None)
        # A merged mixture (MC-SMoE) has fewer bank experts than router experts: see lomix.layout.
        mapping = config.merged.expert_map.get(name) if config.merged is not None else None
        self.experts = ExpertBank(
            config.num_experts if mapping is None else max(mapping) + 1,
            config.rank,
            self.d_in,
            self.d_out,
            dtype=_expert_dtype(base_layer),
            device=weight.device if weight is not None else None,
        )
        self.router = build_router(config.router, self.d_in, config.num_experts)
        device = weight.device if weight is not None else None
        self.register_buffer(
            "expert_map", None if mapping is None else torch.tensor(mapping, device=device), persistent=False
        )
        self.residual: SparseResidual | None = None
        density = config.merged.residual_density if config.merged is not None else 0.0
        if density > 0:
            nnz = residual_size(density, self.d_in, self.d_out)
            self.residual = SparseResidual(
                self.experts.num_experts, nnz, self.d_in, self.d_out, dtype=self.experts.A.dtype, device=device
            )
        self.router.to(device=weight.device if weight is not None else None)
        self.router.check_layer(name, self.d_in, self.d_out)
        self.router.init_experts(self.experts)  # a router's own expert initialisation, if any
        self.router.bind_experts(self.experts)  # routers that route by the experts' weights
        self.router.bind_mixture(config)  # gates that depend on the rank or the LoRA scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        self.kernel = config.kernel
        self.balance = config.balance
        self.layer_name = name
        self._context = context if context is not None else ContextHolder()
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.record_routing = False
        self.last_routing: TokenRouting | ParameterMixing | None = None
        self.disabled = False
        # Set by lomix.block_routing when this layer shares its block's router (routing_scope: block).
        self.shared_routing: SharedRouting | None = None

    # Modules such as T5's feed-forward read ``.weight`` of their projections directly.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def train(self, mode: bool = True) -> MixtureLinear:
        # Inference caches of the experts' stacked factors (lomix.kernels.routed_dense) are keyed on
        # the tensors' version counters, which writes through `.data` or a flat buffer (DeepSpeed's
        # optimizer) do not bump: every train()/eval() switch, as around an evaluation, drops them.
        self.__dict__.pop("_routed_dense_cache", None)
        self.__dict__.pop("_inference_plan", None)
        return super().train(mode)

    def __getstate__(self) -> dict:
        # Inference caches and plans are rebuilt on demand; a pickled or deep-copied layer (a copy of
        # the model) starts without them rather than sharing the original's sibling groups.
        state = super().__getstate__()
        return {key: value for key, value in state.items() if key not in ("_routed_dense_cache", "_inference_plan")}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.__dict__.get("_inference_plan")
        if plan is not None and not (args or kwargs) and not torch.is_grad_enabled():
            result = plan(x)  # the path an earlier call chose, re-verified (see InferencePlan)
            if result is not None:
                return result
            self.__dict__.pop("_inference_plan", None)  # decide again below (another thread may have)
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        backend = resolve_backend(self.kernel, x.device)  # once per call: every path below needs it
        plain_call = not (args or kwargs)
        shared = self.shared_routing is not None  # a block's router: not this layer's own fused rule
        fused = fused_layer_forward(self, x) if plain_call and not shared and backend == "triton" else None
        if fused is not None:  # base GEMM, router and experts in two Triton launches (lomix.kernels.fused)
            self._record(fused[1], self._context.get())
            return fused[0]
        if shared and plain_call and x.dim() >= 2 and x.shape[-2] > 1 and x.stride(-2) == 0:
            # Block routing hands the feed-forward k stride-0 copies of each token: a projection that
            # reads the block's input (gate, up) computes its frozen GEMM once per token, not per slot.
            out = self.base_layer(x[..., :1, :]).expand(*x.shape[:-1], self.d_out)
        else:
            out = self.base_layer(x, *args, **kwargs)
        context = self._context.get()
        # A softmax top-k router on the CPU path: router and shrink as one GEMM (lomix.kernels.routed_dense).
        rule = softmax_topk_dense_rule(self, x, backend) if plain_call and not shared and out.dtype == x.dtype else None
        if rule is not None:
            if not (self.training or self.record_routing or torch.is_grad_enabled()):
                # Evaluation / generation that keeps no routing: nothing to record, no loss to add.
                if self.aux_losses or self.last_routing is not None:  # (module attribute writes are slow)
                    self.aux_losses, self.last_routing = {}, None
                self.__dict__["_inference_plan"] = InferencePlan(self, x)  # the next call skips these checks
                return softmax_topk_dense_inference(self, x, out, rule)
            result, routing = softmax_topk_dense_forward(self, x, out, rule)
            self._record(routing, context)
            return result
        if shared:  # one expert per (token, slot) row, gate 1; the block's hook applies the gates
            routing, recorded = self.shared_routing.route(self, x)
        else:
            routing = recorded = self.router(x, context)
        expert_x = self.dropout(x)
        if isinstance(routing, TokenRouting):
            result = self._token_routed(expert_x, out, routing)
        elif isinstance(routing, ParameterMixing):
            result = self._parameter_mixed(expert_x, out, routing)
        else:
            raise RoutingError(
                f"router {self.router.name!r} returned {type(routing).__name__}; "
                "expected TokenRouting or ParameterMixing"
            )
        self._record(recorded, context)
        return result

    def _token_routed(self, x: torch.Tensor, out: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
        A, B = self.experts.A, self.experts.B
        flat_x = x.reshape(-1, self.d_in)
        indices, gates = routing.indices, routing.gates
        if self.expert_map is not None:
            # Router rebinding after merging: a bank expert gets the summed gate of the router experts
            # that feed it (the kernel sums duplicate ids in a row); a dropped expert's gate is discarded.
            mapped = self.expert_map[indices]
            gates = gates * (mapped >= 0).to(gates.dtype)
            indices = mapped.clamp(min=0)
        if self.residual is not None:
            residual = self.residual(flat_x.to(A.dtype), indices, gates, self.scale)
            out = out + residual.view(out.shape).to(out.dtype)
        if out.dtype == x.dtype:  # fuse the residual add into the kernel
            fused = mixture_lora(
                flat_x,
                A,
                B,
                indices,
                gates,
                self.scale,
                out=out.reshape(-1, self.d_out),
                backend=self.kernel,
            )
            return fused.view(out.shape)
        delta = mixture_lora(flat_x, A, B, indices, gates, self.scale, backend=self.kernel)
        return out + delta.view(out.shape).to(out.dtype)

    def _parameter_mixed(self, x: torch.Tensor, out: torch.Tensor, routing: ParameterMixing) -> torch.Tensor:
        if self.expert_map is not None:
            raise RoutingError(
                f"{self.layer_name}: merged expert banks serve token-routed mixtures only; router "
                f"{self.router.name!r} mixes parameters"
            )
        batch = x.shape[0]
        if x.dim() < 2 or routing.weights.shape[0] != batch:
            raise RoutingError(
                f"{self.layer_name}: parameter mixing has {routing.weights.shape[0]} rows but the input "
                f"has shape {tuple(x.shape)}; expected (batch, ..., d_in) with the same batch"
            )
        delta = mixture_lora_mixed(
            x.reshape(batch, -1, self.d_in).to(self.experts.A.dtype),
            self.experts.A,
            self.experts.B,
            routing.weights,
            self.scale,
        )
        return out + delta.view(out.shape).to(out.dtype)

    def _record(self, routing: TokenRouting | ParameterMixing, context: RoutingContext) -> None:
        self.last_routing = routing if self.record_routing else None
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            if isinstance(routing, TokenRouting):
                mask = context.token_mask(routing.num_tokens)
                if self.balance.switch > 0 and routing.probs is not None:
                    losses["switch"] = self.balance.switch * switch_load_balancing_loss(
                        routing.probs, routing.indices, mask, routing.gates
                    )
                if self.balance.z_loss > 0 and routing.logits is not None:
                    losses["z_loss"] = self.balance.z_loss * router_z_loss(routing.logits, mask)
            # Routers that define their own objective (already weighted) report it as aux "loss_*".
            losses.update({k: v for k, v in routing.aux.items() if k.startswith("loss_")})
        self.aux_losses = losses

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, scale={self.scale:g}, kernel={self.kernel}"
