"""The finetune recipe's pieces, in process: loss, schedule, gradient checkpointing, what resume restores."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_jsonl
from torch.nn import functional as F

import lomix
from lomix.errors import CheckpointError, ConfigError
from lomix.recipes import finetune, losses
from lomix.recipes.config import TrainConfig, build_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return root, make_model_dir(root / "model"), write_jsonl(root / "train.jsonl", tiny_rows(0, 8))


def config(assets, out, **sections):
    root, model, train = assets
    sections.setdefault("eval", {"after_training": False})
    data = tiny_config(root, model, train, None, **sections)
    data["output_dir"] = str(out)
    return build_config(data)


def loss_list(result):
    return [r["loss"] for r in result["records"] if "loss" in r]


def test_answer_loss_sum_equals_the_models_own_mean_loss_times_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    from transformers.loss.loss_utils import ForCausalLMLoss

    mean = ForCausalLMLoss(logits, labels, vocab_size=11)
    assert finetune.answer_tokens({"labels": labels}) == 5
    assert float(finetune.answer_loss_sum(logits, labels)) == pytest.approx(float(mean) * 5, rel=1e-6)


def test_a_padded_batch_has_the_loss_of_its_rows_alone(assets):
    """Left padding, position ids and the answer-only logits change nothing: the batch's summed answer
    loss equals the models' own loss on each unpadded row (an independent reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lomix
    from lomix.recipes.config import DataConfig
    from lomix.recipes.data import Collator, Formatter, load_examples, task_set, tokenize

    _, model_dir, train = assets
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj", "up_proj"], num_experts=4))
    from conftest import randomize_experts

    randomize_experts(model, std=0.3)
    data = DataConfig(train=str(train))
    examples = load_examples(data)[0][:6]
    features = tokenize(examples, Formatter(tokenizer, data), task_set(examples, data))
    assert len({len(f["input_ids"]) for f in features}) > 1, "rows of one length would not test padding"
    batch = Collator(tokenizer.pad_token_id)(features)
    with torch.no_grad():
        logits, labels = finetune.forward(model, batch)
        assert logits.shape[1] < batch["input_ids"].shape[1]  # only the answer columns
        total = float(finetune.answer_loss_sum(logits, labels))
        expected = 0.0
        for f in features:
            ids, row_labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
            out = model(input_ids=ids, labels=row_labels, task_ids=[f["task_id"]])
            expected += float(out.loss) * int((row_labels[:, 1:] != -100).sum())
    assert total == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    cfg = TrainConfig(max_steps=10, warmup_steps=4, schedule=schedule)
    factor = finetune.lr_factor(cfg)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    expected = {
        "linear": [1 - (s - 4) / 6 for s in range(4, 10)],
        "cosine": [0.5 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 10)],
        "constant": [1.0] * 6,
    }[schedule]
    assert [factor(s) for s in range(4, 10)] == pytest.approx(expected)


