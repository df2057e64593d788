"""MC-SMoE merging (lomix.merge) against dense references: the product-space merge, the SVD
truncation error, the global budget, router rebinding, residuals, and save/load of merged mixtures."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts

import lomix
from lomix.checkpoint import read_config
from lomix.layout import MergedLayout, SparseResidual
from lomix.merge import MergeOptions, dominant_experts, group_experts, merge_factors, merge_mixture

LLAMA = MODEL_CASES["llama"]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def test_product_space_merge_is_the_weighted_sum_and_truncation_drops_the_tail():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 20, generator=g, dtype=torch.float64)
    B = torch.randn(3, 24, 4, generator=g, dtype=torch.float64)
    freq = torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64)
    weights = freq / freq.sum()
    reference = sum(freq[i] * B[i] @ A[i] for i in range(3)) / freq.sum()
    sigma = torch.linalg.svdvals(reference)

    full = merge_factors(A, B, weights, rank=12)  # 3 experts x rank 4: nothing is truncated
    torch.testing.assert_close(full.B @ full.A, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full.singular_values, sigma[:12], rtol=1e-10, atol=1e-10)
    # averaging the factors is NOT the merge (the reason for the product space)
    naive = (weights[:, None, None] * B).sum(0) @ (weights[:, None, None] * A).sum(0)
    assert (naive - reference).norm() > 0.1 * reference.norm()

    for rank in (1, 5, 8):
        cut = merge_factors(A, B, weights, rank)
        difference = reference - cut.B @ cut.A
        discarded = sigma[rank:12]
        assert cut.A.shape == (rank, 20) and cut.B.shape == (24, rank)
        torch.testing.assert_close(difference.norm(), discarded.pow(2).sum().sqrt(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.linalg.matrix_norm(difference, ord=2), discarded[0], rtol=1e-9, atol=1e-12)
        assert cut.truncation_error(rank) == pytest.approx(float(difference.norm()), rel=1e-9)

    padded = merge_factors(A[:1], B[:1], torch.ones(1, dtype=torch.float64), rank=6)  # product has rank 4 only
    torch.testing.assert_close(padded.B @ padded.A, B[0] @ A[0], rtol=1e-10, atol=1e-10)
    assert torch.all(padded.A[4:] == 0) and torch.all(padded.B[:, 4:] == 0)


def test_dominant_experts_share_a_global_budget_with_one_per_layer():
    freq = {
        "a": torch.tensor([0.9, 0.8, 0.1, 0.2]),
        "b": torch.tensor([0.5, 0.4, 0.6, 0.5]),
        "c": torch.tensor([0.05, 0.01, 0.02, 0.03]),  # rarely used: still keeps one group
    }
    # budget 6: one per layer (a0, b2, c0), then a1 (0.8), b0 (0.5, ranked above b3 in its layer), b3 (0.5)
    assert dominant_experts(freq, 2) == {"a": [0, 1], "b": [0, 2, 3], "c": [0]}
    assert dominant_experts(freq, 1) == {"a": [0], "b": [2], "c": [0]}
    assert dominant_experts(freq, 4) == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1, 2, 3]}
    # equal frequencies spread the budget evenly instead of filling the first layers
    flat = {name: torch.full((4,), 0.5) for name in "xyz"}
    assert dominant_experts(flat, 2) == {name: [0, 1] for name in "xyz"}
    with pytest.raises(lomix.ConfigError, match="every layer needs one"):
        dominant_experts(freq, 0.5)
    with pytest.raises(lomix.ConfigError, match="asks for 15 groups but the layers hold 12"):
        dominant_experts(freq, 5)


def test_each_expert_joins_its_most_similar_dominant_expert():
    sim = torch.tensor(
        [
            [1.0, 0.2, 0.9, 0.1],
            [0.2, 1.0, 0.3, 0.8],
            [0.9, 0.3, 1.0, 0.3],
            [0.1, 0.8, 0.3, 1.0],
        ]
    )
    assert group_experts(4, [0, 1], sim) == [0, 1, 0, 1]
    assert group_experts(4, [2, 3], sim) == [0, 1, 0, 1]
    random_groups = group_experts(8, [1, 5], None, generator=torch.Generator().manual_seed(0))
    assert random_groups[1] == 0 and random_groups[5] == 1 and set(random_groups) == {0, 1}


def _mixture(seed: int = 0, **config):
    model, fresh = build_pair(LLAMA, seed)
    defaults = dict(target_modules=TARGETS, num_experts=4, rank=4, alpha=8, router=lomix.router_config("topk", k=2))
    defaults.update(config)
    lomix.inject(model, lomix.MixtureConfig(**defaults))
    randomize_experts(model, std=0.3)
    return model, fresh


def _batches(count: int = 3):
    return [LLAMA.inputs(torch.Generator().manual_seed(10 + s)) for s in range(count)]


def _stats(model, batches):
    with lomix.RoutingStats(model) as stats, torch.no_grad():
        for batch in batches:
            model(**batch)
    return stats


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_merging_to_as_many_experts_as_there_are_is_the_identity(tmp_path):
    model, fresh = _mixture()
    batches = _batches()
    expected = [_logits(model, b) for b in batches]
    report = merge_mixture(model, _stats(model, batches), MergeOptions(experts=4))
    assert all(layer.groups == [[0], [1], [2], [3]] for layer in report.layers.values())
    assert report.bytes_after == report.bytes_before
    # Same function, not the same kernel: the unmerged layers evaluate through the one-GEMM inference
    # path (gates as the softmax of the top-k logits, the scale folded into the expand matrix),
    # a merged bank through the router and the generic kernel, so the two agree to float rounding.
    for batch, logits in zip(batches, expected, strict=True):
        torch.testing.assert_close(_logits(model, batch), logits, rtol=1e-6, atol=1e-6)
    lomix.save(model, tmp_path / "m")
    reloaded = lomix.load(fresh, tmp_path / "m")
    for batch, logits in zip(batches, expected, strict=True):
        torch.testing.assert_close(_logits(reloaded, batch), logits, rtol=1e-6, atol=1e-6)


def _group_reference(report, rank):
    """The unmerged model with every router expert i replaced by the merged expert of its group,
    built densely from the frequency-weighted product: routing through it must equal the merged
    model, whose router rebinding sums the gates of a group's members."""
    reference, _ = _mixture()
    with torch.no_grad():
        for name, layer in lomix.mixture_layers(reference):
            info = report.layers[name]
            freq = torch.tensor(info.frequencies, dtype=torch.float64)
            for members in info.groups:
                w = freq[members] / freq[members].sum()
                delta = sum(
                    w[j] * layer.experts.B[i].double() @ layer.experts.A[i].double() for j, i in enumerate(members)
                )
                u, s, vh = torch.linalg.svd(delta)
                b, a = u[:, :rank] * s[:rank], vh[:rank]
                for i in members:
                    layer.experts.B[i].zero_()
                    layer.experts.A[i].zero_()
                    layer.experts.B[i, :, :rank] = b.float()
                    layer.experts.A[i, :rank] = a.float()
    return reference


