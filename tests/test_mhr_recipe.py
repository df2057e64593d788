"""Poly/MHR in the recipes: task names saved with the mixture, evaluation by name, and few-shot starts
(MHR-z, MHR-mu, continued training) from a finished multi-task run, on a tiny config-built model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_jsonl

import lomix
from lomix.errors import ConfigError
from lomix.recipes import evaluation, finetune
from lomix.recipes.config import build_config, load_config

HELD_IN, HELD_OUT = ("color", "parity"), "echo"
WEIGHTS = Path("mixture") / lomix.WEIGHTS_NAME


def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def run_recipe(cfg):
    try:
        return finetune.run(cfg)
    finally:
        reset_accelerate()


def losses(result):
    return [r["loss"] for r in result["records"] if "loss" in r]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mhr")
    rows, test_rows = tiny_rows(0, 12), tiny_rows(1, 3)
    files = {
        "model": make_model_dir(root / "model"),
        "train": write_jsonl(root / "train.jsonl", [r for r in rows if r["task"] in HELD_IN]),
        "test": write_jsonl(root / "test.jsonl", [r for r in test_rows if r["task"] in HELD_IN]),
        "fewshot": write_jsonl(root / "fewshot.jsonl", [r for r in rows if r["task"] == HELD_OUT][:8]),
        "fewshot_test": write_jsonl(root / "fewshot_test.jsonl", [r for r in test_rows if r["task"] == HELD_OUT]),
    }
    return root, files


def mhr_cfg(assets, out, data=("train", "test"), **sections):
    root, files = assets
    sections.setdefault("mixture", {"num_experts": 4, "rank": 4, "alpha": 8, "dropout": 0.0})
    router = sections.pop("router", {"name": "mhr", "n_heads": 2})
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "warmup_steps": 2, "progress": False,
                         **sections["train"]}  # fmt: skip
    sections.setdefault("eval", {"max_examples_per_task": 3, "max_new_tokens": 4})
    config = tiny_config(root, files["model"], files[data[0]], files[data[1]], **sections)
    config["output_dir"] = str(out)
    config["router"] = router  # the whole section (tiny_config's would keep topk's fields)
    return build_config(config)


@pytest.fixture(scope="module")
def multitask(assets):
    out = assets[0] / "multitask"
    result = run_recipe(mhr_cfg(assets, out))
    return out, result


def test_a_multitask_run_saves_its_task_names_with_the_mixture(multitask):
    out, result = multitask
    router = json.loads((out / "mixture" / lomix.CONFIG_NAME).read_text())["router"]
    assert router["name"] == "mhr" and router["tasks"] == sorted(HELD_IN) and router["n_heads"] == 2
    assert json.loads((out / "tasks.json").read_text())["tasks"] == router["tasks"]
    assert yaml.safe_load((out / "config.yaml").read_text())["router"]["tasks"] == router["tasks"]
    # the routers learn at the router's default rate (0.1) while the experts use train.lr
    first = result["records"][0]
    assert first["router_lr"] == pytest.approx(0.1 * first["lr"] / 5e-3)
    tensors = load_file(str(out / WEIGHTS))
    logits = [v for k, v in tensors.items() if k.endswith("router.logits")]
    assert logits and all(v.shape == (2, 2, 4) and v.abs().max() > 1e-2 for v in logits)  # trained past its init


def test_eval_routes_each_task_by_the_names_saved_with_the_mixture(multitask, monkeypatch):
    out, _ = multitask
    expected = json.loads((out / "eval.json").read_text())
    # tasks.json in another order: evaluation must still use the mixture's rows, by name
    tasks_file = out / "tasks.json"
    saved = tasks_file.read_text()
    tasks_file.write_text(json.dumps({"tasks": list(reversed(sorted(HELD_IN))), "descriptions": {}}))
    seen = {}
    original = evaluation.score_batch

    def spy(model, formatter, items, *args):
        for example, task_id, _ in items:
            seen.setdefault(example.task, set()).add(task_id)
        return original(model, formatter, items, *args)

    monkeypatch.setattr(evaluation, "score_batch", spy)
    try:
        results = evaluation.run(out, ["train.progress=false"])
    finally:
        tasks_file.write_text(saved)
        reset_accelerate()
    assert seen == {"color": {0}, "parity": {1}}
    assert results == expected


def mixture_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / WEIGHTS))


def fewshot(assets, source, out, method, **sections):
    sections.setdefault("fewshot", {"init_from": str(source), "method": method})
    return mhr_cfg(assets, out, ("fewshot", "fewshot_test"), **sections)


def test_mhr_z_adds_a_row_for_the_new_task_and_trains_only_it_and_resumes_exactly(assets, multitask, tmp_path):
    source, _ = multitask
    cfg = fewshot(assets, source, tmp_path / "z", "mhr_z", train={"save_every": 2})
    result = run_recipe(cfg)
    run = tmp_path / "z"
    config = json.loads((run / "mixture" / lomix.CONFIG_NAME).read_text())
    assert config["router"]["tasks"] == [*sorted(HELD_IN), HELD_OUT] and config["num_experts"] == 4
    assert json.loads((run / "tasks.json").read_text())["tasks"] == config["router"]["tasks"]
    before, after = mixture_tensors(source), mixture_tensors(run)
    assert set(before) == set(after)
    for key, value in after.items():
        if key.endswith("router.logits"):
            assert value.shape == (3, 2, 4)
            assert torch.equal(value[:2], before[key]), key  # the held-in rows are untouched
            assert not torch.equal(value[2], torch.zeros_like(value[2])) and value[2].abs().max() > 1e-2, key
        else:
            assert torch.equal(value, before[key]), key  # the skills are frozen
    assert HELD_OUT in result["after"]["tasks"]
    try:  # `lomix eval` of the few-shot run folder scores what the run scored
        assert evaluation.run(run, ["train.progress=false"]) == result["after"]
    finally:
        reset_accelerate()
    # resuming from the step-2 checkpoint gives the same losses (the row mask is set up again)
    resumed = run_recipe(
        fewshot(assets, source, tmp_path / "z2", "mhr_z", resume_from=str(run / "checkpoints" / "step-000002"))
    )
    assert losses(resumed) == pytest.approx(losses(result)[2:], abs=1e-6)


def test_mhr_mu_starts_from_the_mean_of_the_skills_as_one_lora(assets, multitask, tmp_path):
    source, _ = multitask
    # a vanishing learning rate: what is saved is where training started
    cfg = fewshot(assets, source, tmp_path / "mu", "mhr_mu", train={"lr": 1e-12}, eval={"after_training": False})
    run_recipe(cfg)
    config = json.loads((tmp_path / "mu" / "mixture" / lomix.CONFIG_NAME).read_text())
    assert config["num_experts"] == 1 and config["router"]["name"] == "fixed" and config["rank"] == 4
    before, after = mixture_tensors(source), mixture_tensors(tmp_path / "mu")
    assert {k for k in after} == {k for k in before if ".experts." in k}
    for key, value in after.items():
        torch.testing.assert_close(value[0], before[key].mean(0), rtol=0, atol=1e-8)
    trained = run_recipe(fewshot(assets, source, tmp_path / "mu2", "mhr_mu", eval={"after_training": False}))
    assert losses(trained)[-1] < losses(trained)[0]


def test_continue_trains_experts_and_routers_with_a_new_row(assets, multitask, tmp_path):
    source, _ = multitask
    run_recipe(fewshot(assets, source, tmp_path / "cont", "continue", eval={"after_training": False}))
    before, after = mixture_tensors(source), mixture_tensors(tmp_path / "cont")
    changed = [k for k in before if k.endswith("experts.B") and not torch.equal(before[k], after[k])]
    assert len(changed) == len([k for k in before if k.endswith("experts.B")])
    logits = [k for k in after if k.endswith("router.logits")]
    assert logits and all(after[k].shape == (3, 2, 4) and after[k][2].abs().max() > 1e-2 for k in logits)


def test_fewshot_and_task_errors_name_the_field(assets, tmp_path):
    files = assets[1]
    topk_dir = tmp_path / "topk"
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(files["model"])
    lomix.save(lomix.inject(base, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=2)), topk_dir)

    def setup(cfg):
        try:
            finetune.setup(cfg)
        finally:
            reset_accelerate()

    with pytest.raises(
        ConfigError, match=r"fewshot.method: mhr_z trains task routing rows, but the mixture in .* 'topk'"
    ):
        setup(fewshot(assets, topk_dir, tmp_path / "a", "mhr_z"))
    with pytest.raises(ConfigError, match=r"fewshot.init_from: .*nowhere holds no lomix mixture"):
        setup(fewshot(assets, tmp_path / "nowhere", tmp_path / "b", "mhr_z"))
    with pytest.raises(ConfigError, match=r"router.n_tasks: is 3, but the training data has 2 tasks \(color, parity\)"):
        setup(mhr_cfg(assets, tmp_path / "c", router={"name": "mhr", "n_heads": 2, "n_tasks": 3}))
    with pytest.raises(ConfigError, match=r"router.tasks: lacks the training tasks parity; it lists color, echo"):
        setup(mhr_cfg(assets, tmp_path / "d", router={"name": "poly", "tasks": ["color", "echo"]}))
    # a single LoRA (continue from a topk or fixed mixture) needs no task rows
    setup(fewshot(assets, topk_dir, tmp_path / "e", "continue"))


def test_the_shipped_mhr_configs_hold_out_their_few_shot_tasks():
    from lomix.recipes import config as rc

    configs = Path(rc.__file__).resolve().parent / "configs"
    multi = load_config(configs / "mhr_multitask.yaml")
    few = load_config(configs / "mhr_fewshot.yaml")
    assert multi.router.name == "mhr" and multi.router.n_heads == 8 and multi.train.router_lr is None
    assert not set(multi.data.bigbench.tasks) & set(few.data.bigbench.tasks)
    assert few.fewshot.init_from == multi.output_dir and few.fewshot.method == "mhr_z"
    # SmolLM2-135M: hidden 576, grouped-query k/v 3 x 64 = 192, MLP 1536; every head gets a whole slice
    assert all(size % multi.router.n_heads == 0 for size in (576, 192, 1536))
    assert multi.mixture.num_experts * multi.mixture.rank == 16  # a rank-16 LoRA's adapter parameters


def test_setup_resolves_the_task_names_in_its_own_copy_of_the_config(assets, tmp_path):
    cfg = mhr_cfg(assets, tmp_path / "untouched")
    before = cfg.to_dict()
    try:
        run = finetune.setup(cfg)
    finally:
        reset_accelerate()
    assert cfg.to_dict() == before and cfg.router.tasks == []  # the caller's object is as given
    assert run.cfg.router.tasks == sorted(HELD_IN)  # the run's copy says what was built
    assert yaml.safe_load((tmp_path / "untouched" / "config.yaml").read_text())["router"]["tasks"] == sorted(HELD_IN)