def test_gradient_checkpointing_trains_the_same_weights(assets, tmp_path, run_recipe):
    sections = {"mixture": {"dropout": 0.0}, "router": {"name": "topk", "k": 2, "jitter": 0.0}}
    plain = run_recipe(config(assets, tmp_path / "plain", **sections))
    sections["train"] = {**tiny_config(*[tmp_path] * 4)["train"], "gradient_checkpointing": True}
    checkpointed = run_recipe(config(assets, tmp_path / "gc", **sections))
    # the flag really switched checkpointing on (the decoder layers re-run in backward)
    from accelerate.state import AcceleratorState

    probe = finetune.setup(config(assets, tmp_path / "probe", **sections))
    AcceleratorState._reset_state(True)
    assert probe.unwrapped.is_activation_checkpointing
    assert loss_list(checkpointed) == pytest.approx(loss_list(plain), abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "plain" / "mixture" / "lomix_model.safetensors"))
    b = load_file(str(tmp_path / "gc" / "mixture" / "lomix_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_depends_on_every_restored_state(assets, tmp_path, run_recipe):
    """The exact-resume test can fail: without the RNG state, or from another data position, the
    losses after resuming differ from the uninterrupted run's."""
    full = run_recipe(config(assets, tmp_path / "full", train={**_train(), "save_every": 3}))
    reference = loss_list(full)[3:]
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000003"

    resumed = run_recipe(config(assets, tmp_path / "resumed", resume_from=str(checkpoint)))
    assert loss_list(resumed) == pytest.approx(reference, abs=1e-6)

    no_rng = tmp_path / "no_rng"  # a valid RNG state, but another step's
    shutil.copytree(checkpoint, no_rng)
    shutil.copyfile(checkpoint.parent / "step-000006" / "random_states_0.pkl", no_rng / "random_states_0.pkl")
    other = run_recipe(config(assets, tmp_path / "other", resume_from=str(no_rng)))
    assert loss_list(other) != pytest.approx(reference, abs=1e-6)

    shifted = tmp_path / "shifted"
    shutil.copytree(checkpoint, shifted)
    (shifted / finetune.STATE_NAME).write_text('{"step": 3, "epoch": 0, "batches_in_epoch": 4}')
    moved = run_recipe(config(assets, tmp_path / "moved", resume_from=str(shifted)))
    assert loss_list(moved) != pytest.approx(reference, abs=1e-6)


def test_the_seed_alone_fixes_the_run_whatever_asset_loading_draws(assets, tmp_path, run_recipe, monkeypatch):
    plain = run_recipe(config(assets, tmp_path / "plain"))
    from lomix.recipes import assets as assets_module

    original = assets_module.load_model_and_tokenizer

    def converting(*args, **kwargs):  # a first run converts a GGUF file, which draws random numbers
        torch.rand(1000)
        return original(*args, **kwargs)

    monkeypatch.setattr(assets_module, "load_model_and_tokenizer", converting)
    first = run_recipe(config(assets, tmp_path / "first"))
    assert loss_list(first) == loss_list(plain)
    other_seed = config(assets, tmp_path / "seed1")
    other_seed.seed = 1
    assert loss_list(run_recipe(other_seed)) != pytest.approx(loss_list(plain), abs=1e-6)


def _train(**extra):
    return {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "warmup_steps": 2, "log_every": 1, "progress": False, **extra}


def test_too_little_data_for_one_global_batch_is_named(assets, tmp_path, run_recipe):
    with pytest.raises(ConfigError, match=r"train.batch_size: the training data has 24 examples, fewer than one"):
        run_recipe(config(assets, tmp_path / "big", train={**_train(), "batch_size": 16, "grad_accum": 2}))


def test_a_missing_checkpoint_is_named(assets, tmp_path, run_recipe):
    with pytest.raises(ConfigError, match=r"resume_from: .* is neither a checkpoint nor a run folder"):
        run_recipe(config(assets, tmp_path / "x", resume_from=str(tmp_path)))


def test_batches_carry_task_ids_and_descriptions_to_every_router(assets, tmp_path):
    from accelerate.state import AcceleratorState

    import lomix

    run = finetune.setup(config(assets, tmp_path / "ctx", train={**_train(), "router_lr": 0.5}))
    try:
        seen = []
        for _, layer in lomix.mixture_layers(run.unwrapped):
            original = layer.router.forward

            def spy(x, context, original=original):
                seen.append((context.task_ids.tolist(), list(context.task_descriptions)))
                return original(x, context)

            layer.router.forward = spy
        batch = next(iter(run.loader))
        finetune.forward(run.model, batch)
        expected = (batch["task_ids"].tolist(), batch["task_descriptions"])
        assert len(seen) == len(list(lomix.mixture_layers(run.unwrapped))) and all(s == expected for s in seen)
        assert set(batch["task_descriptions"]) <= {"parity", "color", "echo"}
        assert [run.tasks.names[i] for i in expected[0]] == expected[1]
        # the routers have their own learning rate (warm-up factor 1/2 at the first step)
        groups = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
        assert groups == pytest.approx({"experts": 2e-2 / 2, "routers": 0.5 / 2})
    finally:
        AcceleratorState._reset_state(True)


def test_a_cut_last_log_line_is_dropped_with_a_notice(tmp_path, capsys):
    """A kill during the log append leaves half a line (issue 25, item 1); resume drops it."""
    records = [{"step": s, "loss": 1.0 / s, "routing": {"layer": {"load": [0.25] * 4}}} for s in (1, 2, 3)]
    lines = [json.dumps(r) for r in records]
    log = tmp_path / "log.jsonl"
    for cut in (1, len(lines[2]) // 2, len(lines[2]) - 1):  # any strict prefix of the last record
        log.write_text("".join(line + "\n" for line in lines[:2]) + lines[2][:cut])
        finetune.trim_log(log, 2)
        assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
        notice = capsys.readouterr().out
        assert notice.count("\n") == 1 and "dropped the cut last line of" in notice and str(log) in notice
    log.write_text("".join(line + "\n" for line in lines))  # a complete log: trimmed to the step, silently
    finetune.trim_log(log, 1)
    assert log.read_text() == lines[0] + "\n" and capsys.readouterr().out == ""
    log.write_text(lines[0] + "\n" + lines[1][:10] + "\n" + lines[2] + "\n")  # damage in the middle is not ours
    with pytest.raises(CheckpointError, match=r"log.jsonl: line 2 is not a log record"):
        finetune.trim_log(log, 3)


def test_resume_in_place_after_a_cut_log_line_continues_exactly(assets, tmp_path, run_recipe):
    full = run_recipe(config(assets, tmp_path / "full", train={**_train(), "save_every": 3}))
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", out, ignore=lambda folder, names: ["step-000006"] * ("step-000006" in names))
    shutil.rmtree(out / "mixture")  # a run killed at step 5 has no final mixture yet
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("".join(line + "\n" for line in lines[:4]) + lines[4][: len(lines[4]) // 2])  # killed at step 5
    resumed = run_recipe(config(assets, out, train={**_train(), "save_every": 3}, resume_from=str(out)))
    assert loss_list(resumed) == pytest.approx(loss_list(full)[3:], abs=1e-6)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx(loss_list(full), abs=1e-6)


def test_temporary_folders_of_a_killed_run_are_removed_when_it_starts_again(assets, tmp_path, run_recipe, capsys):
    """Issue 25, item 3: `.step-N.tmp-*` (a kill while saving a checkpoint) and `.NAME.tmp-*` files."""
    out = tmp_path / "run"
    run_recipe(config(assets, out, train={**_train(), "max_steps": 3, "save_every": 3}))
    partial = out / "checkpoints" / ".step-000006.tmp-0123abcd"
    shutil.copytree(out / "checkpoints" / "step-000003", partial)  # a kill after most files were written
    (partial / finetune.STATE_NAME).unlink()
    (out / ".log.jsonl.tmp-89abcdef").write_text('{"step": 1')
    (out / "checkpoints" / "step-000009").mkdir()  # not a temporary: kept (find_checkpoint skips it)
    capsys.readouterr()
    run_recipe(config(assets, out, train={**_train(), "save_every": 3}, resume_from=str(out)))
    assert "removed 2 temporary file(s) or folder(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006", "step-000009"]
    assert not list(out.glob(".*"))


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(assets, tmp_path, run_recipe, capsys):
    """Issue 25, item 2: nothing to lose (no checkpoint, no mixture), so the same command restarts it."""
    out = tmp_path / "run"
    first = run_recipe(config(assets, out))
    shutil.rmtree(out / "mixture")  # what a kill at step 4 of 6 leaves: config, tasks, a partial log
    log = out / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:4]))
    with pytest.raises(ConfigError, match=r"resume_from: .* stopped before its first checkpoint.* without resume_from"):
        run_recipe(config(assets, out, resume_from=str(out)))
    capsys.readouterr()
    again = run_recipe(config(assets, out))
    assert "stopped before its first checkpoint; starting it again from scratch" in capsys.readouterr().out
    assert loss_list(again) == loss_list(first)  # a fresh run, the same seed
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match=r"already holds a run; pass resume_from="):  # now it has a mixture
        run_recipe(config(assets, out))
    shutil.rmtree(out / "mixture")
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / finetune.STATE_NAME).write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds a run; pass resume_from="):  # a checkpoint to lose
        run_recipe(config(assets, out))


