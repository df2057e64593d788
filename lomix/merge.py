"""MC-SMoE for LoRA experts: merge each layer's experts into fewer, then compress (docs/deploy.md).

    with lomix.RoutingStats(model) as stats:      # calibration data through the trained mixture
        for batch in calibration:
            model(**batch)
    report = lomix.merge.merge_mixture(model, stats, lomix.merge.MergeOptions(experts=4))
    lomix.save(model, "merged")                   # loads with lomix.load like any mixture

The steps, per the paper ("Merge, Then Compress", ICLR 2024), ported from the math
rather than from the public grouping code:

1. Statistics (`lomix.RoutingStats`): f_i, the fraction of tokens whose selection includes expert
   i, and the router-logit Gram matrix, from which cos(H[:, i], H[:, j]) follows exactly.
2. Dominant experts under a GLOBAL budget of round(N * layers) groups: each layer's most used
   expert first (at least one group per layer), the remaining slots to the most used experts of
   any layer. Ties go to the expert ranked higher within its layer, then to the earlier layer, so
   equal frequencies spread the budget evenly instead of filling the first layers.
3. Grouping: every other expert joins the dominant expert it is most similar to,
   sim(i, j) = (cos(H[:, i], H[:, j]) + 1) / 2 (``grouping="random"``: a seeded uniform choice,
   a baseline).
4. Merge in the PRODUCT space, which is exact for LoRA experts: Delta W_g = sum_{i in g} f_i B_i A_i
   / sum_{i in g} f_i (``weighting="uniform"``: plain mean), then truncated SVD to rank r' gives the
   new B and A (sqrt of the singular values on each side). The SVD runs on the (|g| r x |g| r) core
   of two QR factorisations, never on a d_out x d_in matrix. Averaging the factors instead would be
   wrong: avg(B) avg(A) != avg(BA).
5. Router rebinding: the router keeps its E logits; router expert i feeds bank expert g(i), so the
   merged expert takes the summed gate of its members (`lomix.layout.MergedLayout`).
6. Compression: a rank r' below the trained rank truncates further; ``residual_density`` keeps,
   per merged expert, the largest-magnitude entries of S = Delta W_g - B' A' as a sparse residual.

``drop=True`` is the pruning baseline: only the dominant experts are kept, as they are; the other
router experts are dropped (their gates are discarded, nothing is merged).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .checkpoint import mixture_state_dict
from .errors import ConfigError, LomixError
from .experts import ExpertBank
from .inject import mixture_layers
from .layout import MergedLayout, SparseResidual, residual_size
from .stats import RoutingStats


@dataclass
class MergeOptions:
    """What `merge_mixture` does (the fields of ``lomix merge``)."""

    experts: float = field(
        metadata={"help": "bank experts per layer ON AVERAGE (global budget round(experts * layers), >= 1 per layer)"}
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "rank of the merged experts; null: the trained rank; larger keeps more, smaller compresses"},
    )
    weighting: Literal["frequency", "uniform"] = field(
        default="frequency",
        metadata={"help": "weights of a group's members: their usage frequency f_i (MC-SMoE) or equal"},
    )
    grouping: Literal["similarity", "random"] = field(
        default="similarity",
        metadata={"help": "join each expert to its most similar dominant expert by router logits, or a random one"},
    )
    drop: bool = field(
        default=False, metadata={"help": "keep only the dominant experts and drop the others (pruning baseline)"}
    )
    residual_density: float = field(
        default=0.0,
        metadata={"help": "keep this fraction of each merged expert's d_out x d_in residual, largest entries first"},
    )
    seed: int = field(default=0, metadata={"help": "seed of random grouping"})

    def __post_init__(self) -> None:
        if not self.experts > 0:
            raise ConfigError("experts", f"must be > 0 (bank experts per layer on average), got {self.experts}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError("rank", f"must be >= 1, got {self.rank}")
        if not 0.0 <= self.residual_density < 1.0:
            raise ConfigError("residual_density", f"must be in [0, 1), got {self.residual_density}")
        if self.weighting not in ("frequency", "uniform"):
            raise ConfigError("weighting", f"must be 'frequency' or 'uniform', got {self.weighting!r}")
        if self.grouping not in ("similarity", "random"):
            raise ConfigError("grouping", f"must be 'similarity' or 'random', got {self.grouping!r}")


# ----------------------------------------------------------------------------------------------
# The algorithm, on plain tensors


def dominant_experts(frequencies: dict[str, torch.Tensor], average: float) -> dict[str, list[int]]:
    """The dominant experts of every layer under a global budget of round(average * layers).

    Each layer's most used expert is dominant; the remaining slots go to the most used of all other
    experts, ties first to the expert ranked higher within its own layer, then to the earlier layer.
    """
    names = list(frequencies)
    total = round(average * len(names))
    available = sum(len(f) for f in frequencies.values())
    if total < len(names):
        raise ConfigError(
            "experts", f"{average} per layer gives {total} groups for {len(names)} layers; every layer needs one"
        )
    if total > available:
        raise ConfigError("experts", f"{average} per layer asks for {total} groups but the layers hold {available}")
    chosen: dict[str, list[int]] = {}
    candidates = []
    for position, name in enumerate(names):
        freq = [float(v) for v in frequencies[name]]
        order = sorted(range(len(freq)), key=lambda e: (-freq[e], e))
        chosen[name] = [order[0]]
        candidates += [(-freq[e], rank, position, name, e) for rank, e in enumerate(order[1:], start=1)]
    for *_, name, expert in sorted(candidates)[: total - len(names)]:
        chosen[name].append(expert)
    return {name: sorted(experts) for name, experts in chosen.items()}


def group_experts(
    num_experts: int,
    dominant: list[int],
    similarity: torch.Tensor | None,
    *,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Group id (the position of its dominant expert in ``dominant``) of every expert.

    With ``similarity`` (E, E), a non-dominant expert joins its most similar dominant expert (ties:
    the lower id); with None, a uniformly random one drawn from ``generator``.
    """
    groups = []
    for expert in range(num_experts):
        if expert in dominant:
            groups.append(dominant.index(expert))
        elif similarity is not None:
            scores = [float(similarity[expert, d]) for d in dominant]
            groups.append(max(range(len(dominant)), key=lambda g: (scores[g], -g)))
        else:
            groups.append(int(torch.randint(len(dominant), (1,), generator=generator)))
    return groups


