"""LoRA-Mixer's recipe stages (`lomix loramixer`): hard then soft on the tiny model, plug-and-play
PEFT adapters through the CLI, and the hard stage's expert isolation inside the finetune loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import run_assets, tiny_config, write_config

import lomix
from lomix.errors import ConfigError
from lomix.methods.loramixer import recipe
from lomix.recipes import finetune
from lomix.recipes.config import build_config

LOMIX = str(Path(sys.executable).with_name("lomix"))
ROUTER = {"name": "loramixer", "k": 2, "sbl_alpha": 0.01, "sbl_lambda": 0.01}
MIXTURE = {"num_experts": 3, "rank": 4, "alpha": 8, "dropout": 0.0, "balance": {"switch": 0.0}}
TRAIN = {"max_steps": 3, "batch_size": 4, "lr": 2e-2, "warmup_steps": 0, "log_every": 1, "progress": False}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return run_assets(tmp_path_factory.mktemp("loramixer"))


@pytest.fixture
def fresh_state():
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)


def config_dict(assets, out, **sections):
    root, model, train, test = assets
    sections = {
        "mixture": MIXTURE,
        "train": TRAIN,
        "eval": {"max_examples_per_task": 2, "before_training": True},
        **sections,
    }
    data = tiny_config(root, model, train, test, **sections)
    data["router"] = dict(ROUTER)
    data["output_dir"] = str(out)
    return data


def _experts(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / lomix.WEIGHTS_NAME).items() if ".experts." in k}


def _routers(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / lomix.WEIGHTS_NAME).items() if ".router." in k}


def test_hard_then_soft_stage(assets, tmp_path, fresh_state):
    cfg = build_config(config_dict(assets, tmp_path / "run", loramixer={"hard_steps": 3, "soft_steps": 2}))
    results = recipe.run(cfg)
    hard, soft = tmp_path / "run" / "hard" / "mixture", tmp_path / "run" / "soft" / "mixture"
    hard_config, soft_config = lomix.checkpoint.read_config(hard), lomix.checkpoint.read_config(soft)
    assert (hard_config.router.stage, soft_config.router.stage) == ("hard", "soft")
    # serial targets: the attention projections, not the tiny config's up/down projections
    assert {name.rsplit(".", 1)[-1] for name in hard_config.target_modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # The soft stage trains the router only: experts as the hard stage left them, routers moved.
    hard_experts, soft_experts = _experts(hard), _experts(soft)
    assert hard_experts and all(torch.equal(hard_experts[k], soft_experts[k]) for k in hard_experts)
    assert any(not torch.equal(v, _routers(soft)[k]) for k, v in _routers(hard).items())
    # The hard stage trained every domain's expert (B starts at zero).
    b = next(v for k, v in hard_experts.items() if k.endswith(".B"))
    assert all(b[e].abs().sum() > 0 for e in range(3))
    assert len(results["hard"]["records"]) == 3 and len([r for r in results["soft"]["records"] if "loss" in r]) == 2
    assert results["hard"]["before"] is not None and results["soft"]["before"] is None
    assert results["soft"]["after"] is not None
    summary = json.loads((tmp_path / "run" / "loramixer.json").read_text())
    assert summary["mixture"] == str(soft) and summary["soft"]["after"] == results["soft"]["after"]
    # loramixer.init_from: a later soft stage starts from this hard stage; other mixtures are refused.
    assert recipe.hard_mixture(tmp_path / "run" / "hard") == hard
    lomix.save(lomix.inject(_tiny_llama(), lomix.MixtureConfig(num_experts=2)), tmp_path / "topk")
    with pytest.raises(ConfigError, match=r"loramixer\.init_from.*'topk' router"):
        recipe.hard_mixture(tmp_path / "topk")
    with pytest.raises(ConfigError, match=r"loramixer\.init_from.*holds no lomix mixture"):
        recipe.hard_mixture(tmp_path)
    soft_log = [json.loads(line) for line in (soft.parent / "log.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] != 0 for r in soft_log if "aux_loss" in r)  # the SBL is in the soft stage's loss


def _tiny_llama():
    from conftest import MODEL_CASES

    return MODEL_CASES["llama"].build()


def test_hard_stage_in_the_finetune_loop_moves_only_the_batch_domains_experts(assets, tmp_path, fresh_state):
    data = config_dict(assets, tmp_path / "iso", train={**TRAIN, "weight_decay": 0.1}, eval={"after_training": False})
    cfg = recipe.stage_config(build_config(data), "hard", 4, tmp_path / "iso")
    run = finetune.setup(cfg, build=recipe.build_hard)
    model, optimizer = run.model, run.optimizer
    layers = [layer for _, layer in lomix.mixture_layers(run.unwrapped)]
    batch = next(iter(run.loader))
    for domains in ([0, 0, 0, 0], [1, 1, 1, 1], [0, 2, 2, 0]):
        batch["task_ids"] = torch.tensor(domains)
        before = [layer.experts.B.detach().clone() for layer in layers]
        logits, labels = finetune.forward(model, batch)
        run.accelerator.backward(finetune.answer_loss_sum(logits, labels))
        optimizer.step()
        optimizer.zero_grad()
        for layer, old in zip(layers, before, strict=True):
            moved = [not torch.equal(layer.experts.B[e], old[e]) for e in range(3)]
            assert moved == [e in domains for e in range(3)], (domains, moved)


def test_the_hard_stage_needs_an_expert_per_task(assets, tmp_path, fresh_state):
    data = config_dict(assets, tmp_path / "few", mixture={**MIXTURE, "num_experts": 2}, router={**ROUTER, "k": 1})
    data["router"] = {**ROUTER, "k": 1}
    with pytest.raises(ConfigError, match=r"mixture\.num_experts.*3 training tasks"):
        recipe.run(build_config(data))
    with pytest.raises(ConfigError, match=r"resume_from.*does not resume.*loramixer\.init_from"):
        recipe.run(build_config({**data, "resume_from": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"loramixer\.init_from.*not both"):
        build_config({**data, "loramixer": {"adapters": ["./a"], "init_from": "runs/x"}})
    with pytest.raises(ConfigError, match=r"router\.name.*loramixer router"):
        recipe.run(build_config({**data, "router": {"name": "topk", "k": 1}}))


def test_plug_and_play_through_the_cli(assets, tmp_path, fresh_state):
    from hubdata import save_peft_adapter
    from transformers import AutoModelForCausalLM

    _, model_dir, _, _ = assets
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    shapes = [{"r": 2, "target_modules": ["q_proj", "v_proj"]}, {"r": 4, "target_modules": ["q_proj", "o_proj"]}]
    folders = [
        str(save_peft_adapter(base, tmp_path / f"peft{j}", seed=j, lora_alpha=8, **kw)) for j, kw in enumerate(shapes)
    ]
    data = config_dict(
        assets,
        tmp_path / "pnp",
        mixture={**MIXTURE, "num_experts": 2},
        loramixer={"soft_steps": 2},
        eval={"max_examples_per_task": 1, "before_training": False},
    )
    data["router"] = {**ROUTER, "k": 1}
    config = write_config(tmp_path / "pnp.yaml", data)
    result = subprocess.run(
        [LOMIX, "loramixer", str(config), f"loramixer.adapters=[{folders[0]}, {folders[1]}]"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "pnp"
    assert not (out / "hard").exists()
    expected = lomix.hub.load_peft_experts(AutoModelForCausalLM.from_pretrained(model_dir), folders)
    reference = {k: v for k, v in lomix.checkpoint.mixture_state_dict(expected).items() if ".experts." in k}
    saved = _experts(out / "soft" / "mixture")
    assert set(saved) == set(reference) and all(torch.equal(saved[k], reference[k]) for k in reference)
    assert json.loads((out / "loramixer.json").read_text())["soft"]["after"] is not None

    with pytest.raises(lomix.LomixError, match="missing"):
        recipe.run(
            build_config({**data, "loramixer": {"adapters": [str(tmp_path / "missing")]}, "output_dir": str(out / "x")})
        )