@pytest.fixture(scope="module")
def three_steps(assets, tmp_path_factory):
    """A 3-step run folder with a checkpoint at step 3."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("three") / "run"
    try:
        finetune.run(config(assets, out, train={**_train(), "max_steps": 3, "save_every": 3}))
    finally:
        AcceleratorState._reset_state(True)
    return out


@pytest.mark.parametrize(
    ("name", "damage", "says"),
    [
        ("random_states_0.pkl", "delete", r"random_states_0.pkl: the random-number state cannot be read"),
        ("random_states_0.pkl", "cut", r"random_states_0.pkl: the random-number state cannot be read"),
        ("optimizer.bin", "delete", r"step-000003: the optimizer or scheduler state cannot be read"),
        ("scheduler.bin", "cut", r"step-000003: the optimizer or scheduler state cannot be read"),
        ("trainer_state.json", "cut", r"trainer_state.json: cannot be read"),
    ],
)
def test_an_unreadable_training_state_refuses_to_resume_inexactly(
    assets, three_steps, tmp_path, run_recipe, name, damage, says
):
    """Issue 25, item 5: accelerate skips an unreadable RNG state silently (the losses then differ, see
    test_resume_depends_on_every_restored_state); lomix refuses, naming the file."""
    checkpoint = tmp_path / "step-000003"
    shutil.copytree(three_steps / "checkpoints" / "step-000003", checkpoint)
    if damage == "delete":
        (checkpoint / name).unlink()
    else:
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=says + r".*would not continue the run exactly") as caught:
        run_recipe(config(assets, tmp_path / "resumed", resume_from=str(checkpoint)))
    assert "\n" not in str(caught.value)


def poisoned_loss(monkeypatch, at_call: int):
    """The training loss (`losses.plain_loss`'s answer_loss_sum) is NaN on its ``at_call``-th call
    (1-based): one call per step here."""
    original, calls = losses.answer_loss_sum, []

    def poisoned(logits, labels):
        calls.append(1)
        value = original(logits, labels)
        return value * float("nan") if len(calls) == at_call else value

    monkeypatch.setattr(losses, "answer_loss_sum", poisoned)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(assets, tmp_path, run_recipe, monkeypatch):
    """Issue 25, item 6: a NaN loss used to train on, exit 0 and save a NaN mixture."""
    from safetensors.torch import load_file

    sections = {"train": {**_train(), "save_every": 3}}
    reference = run_recipe(config(assets, tmp_path / "reference", **sections))
    poisoned_loss(monkeypatch, at_call=5)
    out = tmp_path / "nan"
    with pytest.raises(finetune.NonFiniteError, match=r"train: the loss is not finite at step 5; stopped") as caught:
        run_recipe(config(assets, out, **sections))
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000003'}" in str(caught.value)
    assert "train.on_nonfinite=skip_step" in str(caught.value) and isinstance(caught.value, lomix.LomixError)
    assert not (out / "mixture").exists() and not (out / "checkpoints" / "step-000006").exists()
    weights = "checkpoints/step-000003/mixture/lomix_model.safetensors"
    good, expected = load_file(str(out / weights)), load_file(str(tmp_path / "reference" / weights))
    assert good.keys() == expected.keys() and all(torch.equal(good[k], expected[k]) for k in good)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == loss_list(reference)[:4]  # steps 1-4; step 5 never logged


def test_a_nan_gradient_stops_the_run_even_with_a_finite_loss(assets, tmp_path, run_recipe):
    from lomix.recipes.hooks import build_mixture

    calls = []

    def build(model, *args):
        build_mixture(model, *args)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda grad: grad * float("inf") if calls.append(1) or len(calls) == 2 else grad)

    cfg = config(assets, tmp_path / "inf", train={**_train(), "max_grad_norm": 0.0})  # not clipped: still checked
    with pytest.raises(finetune.NonFiniteError, match=r"the gradient norm \((nan|inf)\) is not finite at step 2.*no"):
        try:
            finetune.run(cfg, build=build)
        finally:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)


def test_skip_step_leaves_the_weights_of_a_nan_step_unchanged(assets, tmp_path, run_recipe, monkeypatch):
    from safetensors.torch import load_file

    poisoned_loss(monkeypatch, at_call=4)
    out = tmp_path / "skip"
    train = {**_train(), "save_every": 1, "keep_checkpoints": 10, "on_nonfinite": "skip_step"}
    result = run_recipe(config(assets, out, train=train))
    records = {r["step"]: r for r in result["records"]}
    assert records[4]["skipped_steps"] == 1 and math.isnan(records[4]["loss"])
    assert all("skipped_steps" not in r and math.isfinite(r["loss"]) for s, r in records.items() if s != 4)

    def mixture(step):
        return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "mixture" / "lomix_model.safetensors"))

    before, after, later = mixture(3), mixture(4), mixture(5)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at the skipped step
    assert not all(torch.equal(after[k], later[k]) for k in after)  # training went on
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "mixture" / "lomix_model.safetensors")).values())


def test_training_refuses_targets_whose_forward_never_runs(assets, tmp_path, run_recipe):
    """Issue 25, item 7, in the recipe: one MLP reads its down_proj's weight instead of calling it."""
    from lomix.recipes.hooks import build_mixture

    def build(model, *args):
        build_mixture(model, *args)
        mlp = model.model.layers[1].mlp
        mlp.forward = lambda x: F.linear(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), mlp.down_proj.weight)

    cfg = config(assets, tmp_path / "run")
    with pytest.raises(lomix.errors.TargetNotCalledError, match=r"^mixture.target_modules: 1 wrapped module") as e:
        try:
            finetune.run(cfg, build=build)
        finally:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)
    assert "(model.layers.1.mlp.down_proj)" in str(e.value) and not (tmp_path / "run" / "log.jsonl").exists()