@dataclass
class MergedFactors:
    """A merged expert: Delta W ~= B A, and the singular values of the exact merged product."""

    A: torch.Tensor  # (rank, d_in)
    B: torch.Tensor  # (d_out, rank)
    singular_values: torch.Tensor  # all of them, descending

    def truncation_error(self, rank: int) -> float:
        """||Delta W - B A||_F: the root of the sum of the squared discarded singular values."""
        return float(self.singular_values[rank:].pow(2).sum().sqrt())


def merge_factors(A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor, rank: int) -> MergedFactors:
    """Product-space merge of m LoRA experts, truncated to ``rank`` (zero-padded when the product has less).

    A (m, r, d_in), B (m, d_out, r), weights (m,) -> the best rank-``rank`` factorisation of
    sum_i weights_i B_i A_i. Computed in float64 from QR factorisations of [w_1 B_1 | ... | w_m B_m]
    and [A_1; ...; A_m]^T, so the SVD is of an (m r x m r) core.
    """
    m, r, d_in = A.shape
    d_out = B.shape[1]
    left = (B.double() * weights.double()[:, None, None]).permute(1, 0, 2).reshape(d_out, m * r)
    right = A.double().reshape(m * r, d_in)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.t())
    u, s, vh = torch.linalg.svd(r_left @ r_right.t())
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    new_b = torch.zeros(d_out, rank, dtype=torch.float64, device=A.device)
    new_a = torch.zeros(rank, d_in, dtype=torch.float64, device=A.device)
    new_b[:, :keep] = (q_left @ u[:, :keep]) * root
    new_a[:keep] = root[:, None] * (vh[:keep] @ q_right.t())
    return MergedFactors(new_a.to(A.dtype), new_b.to(B.dtype), s)


def dense_delta(A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(d_out, d_in) sum_i weights_i B_i A_i in float64."""
    return torch.einsum("i,ior,ird->od", weights.double(), B.double(), A.double())


def top_magnitude(matrix: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, values) of the ``count`` largest-magnitude entries of ``matrix``."""
    flat = matrix.reshape(-1)
    index = flat.abs().topk(count).indices.sort().values
    return index, flat[index]


# ----------------------------------------------------------------------------------------------
# On a model


@dataclass
class LayerMerge:
    """What happened to one layer."""

    groups: list[list[int]]  # router experts feeding each bank expert
    dropped: list[int]
    frequencies: list[float]
    relative_error: list[float]  # per bank expert: ||Delta W_g - B A||_F / ||Delta W_g||_F (residual included)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MergeReport:
    options: MergeOptions
    rank_before: int
    rank_after: int
    experts_before: int
    experts_after: int
    bytes_before: int
    bytes_after: int
    layers: dict[str, LayerMerge] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "layers"}
        out["layers"] = {name: layer.to_dict() for name, layer in self.layers.items()}
        return out


def adapter_bytes(model: nn.Module) -> int:
    """Bytes of the mixture's own tensors (experts, routers, residuals): what a checkpoint stores."""
    return sum(t.numel() * t.element_size() for t in mixture_state_dict(model).values())


def _statistics(model: nn.Module, stats: RoutingStats, need_similarity: bool) -> tuple[dict, dict]:
    frequencies, similarity = {}, {}
    for name, layer in mixture_layers(model):
        seen = stats.layers.get(name)
        if seen is None or seen.tokens == 0:
            if seen is not None and seen.sequences:
                raise LomixError(
                    f"{name}: router {layer.router.name!r} mixes parameters per task (Poly/MHR); MC-SMoE merges "
                    "token-routed experts. Export one task's mixture with `lomix export --task T` instead"
                )
            raise LomixError(
                f"{name}: the routing statistics saw no token of this layer; run calibration data through the "
                "model inside `lomix.RoutingStats(model)` before merging"
            )
        frequencies[name] = seen.load
        if need_similarity:
            cosine = seen.logit_cosine()
            if cosine is None:
                raise LomixError(
                    f"{name}: router {layer.router.name!r} reports no logits, so experts cannot be grouped by "
                    "router-logit similarity; use grouping='random' or drop=True"
                )
            similarity[name] = (cosine + 1) / 2
    return frequencies, similarity


