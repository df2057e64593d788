"""train.trackers: tensorboard receives the log records; an absent tracker fails before the model loads."""

from __future__ import annotations

import json
import os

import pytest
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_jsonl

from lomix.errors import ConfigError
from lomix.recipes import assets, finetune, trackers
from lomix.recipes.config import build_config


def config(tmp_path, **train):
    model = make_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", tiny_rows(0, 8))
    values = tiny_config(tmp_path, model, data, None, eval={"after_training": False})
    values["train"].update({"max_steps": 3, "warmup_steps": 1, **train})
    return build_config(values)


def test_tensorboard_receives_the_logged_loss_and_routing_scalars(tmp_path, run_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, trackers=["tensorboard"])
    run_recipe(cfg)
    events = sorted((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events, list((tmp_path / "run").rglob("*"))
    # the reference: the same records as written to log.jsonl
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 3
    scalars: dict[str, dict[int, float]] = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in logged}, rel=1e-6)
    routing = [k for k in logged[0] if k.startswith("routing_") and isinstance(logged[0][k], float)]
    assert routing, logged[0]
    for key in routing:
        assert scalars[key] == pytest.approx({r["step"]: r[key] for r in logged}, rel=1e-6, abs=1e-7)
    assert any(tag.startswith("routing/") for tag in scalars)  # per-layer statistics, flattened


@pytest.mark.parametrize(
    ("tracker", "install"), [("tensorboard", "pip install 'lomix[tensorboard]'"), ("wandb", "pip install wandb")]
)
def test_an_absent_tracker_is_named_with_its_install_line_before_the_model_loads(
    tmp_path, monkeypatch, tracker, install
):
    real, absent = trackers.is_installed, {tracker, "tensorboardX"}
    monkeypatch.setattr(trackers, "is_installed", lambda module: module not in absent and real(module))
    loads = []
    monkeypatch.setattr(finetune, "load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(assets, "load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    with pytest.raises(ConfigError) as info:
        finetune.setup(config(tmp_path, trackers=[tracker]))
    message = str(info.value)
    assert info.value.field == "train.trackers" and "\n" not in message
    assert repr(tracker) in message and "not installed" in message and message.endswith(install)
    assert not loads and not (tmp_path / "run").exists()


def test_wandb_defaults_to_offline_but_keeps_the_users_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "is_installed", lambda module: True)
    cfg = config(tmp_path, trackers=["wandb"])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trackers.prepare(cfg.train)
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    trackers.prepare(cfg.train)
    assert os.environ["WANDB_MODE"] == "online"
    monkeypatch.delenv("WANDB_MODE")
    trackers.prepare(config(tmp_path / "tb", trackers=["tensorboard"]).train)
    assert "WANDB_MODE" not in os.environ