def test_the_recipe_updates_the_loss_free_bias_after_each_step_and_resumes_it_exactly(assets, tmp_path, run_recipe):
    """The recipe calls lomix.after_optimizer_step: after 6 steps every bias entry is a sum of 6
    steps of +-rate (or 0 where an expert sat exactly at the mean); a run resumed at step 3 ends
    with the same biases (saved in the checkpoint with the mixture)."""
    from safetensors.torch import load_file

    rate = 1e-2
    router = {"name": "topk", "k": 2, "jitter": 0.0, "bias_update_rate": rate}
    sections = {"router": router, "mixture": {"dropout": 0.0}}
    full = run_recipe(config(assets, tmp_path / "full", train={**_train(), "save_every": 3}, **sections))
    assert all(r["routing_experts_per_token"] == pytest.approx(2.0) for r in full["records"] if "loss" in r)
    biases = {k: v for k, v in load_file(str(tmp_path / "full" / "mixture" / "lomix_model.safetensors")).items()
              if k.endswith("router.selection_bias")}  # fmt: skip
    assert len(biases) == 8  # q, v, up, down of 2 layers
    for bias in biases.values():
        steps = bias / rate
        assert torch.allclose(steps, steps.round(), atol=1e-4) and float(steps.abs().max()) <= 6 + 1e-4
    assert sum(float(bias.abs().sum()) for bias in biases.values()) > 0  # (a layer may oscillate back to 0)
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000003"
    resumed = run_recipe(config(assets, tmp_path / "resumed", resume_from=str(checkpoint), **sections))
    assert loss_list(resumed) == pytest.approx(loss_list(full)[3:], abs=1e-6)
    again = load_file(str(tmp_path / "resumed" / "mixture" / "lomix_model.safetensors"))
    for key, bias in biases.items():
        torch.testing.assert_close(again[key], bias, rtol=0, atol=1e-7)


