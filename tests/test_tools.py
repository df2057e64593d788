"""`lomix inspect`, `lomix merge` and `lomix export` through the real command, on run folders of the
tiny config-built Llama; plus the distillation loss and the router-logit summary against direct
computations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_experts
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_jsonl
from torch.nn import functional as F

import lomix
from lomix.merge import MergeOptions
from lomix.recipes import export as export_recipe
from lomix.recipes import merge as merge_recipe
from lomix.recipes.distill import distillation_loss

LOMIX = str(Path(sys.executable).parent / "lomix")


def lomix_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([LOMIX, *map(str, args)], capture_output=True, text=True)


def test_distillation_loss_is_ce_plus_weighted_kl_at_temperature_on_answer_tokens():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    loss, ce, kl = distillation_loss(student, teacher, labels, kd_weight=0.2, temperature=2.0)
    # position t predicts labels[t + 1]; only answer tokens count
    pairs = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    ce_ref = sum(-F.log_softmax(student[b, t], -1)[labels[b, t + 1]] for b, t in pairs) / len(pairs)
    kl_ref = 0.0
    for b, t in pairs:
        p_t, log_p_s = F.softmax(teacher[b, t] / 2, -1), F.log_softmax(student[b, t] / 2, -1)
        kl_ref += (p_t * (p_t.log() - log_p_s)).sum() * 4 / len(pairs)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(loss, ce_ref + 0.2 * kl_ref)


def test_logit_summary_matches_the_recorded_logits():
    from conftest import MODEL_CASES, build_pair

    case = MODEL_CASES["llama"]
    model, _ = build_pair(case)
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=4, rank=2))
    randomize_experts(model)
    seen = []
    inputs = case.inputs(torch.Generator().manual_seed(0))
    with lomix.RoutingStats(model) as stats, torch.no_grad():
        layer = next(layer for _, layer in lomix.mixture_layers(model))
        handle = layer.register_forward_hook(lambda m, a, o: seen.append(m.last_routing.logits))
        model(**inputs)
        handle.remove()
    logits = torch.cat(seen)[inputs["attention_mask"].reshape(-1).bool()].double()
    summary = next(iter(stats.layers.values())).logit_summary()
    torch.testing.assert_close(torch.tensor(summary["mean"], dtype=torch.float64), logits.mean(0))
    torch.testing.assert_close(torch.tensor(summary["std"], dtype=torch.float64), logits.std(0, unbiased=False))
    torch.testing.assert_close(
        torch.tensor(summary["cosine"], dtype=torch.float64),
        F.cosine_similarity(logits[:, :, None], logits[:, None, :], dim=0),
    )


# ----------------------------------------------------------------------------------------------
# The commands, on run folders written the way `lomix train` writes them (no training needed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lomix.recipes.assets import load_model_and_tokenizer
    from lomix.recipes.config import build_config
    from lomix.recipes.data import load_examples, task_set

    root = tmp_path_factory.mktemp("tools")
    model_dir = make_model_dir(root / "model")
    train = write_jsonl(root / "train.jsonl", tiny_rows(0, 12))
    test = write_jsonl(root / "test.jsonl", tiny_rows(1, 4))

    def make_run(name: str, router: dict) -> Path:
        config = tiny_config(root, model_dir, train, test, output_dir=str(root / name))
        config["router"] = router
        cfg = build_config(config)
        run = root / name
        run.mkdir()
        (run / "config.yaml").write_text(cfg.to_yaml())
        tasks = task_set(load_examples(cfg.data)[0], cfg.data)
        (run / "tasks.json").write_text(json.dumps(tasks.to_dict()))
        model, _ = load_model_and_tokenizer(cfg.model)
        lomix.inject(model, cfg.mixture)
        randomize_experts(model, std=0.3)
        lomix.save(model, run / "mixture")
        return run

    topk = make_run("topk", {"name": "topk", "k": 2})
    fixed = make_run("fixed", {"name": "fixed", "experts": [0, 2], "weights": [0.6, 0.4]})
    return root, model_dir, topk, fixed


def _load(model_dir: Path, mixture: Path | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return lomix.load(model, mixture) if mixture is not None else model


def _logits(model, **routing):
    ids = torch.arange(3, 36).reshape(3, 11)
    with torch.no_grad():
        return model(input_ids=ids, **routing).logits


@pytest.mark.slow
def test_merge_then_inspect_the_merged_run(runs):
    root, model_dir, topk, _ = runs
    merged = root / "merged"
    result = lomix_cli(
        "merge", topk, "eval.max_examples_per_task=2", "--experts", 2, "--out", merged, "--max-examples-per-task", 4,
        "--recover-steps", 2, "--eval",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in merged.iterdir()) == [
        "config.yaml", "eval.json", "merge.json", "mixture", "tasks.json"
    ]  # fmt: skip
    report = json.loads((merged / "merge.json").read_text())
    layers = report["layers"]
    assert report["experts_before"] == 4 * len(layers) and report["experts_after"] == 2 * len(layers)
    assert report["bytes_after"] < report["bytes_before"]
    assert [r["step"] for r in report["recovery"]] == [1, 2] and all(r["kl"] >= 0 for r in report["recovery"])
    scored = json.loads((merged / "eval.json").read_text())["tasks"]
    assert set(scored) == {"color", "echo", "parity"}
    assert all(task["n"] == 2 for task in scored.values())  # the override eval.max_examples_per_task=2
    model = _load(model_dir, merged / "mixture")
    sizes = [layer.experts.num_experts for _, layer in lomix.mixture_layers(model)]
    assert sum(sizes) == 2 * len(layers) and min(sizes) >= 1  # a global budget: 2 per layer on average
    assert sizes == [len(info["groups"]) for info in layers.values()]
    # recovery trained the merged experts: they differ from a merge without recovery
    plain = root / "merged-plain"
    merge_recipe.run(topk, plain, MergeOptions(experts=2), calibration_per_task=4)  # in-process: the same code
    assert not torch.allclose(_logits(model), _logits(_load(model_dir, plain / "mixture")))

    out = root / "report"
    result = lomix_cli("inspect", merged / "mixture", "--data", "test", "--out", out, "--max-examples-per-task", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["load_heatmap.png", "routing.json", "task_heatmap.png"]
    for png in ("load_heatmap.png", "task_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "routing.json").read_text())
    assert set(payload["layers"]) == set(layers) and payload["data"]["examples"] == 9
    for info in payload["layers"].values():
        assert len(info["load"]) == 4  # the router's 4 experts, not the bank's 2
        assert sum(info["load"]) == pytest.approx(2.0)  # top-2 of distinct experts: loads sum to k
        assert info["effective_support"] <= 2.0 + 1e-9 and 0 < info["entropy"] <= float(torch.log(torch.tensor(4.0)))
        assert all(abs(info["logits"]["cosine"][e][e] - 1) < 1e-9 for e in range(4))
    tasks = payload["tasks"]
    assert set(tasks) == {"color", "echo", "parity"}
    assert sum(t["tokens"] for t in tasks.values()) == next(iter(payload["layers"].values()))["tokens"]
    for info in tasks.values():
        rows = torch.tensor(list(info["layers"].values()))
        torch.testing.assert_close(torch.tensor(info["mean"]), rows.mean(0))


@pytest.mark.slow
def test_export_formats_through_the_command(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, model_dir, topk, fixed = runs
    expected = _logits(_load(model_dir, fixed / "mixture"))
    assert not torch.allclose(expected, _logits(_load(model_dir)), atol=1e-3)

    result = lomix_cli("export", fixed, "--format", "merged", "--out", root / "x-merged")
    assert result.returncode == 0, result.stderr[-3000:]
    export_recipe.run(fixed, "peft", root / "x-peft")  # the command's code, in-process (one start less)
    merged = AutoModelForCausalLM.from_pretrained(root / "x-merged").eval()
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-5)
    assert AutoTokenizer.from_pretrained(root / "x-merged").chat_template  # the tokenizer travels along
    peft = PeftModel.from_pretrained(_load(model_dir), str(root / "x-peft")).eval()
    torch.testing.assert_close(_logits(peft), expected, rtol=1e-4, atol=1e-5)

    result = lomix_cli("export", topk, "--format", "peft", "--out", root / "refused")
    assert result.returncode == 2 and not (root / "refused").exists()
    assert "routes each token on its own" in result.stderr and "--task T" in result.stderr
    assert "--format lomix" in result.stderr
    with pytest.raises(lomix.ConfigError, match=r"unknown task 'nope'.*parity"):
        export_recipe.run(fixed, "merged", root / "refused", task="nope")

    export_recipe.run(topk, "lomix", root / "x-lomix")
    assert {p.name for p in (root / "x-lomix").iterdir()} >= {lomix.CONFIG_NAME, lomix.WEIGHTS_NAME, "tasks.json"}
    torch.testing.assert_close(
        _logits(_load(model_dir, root / "x-lomix")), _logits(_load(model_dir, topk / "mixture")), rtol=0, atol=0
    )


def test_layers_injected_into_an_eval_model_are_in_eval_mode():
    from conftest import MODEL_CASES, build_pair

    model, _ = build_pair(MODEL_CASES["llama"])  # eval mode
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=2, dropout=0.5))
    assert all(not layer.training for _, layer in lomix.mixture_layers(model))
    randomize_experts(model)
    inputs = MODEL_CASES["llama"].inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)  # no dropout
    model.train()
    assert all(layer.training for _, layer in lomix.mixture_layers(model))
