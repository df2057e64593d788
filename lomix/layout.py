"""How a merged mixture is laid out: which bank expert each router expert feeds, plus sparse residuals.

MC-SMoE merging (`lomix.merge`, docs/deploy.md) keeps every router's E logits but leaves a
layer with G <= E experts in its bank: router expert i feeds bank expert ``expert_map[layer][i]``,
and a merged expert takes the summed gate of its members. The kernels already sum the gates of
duplicate expert ids within a token's row, so rebinding is one lookup of the router's indices.
An entry of -1 drops that router expert: its gate is discarded (the "drop the non-dominant
experts" baseline).

`MergedLayout` is saved inside `MixtureConfig` (``merged``), so a merged mixture saves, loads and
runs like any other: the bank of each listed layer has ``max(expert_map[layer]) + 1`` experts.

Compression may keep, per bank expert, a sparse residual S_g = Delta W_g - B_g A_g of a fixed
number of entries (the largest by magnitude): ``residual_density * d_in * d_out`` per expert, so
the tensors' shapes follow from the config and the layer, as the checkpoint loader requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError


@dataclass
class MergedLayout:
    """The layout of a merged mixture (written by `lomix.merge`; leave it unset to train)."""

    expert_map: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "per layer (full module name): the bank expert each router expert feeds, -1 for a dropped "
            "expert; layers not listed keep one bank expert per router expert"
        },
    )
    residual_density: float = field(
        default=0.0,
        metadata={"help": "entries of the sparse residual kept per bank expert, as a fraction of d_in * d_out"},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.residual_density < 1.0:
            raise ConfigError("merged.residual_density", f"must be in [0, 1), got {self.residual_density}")
        for name, mapping in self.expert_map.items():
            where = f"merged.expert_map.{name}"
            if not isinstance(mapping, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in mapping
            ):
                raise ConfigError(where, f"expected a list of bank expert ids (integers), got {mapping!r}")
            if any(v < -1 for v in mapping):
                raise ConfigError(where, f"ids must be >= 0, or -1 for a dropped expert, got {mapping}")
            used = sorted({v for v in mapping if v >= 0})
            if not used:
                raise ConfigError(where, "drops every expert; a layer needs at least one bank expert")
            if used != list(range(len(used))):
                raise ConfigError(where, f"bank expert ids must be 0..G-1 with none unused, got {mapping}")

    def validate(self, num_experts: int) -> None:
        for name, mapping in self.expert_map.items():
            if len(mapping) != num_experts:
                raise ConfigError(
                    f"merged.expert_map.{name}",
                    f"needs one entry per router expert ({num_experts}), got {len(mapping)}",
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "expert_map": {k: list(v) for k, v in self.expert_map.items()},
            "residual_density": self.residual_density,
        }


def residual_size(density: float, d_in: int, d_out: int) -> int:
    """Entries kept per bank expert for ``density`` (at least one when density > 0)."""
    return 0 if density <= 0 else max(1, round(density * d_in * d_out))


class SparseResidual(nn.Module):
    """Per bank expert g, a sparse (d_out, d_in) matrix S_g with a fixed number of entries.

    Buffers (saved with the mixture, not trained):
        index: (G, nnz) int32, the flat position row * d_in + col of each entry;
        value: (G, nnz) float, its value (unscaled, like B_g A_g).

    The layer adds ``scale * sum_g gate_g(x) * S_g x`` to the routed LoRA delta, where gate_g is
    the summed gate of the router experts that feed bank expert g.
    """

    def __init__(self, num_experts: int, nnz: int, d_in: int, d_out: int, *, dtype=None, device=None):
        super().__init__()
        self.num_experts, self.nnz, self.d_in, self.d_out = num_experts, nnz, d_in, d_out
        self.register_buffer("index", torch.zeros(num_experts, nnz, dtype=torch.int32, device=device))
        self.register_buffer("value", torch.zeros(num_experts, nnz, dtype=dtype, device=device))

    def dense(self, expert: int) -> torch.Tensor:
        """(d_out, d_in) dense S_g of one bank expert."""
        out = self.value.new_zeros(self.d_out * self.d_in)
        out.index_add_(0, self.index[expert].long(), self.value[expert])
        return out.view(self.d_out, self.d_in)

    def _matrix(self) -> torch.Tensor:
        """All experts' residuals as one sparse (G * d_out, d_in) matrix."""
        flat = self.index.long()
        rows = flat.div(self.d_in, rounding_mode="floor") + self.d_out * torch.arange(
            self.num_experts, device=flat.device
        ).unsqueeze(1)
        cols = flat.remainder(self.d_in)
        indices = torch.stack([rows.reshape(-1), cols.reshape(-1)])
        shape = (self.num_experts * self.d_out, self.d_in)
        return torch.sparse_coo_tensor(indices, self.value.reshape(-1), shape, check_invariants=False).coalesce()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, scale: float) -> torch.Tensor:
        """x (N, d_in), bank-expert indices and gates (N, k) -> (N, d_out) residual delta."""
        weights = x.new_zeros(x.shape[0], self.num_experts).scatter_add(1, indices, gates.to(x.dtype) * scale)
        per_expert = torch.sparse.mm(self._matrix().to(x.dtype), x.t())  # (G * d_out, N)
        return torch.einsum("gon,ng->no", per_expert.view(self.num_experts, self.d_out, -1), weights)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, nnz={self.nnz}, d_in={self.d_in}, d_out={self.d_out}"


__all__ = ["MergedLayout", "SparseResidual", "residual_size"]