def test_a_stage_with_frozen_experts_logs_the_routers_rate_not_zero(assets, tmp_path):
    # The soft stage of a two-stage method trains only the routers: its optimizer has no experts group.
    def build_frozen_experts(model, cfg, tasks, data_tasks):
        finetune.build_mixture(model, cfg, tasks, data_tasks)
        for _, layer in lomix.mixture_layers(model):
            layer.experts.requires_grad_(False)

    cfg = config(assets, tmp_path / "run", train={"max_steps": 4, "router_lr": 2e-3})
    result = run_recipe_with(cfg, build_frozen_experts)
    factor = finetune.lr_factor(cfg.train)
    for record in result["records"]:
        expected = 2e-3 * factor(record["step"] - 1)  # the rate of the step's update, from the schedule
        assert record["lr"] == pytest.approx(expected) and record["router_lr"] == pytest.approx(expected)
        assert record["lr"] > 0


def run_recipe_with(cfg, build):
    from accelerate.state import AcceleratorState

    try:
        return finetune.run(cfg, build=build)
    finally:
        AcceleratorState._reset_state(True)


def test_logged_rates_are_the_experts_and_routers_groups_when_both_train():
    experts, routers = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    groups = [
        {"name": "experts", "params": [experts], "lr": 1e-4},
        {"name": "routers", "params": [routers], "lr": 3e-3},
    ]
    assert finetune.logged_rates(groups) == (1e-4, 3e-3)
    # a group whose parameters are all frozen does not count, whatever its rate
    assert finetune.logged_rates([{"name": "experts", "params": [frozen], "lr": 0.0}, groups[1]]) == (3e-3, 3e-3)
    assert finetune.logged_rates([groups[0]]) == (1e-4, 1e-4)
