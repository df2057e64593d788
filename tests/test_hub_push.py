"""`lomix.hub.push`: the exact files and model card that reach the hub's commit API, and back."""

from __future__ import annotations

import json

import hubserver
import pytest
import torch
import yaml
from conftest import build_pair
from hubdata import LLAMA, logits, save_mixture

import lomix
import lomix.hub
from lomix.hub import errors

EVAL = {"date_understanding": {"accuracy": 0.575, "n": 40}, "navigate": {"accuracy": 0.5125, "n": 40}}
ROUTING = {"model.layers.0.self_attn.q_proj": [0.5, 0.25, 0.25], "model.layers.1.self_attn.q_proj": [0.1, 0.2, 0.7]}
CONFIG_YAML = "model: HuggingFaceTB/SmolLM2-135M-Instruct\nmixture:\n  num_experts: 3\n  rank: 4\nlr: 0.001\n"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from hubserver.serve(tmp_path, monkeypatch)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as a recipe leaves it: the mixture in mixture/, the config, evaluation and routing files."""
    run = tmp_path / "run"
    _, model = save_mixture(run / "mixture", seed=7, router=lomix.router_config("topk", k=2))
    (run / "resolved_config.yaml").write_text(CONFIG_YAML)
    (run / "eval_results.json").write_text(json.dumps(EVAL))
    (run / "routing_stats.json").write_text(json.dumps(ROUTING))
    (run / "train_log.txt").write_text("not uploaded\n")
    return run, model


def test_push_commits_exactly_the_mixture_config_evaluation_and_card(hub, run_dir):
    run, model = run_dir
    result = lomix.hub.push(run, "user/new-mix", private=True, token=hub.write_token)

    assert [c["repo_id"] for c in hub.created] == ["user/new-mix"] and hub.created[0]["visibility"] == "private"
    (commit,) = hub.commits
    expected = {
        "lomix_config.json": (run / "mixture" / "lomix_config.json").read_bytes(),
        "lomix_model.safetensors": (run / "mixture" / "lomix_model.safetensors").read_bytes(),
        "resolved_config.yaml": CONFIG_YAML.encode(),
        "eval_results.json": json.dumps(EVAL).encode(),
        "routing_stats.json": json.dumps(ROUTING).encode(),
    }
    assert sorted(commit["files"]) == sorted([*expected, "README.md"])
    assert {k: v for k, v in commit["files"].items() if k != "README.md"} == expected
    assert commit["header"]["summary"] == "Upload lomix mixture (3 experts, rank 4, router topk)"
    assert result.commit == hub.repos["user/new-mix"].refs["main"] and result.files == sorted(commit["files"])
    writes = [r for r in hub.requests if r.method == "POST"]
    assert [r.path.split("/")[-1] for r in writes] == ["create", "validate-yaml", "main", "main"]
    assert all(r.headers.get("authorization") == f"Bearer {hub.write_token}" for r in writes)

    # The card renders with huggingface_hub's ModelCard.load, fetched back from the hub.
    from huggingface_hub import ModelCard

    card = ModelCard.load("user/new-mix", token=hub.write_token)
    assert card.content.encode() == commit["files"]["README.md"]
    assert card.data.library_name == "lomix"
    assert card.data.tags == ["lomix", "lora", "mixture-of-lora-experts", "router-topk"]
    assert card.data.base_model is None  # the tiny model was built from a config: no hub id to name
    text = card.text
    for section in ("## Method", "## Experts", "## Trainable parameters", "## Evaluation", "## Routing statistics"):
        assert section in text
    assert "**Top-k token routing** (`topk`)" in text and "| k | 2 |" in text
    assert "| experts per layer | 3 |" in text and "| rank r | 4 |" in text and "| wrapped layers | 4 |" in text
    experts = sum(p.numel() for _, layer in lomix.mixture_layers(model) for p in layer.experts.parameters())
    routers = sum(p.numel() for _, layer in lomix.mixture_layers(model) for p in layer.router.parameters())
    assert f"{experts + routers:,} parameters" in text and f"{experts:,} in the experts" in text
    assert f"{routers:,} in the routers" in text
    assert "| task | accuracy | n |" in text and "| date_understanding | 0.575 | 40 |" in text
    assert "| navigate | 0.5125 | 40 |" in text
    assert "| layer | expert 0 | expert 1 | expert 2 |" in text
    assert "| model.layers.1.self_attn.q_proj | 0.1 | 0.2 | 0.7 |" in text
    assert "The resolved training config is `resolved_config.yaml`" in text and "lr: 0.001" in text
    assert 'lomix.hub.load(model, "user/new-mix")' in text and "lomix hub pull user/new-mix --out mixture/" in text
    front = commit["files"]["README.md"].decode().split("---")[1]
    assert yaml.safe_load(front) == {"library_name": "lomix", "tags": card.data.tags}

    # What was pushed loads back into a fresh base and computes what the trained model computed.
    fresh = build_pair(LLAMA)[1]
    lomix.hub.load(fresh, "user/new-mix", token=hub.write_token)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


def test_the_card_names_a_hub_base_model(hub, tmp_path):
    folder, model = save_mixture(tmp_path / "mix", seed=1)
    plan = lomix.hub.plan_push(folder, "user/mix", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert plan.card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "[`HuggingFaceTB/SmolLM2-135M-Instruct`](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in (
        plan.readme
    )
    assert plan.paths() == ["README.md", "lomix_config.json", "lomix_model.safetensors"]  # nothing else to send
    model.config._name_or_path = "/local/checkpoints/llama"  # a local path never becomes metadata
    lomix.save(model, folder)
    plan = lomix.hub.plan_push(folder, "user/mix")
    assert plan.card.data.base_model is None and "`/local/checkpoints/llama`" in plan.readme
    assert not hub.requests  # planning touches no network


def test_a_refused_push_commits_nothing(hub, run_dir):
    run, _ = run_dir
    with pytest.raises(errors.AccessError, match=r"user/new-mix: the hub refused the push \(HTTP 401\).*HF_TOKEN"):
        lomix.hub.push(run, "user/new-mix")
    assert hub.commits == [] and "user/new-mix" not in hub.repos
    hub.close()
    with pytest.raises(errors.OfflineError, match=r"user/new-mix: cannot push \(cannot reach"):
        lomix.hub.push(run, "user/new-mix", token=hub.write_token)


def test_run_folders_that_cannot_be_pushed(hub, tmp_path):
    with pytest.raises(lomix.MissingFileError, match=r"no such folder"):
        lomix.hub.plan_push(tmp_path / "none", "user/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lomix.MissingFileError, match=r"holds no lomix mixture"):
        lomix.hub.plan_push(tmp_path / "empty", "user/x")
    save_mixture(tmp_path / "run" / "checkpoint-10", seed=1)
    save_mixture(tmp_path / "run" / "checkpoint-20", seed=2)
    with pytest.raises(lomix.MissingFileError, match=r"several mixtures \(checkpoint-10, checkpoint-20\)"):
        lomix.hub.plan_push(tmp_path / "run", "user/x")
    save_mixture(tmp_path / "run" / "final", seed=3)
    (tmp_path / "run" / "config.yaml").write_text("lr: 1\n")
    plan = lomix.hub.plan_push(tmp_path / "run", "user/x")
    assert (
        plan.mixture.folder == tmp_path / "run" / "final"
        and plan.files["config.yaml"] == tmp_path / "run" / "config.yaml"
    )
    (tmp_path / "run" / "final" / "lomix_model.safetensors").write_bytes(b"broken")
    with pytest.raises(lomix.CorruptFileError, match=r"final/lomix_model\.safetensors: not a readable safetensors"):
        lomix.hub.push(tmp_path / "run", "user/x", token=hub.write_token)
    with pytest.raises(errors.SpecError, match=r"'not/a/repo' is not a hub repository id"):
        lomix.hub.plan_push(tmp_path / "run" / "checkpoint-10", "not/a/repo")
    assert not hub.requests  # nothing reached the hub


def test_evaluation_files_of_other_shapes():
    from lomix.hub.card import data_table

    assert (
        data_table({"accuracy": 0.5, "loss": 1.25})
        == "| metric | value |\n|---|---|\n| accuracy | 0.5 |\n| loss | 1.25 |"
    )
    harness = {"results": {"arc": {"acc": 0.25}}, "config": {"model": "x"}}
    assert data_table(harness, "task") == "| task | acc |\n|---|---|\n| arc | 0.25 |"
    assert data_table([{"task": "a", "acc": 1}, {"task": "b", "f1": 0.5}]) == (
        "| task | acc | f1 |\n|---|---|---|\n| a | 1 |  |\n| b |  | 0.5 |"
    )
    assert data_table({"nested": {"deeper": {"x": 1}}}).startswith("```json\n")
