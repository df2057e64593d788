"""Routing statistics against direct computations on the recorded routing decisions."""

from __future__ import annotations

import torch
from conftest import MODEL_CASES, build_pair, randomize_experts

import lomix
from lomix.stats import RoutingStats, effective_support, entropy


def test_effective_support_and_entropy_formulas():
    gates = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    torch.testing.assert_close(effective_support(gates), torch.tensor([2.0, 1.0, 1.0 / (0.0625 + 0.5625)]))
    probs = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0]])
    torch.testing.assert_close(entropy(probs), torch.tensor([torch.log(torch.tensor(4.0)).item(), 0.0]))


def test_collected_statistics_match_the_recorded_routing():
    case = MODEL_CASES["llama"]
    model, _ = build_pair(case)
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj", "up_proj"], num_experts=4, rank=2))
    randomize_experts(model)
    batches = [case.inputs(torch.Generator().manual_seed(s)) for s in range(2)]
    records: dict[str, list] = {}

    def keep(name):
        def hook(module, args, output):
            records.setdefault(name, []).append(module.last_routing)

        return hook

    with RoutingStats(model) as stats:
        handles = [layer.register_forward_hook(keep(n)) for n, layer in lomix.mixture_layers(model)]
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        for handle in handles:
            handle.remove()
    summary = stats.summary()
    assert set(summary) == {n for n, _ in lomix.mixture_layers(model)}
    for name, routings in records.items():
        masks = [b["attention_mask"].reshape(-1).bool() for b in batches]
        idx = torch.cat([r.indices[m] for r, m in zip(routings, masks, strict=True)])
        probs = torch.cat([r.probs[m] for r, m in zip(routings, masks, strict=True)])
        logits = torch.cat([r.logits[m] for r, m in zip(routings, masks, strict=True)]).double()
        load = torch.stack([(idx == e).any(-1).double().mean() for e in range(4)])
        s = summary[name]
        assert s["tokens"] == idx.shape[0] == sum(int(m.sum()) for m in masks)
        torch.testing.assert_close(torch.tensor(s["load"], dtype=torch.float64), load)
        torch.testing.assert_close(torch.tensor(s["mean_prob"], dtype=torch.float64), probs.double().mean(0))
        assert abs(s["entropy"] - entropy(probs).mean().item()) < 1e-6
        gates = torch.cat([r.gates[m] for r, m in zip(routings, masks, strict=True)])
        assert abs(s["effective_support"] - effective_support(gates).mean().item()) < 1e-6
        cos = torch.nn.functional.cosine_similarity(logits[:, :, None], logits[:, None, :], dim=0)
        torch.testing.assert_close(stats.layers[name].logit_cosine(), cos)
    # recording is switched off again afterwards
    assert all(not layer.record_routing and layer.last_routing is None for _, layer in lomix.mixture_layers(model))
