"""ReMix in the finetune recipe: RLOO training, the gradient split, routing statistics in the logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_assets import run_assets, tiny_config

import lomix
from lomix.methods.remix.hooks import rloo_loss
from lomix.recipes import finetune, losses
from lomix.recipes.config import build_config
from lomix.recipes.evaluation import whole_sequences

REMIX = {"name": "remix", "k": 2, "granularity": "sequence", "omega_alpha": 8.0}
NO_BALANCE = {"balance": {"switch": 0.0}, "dropout": 0.0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return run_assets(tmp_path_factory.mktemp("remix"))


def config(assets, out, test=False, router=None, **sections):
    root, model, train, test_file = assets
    sections.setdefault("eval", {"after_training": False})
    data = tiny_config(root, model, train, test_file if test else None, **sections)
    data["output_dir"] = str(out)
    if router is not None:
        data["router"] = router  # replaces the tiny config's topk section
    return build_config(data)


@pytest.fixture
def fresh_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)


def _train(**extra):
    return {"max_steps": 3, "batch_size": 4, "lr": 2e-2, "warmup_steps": 0, "log_every": 1, "progress": False, **extra}


def test_rloo_loss_trains_experts_on_the_mean_loss_and_routers_on_the_surrogate(assets, tmp_path, fresh_state):
    cfg = config(assets, tmp_path / "split", mixture=NO_BALANCE, router=REMIX, rloo={"samples": 3}, train=_train())
    run = finetune.setup(cfg)
    layers = [layer for _, layer in lomix.mixture_layers(run.unwrapped)]
    with torch.no_grad():  # B starts at 0: give the routes something to change
        for layer in layers:
            layer.experts.B.normal_(std=0.3)
    batch = next(iter(run.loader))
    torch.manual_seed(0)
    token_sum, surrogate = rloo_loss(run.model, batch, 3)
    routers = [p for layer in layers for p in layer.router.parameters()]
    experts = [p for layer in layers for p in layer.experts.parameters()]
    # the experts' loss is the mean over the 3 selections of the summed answer loss
    torch.manual_seed(0)
    replicated = lomix.rloo.replicate(batch, 3)
    rows = losses.answer_loss_rows(*losses.forward(run.model, replicated))
    assert float(token_sum.detach()) == pytest.approx(float(rows.detach().sum()) / 3, rel=1e-5)
    # the mean loss reaches no router (constant gates, detached router input) ...
    assert all(g is None for g in torch.autograd.grad(token_sum, routers, retain_graph=True, allow_unused=True))
    # ... and the surrogate reaches only the routers, every one of them
    to_experts = torch.autograd.grad(surrogate, experts, retain_graph=True, allow_unused=True)
    assert all(g is None for g in to_experts)
    to_routers = torch.autograd.grad(surrogate, routers, allow_unused=True)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in to_routers)
    assert all(not layer.record_routing and layer.last_routing is None for layer in layers)


def test_remix_training_logs_routing_statistics_and_evaluates_full_sequences(assets, tmp_path, fresh_state):
    cfg = config(
        assets,
        tmp_path / "remix",
        test=True,
        mixture=NO_BALANCE,
        router=REMIX,
        rloo={"samples": 2},
        train=_train(),
        eval={"max_examples_per_task": 2, "max_new_tokens": 3},
    )
    run = finetune.setup(cfg)
    assert whole_sequences(run.unwrapped)
    before = {n: p.detach().clone() for n, p in run.unwrapped.named_parameters() if "router" in n}
    records = finetune.train(run)
    after = dict(run.unwrapped.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before), "a router did not train"
    losses = [r for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(r["loss"]) for r in losses)
    for record in losses:
        assert record["routing_effective_support"] == pytest.approx(2.0)  # k, by construction
        assert len(record["routing"]) == 8
        for layer in record["routing"].values():
            assert sum(layer["load"]) == pytest.approx(2.0)  # k distinct experts per token
            assert 1.0 <= layer["prob_support"] <= 4.0 and 0.0 <= layer["entropy"] <= math.log(4) + 1e-6
    logged = [json.loads(line) for line in (run.out / "log.jsonl").read_text().splitlines()]
    assert logged[0]["routing"] == losses[0]["routing"]
    # stats hooks are gone after training; evaluation (full sequences, no KV cache) still works
    assert all(not layer._forward_hooks for _, layer in lomix.mixture_layers(run.unwrapped))
    from lomix.recipes.evaluation import evaluate_model

    result = evaluate_model(run.unwrapped, run.formatter, run.test, run.tasks, cfg.eval, progress=False)
    assert set(result["tasks"]) == {"parity", "color", "echo"}


def test_topk_training_logs_the_same_statistics(assets, tmp_path, fresh_state):
    cfg = config(assets, tmp_path / "topk", train=_train(max_steps=2, trackers=["tensorboard"]))
    records = finetune.run(cfg)["records"]
    for record in records:
        assert 1.0 <= record["routing_effective_support"] <= 2.0
        for layer in record["routing"].values():
            assert sum(layer["load"]) == pytest.approx(2.0)
    tags = finetune.flat_scalars({"routing": records[0]["routing"]})
    name = next(iter(records[0]["routing"]))
    assert tags[f"routing/{name}/load/3"] == records[0]["routing"][name]["load"][3]


def test_the_cli_rejects_a_single_selection():
    from typer.testing import CliRunner

    from lomix.cli.app import app

    config = Path(finetune.__file__).parent / "configs" / "remix.yaml"
    result = CliRunner().invoke(app, ["train", str(config), "rloo.samples=1", "--dry-run"])
    assert result.exit_code == 2
    assert "rloo.samples: must be an integer >= 2, got 1" in result.stderr