@pytest.mark.parametrize("rank", [12, 3])
def test_merged_experts_with_rebound_router_equal_the_dense_weighted_merge(rank, tmp_path):
    model, fresh = _mixture()
    original, _ = _mixture()  # the same mixture again (same seeds)
    batches = _batches()
    report = merge_mixture(model, _stats(model, batches), MergeOptions(experts=2, rank=rank))
    assert report.experts_after == 2 * len(report.layers) and report.rank_after == rank
    assert any(len(members) > 1 for info in report.layers.values() for members in info.groups)
    for name, layer in lomix.mixture_layers(model):
        assert layer.experts.A.shape == (2, rank, layer.d_in) and layer.router.num_experts == 4
        if rank == 8:  # 2 members x rank 4 fit into rank 8: the merge is exact
            assert max(report.layers[name].relative_error) < 1e-6
    # the reference stores each merged expert in a rank-4 slot: compare at rank <= 4
    if rank <= 4:
        reference = _group_reference(report, rank)
        for batch in batches:
            torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), rtol=1e-4, atol=1e-5)
    else:
        # a merged group has rank up to 12, more than a slot of the unmerged bank: compare the deltas
        for name, layer in lomix.mixture_layers(model):
            info = report.layers[name]
            freq = torch.tensor(info.frequencies, dtype=torch.float64)
            original_layer = original.get_submodule(name)
            for g, members in enumerate(info.groups):
                w = freq[members] / freq[members].sum()
                exact = sum(
                    w[j] * original_layer.experts.B[i].double() @ original_layer.experts.A[i].double()
                    for j, i in enumerate(members)
                )
                merged = layer.experts.B[g].double() @ layer.experts.A[g].double()
                torch.testing.assert_close(merged, exact, rtol=1e-5, atol=1e-6)
    config = model.lomix_state.config
    assert config.rank == rank and config.scale == pytest.approx(2.0)  # alpha follows the rank
    lomix.save(model, tmp_path / "m")
    assert read_config(tmp_path / "m").merged.expert_map == config.merged.expert_map
    reloaded = lomix.load(fresh, tmp_path / "m")
    for batch in batches:
        torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=1e-5, atol=1e-6)


def test_uniform_weights_and_dropping_match_their_definitions():
    model, _ = _mixture()
    original, _ = _mixture()
    batches = _batches()
    stats = _stats(model, batches)
    uniform, _ = _mixture()
    report = merge_mixture(uniform, stats, MergeOptions(experts=2, weighting="uniform", rank=12))
    for name, layer in lomix.mixture_layers(uniform):
        source = original.get_submodule(name).experts
        for g, members in enumerate(report.layers[name].groups):
            mean = sum(source.B[i].double() @ source.A[i].double() for i in members) / len(members)
            torch.testing.assert_close(
                layer.experts.B[g].double() @ layer.experts.A[g].double(), mean, atol=1e-6, rtol=1e-5
            )

    dropped, _ = _mixture()
    report = merge_mixture(dropped, stats, MergeOptions(experts=2, drop=True))
    # reference: the unmerged mixture with the dropped experts zeroed (their gates then add nothing)
    with torch.no_grad():
        for name, layer in lomix.mixture_layers(original):
            assert len(report.layers[name].dropped) == 2
            for expert in report.layers[name].dropped:
                layer.experts.B[expert].zero_()
    for batch in batches:
        torch.testing.assert_close(_logits(dropped, batch), _logits(original, batch), rtol=1e-5, atol=1e-6)