def merge_mixture(model: nn.Module, stats: RoutingStats, options: MergeOptions) -> MergeReport:
    """Merge ``model``'s mixture in place (MC-SMoE, see the module docstring); returns the report.

    ``stats`` must hold routing statistics of calibration data through this model. Afterwards the
    model's config records the merged layout, so `lomix.save` / `lomix.load` round-trip it.
    """
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture to merge")
    config = state.config
    if config.merged is not None:
        raise LomixError("this mixture is already merged; merge the mixture as trained instead")
    if config.routing_scope != "layer":
        # Each expert is a whole feed-forward routed once per block: its projections would have to be
        # grouped together, which this per-layer merge does not do (each layer would group on its own).
        raise LomixError(
            f"mixture.routing_scope is {config.routing_scope!r}: MC-SMoE merging groups the experts of each "
            "layer on its own, and a block-routed expert is a whole feed-forward; merge per-layer mixtures only"
        )
    need_similarity = options.grouping == "similarity" and not options.drop
    frequencies, similarity = _statistics(model, stats, need_similarity)
    dominant = dominant_experts(frequencies, options.experts)
    rank = options.rank or config.rank
    generator = torch.Generator().manual_seed(options.seed)
    report = MergeReport(
        options=options,
        rank_before=config.rank,
        rank_after=rank,
        experts_before=sum(layer.experts.num_experts for _, layer in mixture_layers(model)),
        experts_after=sum(len(d) for d in dominant.values()),
        bytes_before=adapter_bytes(model),
        bytes_after=0,
    )
    expert_map: dict[str, list[int]] = {}
    for name, layer in list(mixture_layers(model)):
        old = layer.experts
        leaders = dominant[name]
        groups = group_experts(old.num_experts, leaders, similarity.get(name), generator=generator)
        if options.drop:
            groups = [g if e in leaders else -1 for e, g in enumerate(groups)]
        bank = ExpertBank(len(leaders), rank, old.d_in, old.d_out, dtype=old.A.dtype, device=old.A.device)
        residual = None
        if options.residual_density > 0:
            nnz = residual_size(options.residual_density, old.d_in, old.d_out)
            residual = SparseResidual(len(leaders), nnz, old.d_in, old.d_out, dtype=old.A.dtype, device=old.A.device)
        errors = []
        freq = frequencies[name].to(torch.float64)
        with torch.no_grad():
            for g in range(len(leaders)):
                members = [e for e, group in enumerate(groups) if group == g]
                weights = freq[members] if options.weighting == "frequency" else torch.ones(len(members))
                if not float(weights.sum()) > 0:  # no member was used on the calibration data
                    weights = torch.ones(len(members), dtype=torch.float64)
                weights = (weights / weights.sum()).to(old.A.device)
                A, B = old.A[members], old.B[members]
                if len(members) == 1 and rank == old.rank and residual is None:
                    bank.A[g], bank.B[g] = A[0], B[0]  # nothing to merge: keep the expert bit for bit
                    errors.append(0.0)
                    continue
                merged = merge_factors(A, B, weights, rank)
                bank.A[g], bank.B[g] = merged.A, merged.B
                total = float(merged.singular_values.pow(2).sum().sqrt())
                error = merged.truncation_error(rank)
                if residual is not None:
                    remainder = dense_delta(A, B, weights) - merged.B.double() @ merged.A.double()
                    index, value = top_magnitude(remainder, residual.nnz)
                    residual.index[g] = index.to(torch.int32)
                    residual.value[g] = value.to(residual.value.dtype)
                    remainder.view(-1)[index] = 0
                    error = float(remainder.norm())
                errors.append(error / total if total > 0 else 0.0)
        layer.experts = bank
        layer.expert_map = torch.tensor(groups, device=old.A.device)
        layer.residual = residual
        expert_map[name] = groups
        report.layers[name] = LayerMerge(
            groups=[[e for e, group in enumerate(groups) if group == g] for g in range(len(leaders))],
            dropped=[e for e, group in enumerate(groups) if group < 0],
            frequencies=[float(f) for f in frequencies[name]],
            relative_error=errors,
        )
    scale = config.scale
    alpha = scale * (math.sqrt(rank) if config.use_rslora else rank)  # keeps every layer's scale
    state.config = dataclasses.replace(
        config, rank=rank, alpha=alpha, merged=MergedLayout(expert_map, options.residual_density)
    )
    report.bytes_after = adapter_bytes(model)
    return report


__all__ = [
    "LayerMerge",
    "MergeOptions",
    "MergeReport",
    "MergedFactors",
    "adapter_bytes",
    "dense_delta",
    "dominant_experts",
    "group_experts",
    "merge_factors",
    "merge_mixture",
]