def test_sparse_residual_equals_its_dense_form_and_reduces_the_error(tmp_path):
    residual = SparseResidual(3, 5, 6, 4)
    g = torch.Generator().manual_seed(0)
    residual.index.copy_(torch.stack([torch.randperm(24, generator=g)[:5] for _ in range(3)]).int())
    residual.value.copy_(torch.randn(3, 5, generator=g))
    x = torch.randn(7, 6, generator=g)
    indices = torch.tensor([[0, 2]] * 3 + [[1, 1]] * 4)
    gates = torch.rand(7, 2, generator=g)
    expected = torch.stack(
        [sum(0.5 * gates[t, j] * residual.dense(int(indices[t, j])) @ x[t] for j in range(2)) for t in range(7)]
    )
    torch.testing.assert_close(residual(x, indices, gates, 0.5), expected)

    model, fresh = _mixture()
    batches = _batches()
    stats = _stats(model, batches)
    plain, _ = _mixture()
    low = merge_mixture(plain, stats, MergeOptions(experts=2, rank=2))
    kept = merge_mixture(model, stats, MergeOptions(experts=2, rank=2, residual_density=0.1))
    for name in low.layers:
        assert all(
            a < b for a, b in zip(kept.layers[name].relative_error, low.layers[name].relative_error, strict=True)
        )
    assert kept.bytes_after > low.bytes_after
    lomix.save(model, tmp_path / "m")
    reloaded = lomix.load(fresh, tmp_path / "m")
    assert all(
        layer.residual is not None and layer.residual.value.abs().sum() > 0
        for _, layer in lomix.mixture_layers(reloaded)
    )
    for batch in batches:
        torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(_logits(plain, batch), _logits(model, batch), atol=1e-4)


def test_merge_refuses_what_it_cannot_merge():
    model, _ = _mixture()
    with pytest.raises(lomix.LomixError, match="saw no token of this layer"):
        merge_mixture(model, lomix.RoutingStats(model), MergeOptions(experts=2))
    fixed, _ = _mixture(router=lomix.router_config("fixed", experts=[0, 1]))
    with pytest.raises(lomix.LomixError, match=r"reports no logits.*grouping='random'"):
        merge_mixture(fixed, _stats(fixed, _batches(1)), MergeOptions(experts=2))
    merge_mixture(fixed, _stats(fixed, _batches(1)), MergeOptions(experts=2, grouping="random"))
    with pytest.raises(lomix.LomixError, match="already merged"):
        merge_mixture(fixed, _stats(fixed, _batches(1)), MergeOptions(experts=2, grouping="random"))
    with pytest.raises(lomix.ConfigError, match="experts: must be > 0"):
        MergeOptions(experts=0)


def test_merged_layout_is_validated_with_the_field_named():
    with pytest.raises(lomix.ConfigError, match=r"merged.expert_map.q: bank expert ids must be 0..G-1"):
        MergedLayout({"q": [0, 2, 2, 0]})
    with pytest.raises(lomix.ConfigError, match=r"merged.expert_map.q: drops every expert"):
        MergedLayout({"q": [-1, -1]})
    with pytest.raises(lomix.ConfigError, match=r"merged.expert_map.q: needs one entry per router expert \(4\)"):
        lomix.MixtureConfig(num_experts=4, merged={"expert_map": {"q": [0, 1]}})
    config = lomix.MixtureConfig(num_experts=4, merged={"expert_map": {"q": [0, 1, 0, -1]}, "residual_density": 0.01})
    assert lomix.MixtureConfig.from_json(config.to_json()) == config
    assert "merged" not in lomix.MixtureConfig().to_dict()  # unmerged configs are written as before


@lomix.register_router("test_merge_task_mix", lomix.RouterConfig)
class _TaskMix(lomix.Router):
    """Poly-like: one softmax row of weights over the experts, whatever the input."""

    def __init__(self, config, d_in, num_experts):
        super().__init__(config, d_in, num_experts)
        self.logits = torch.nn.Parameter(torch.randn(1, 1, num_experts))

    def forward(self, x, context):
        return lomix.ParameterMixing(weights=self.logits.softmax(-1).expand(x.shape[0], -1, -1))


def test_parameter_mixing_mixtures_are_pointed_to_export_instead():
    model, _ = _mixture(router={"name": "test_merge_task_mix"})
    with pytest.raises(lomix.LomixError, match=r"mixes parameters per task \(Poly/MHR\).*lomix export --task"):
        merge_mixture(model, _stats(model, _batches(1)), MergeOptions(experts=2))
