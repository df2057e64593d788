"""Portable run folders: the path fields of a config are saved absolute (lomix.recipes.portable)."""

from __future__ import annotations

from pathlib import Path

from tiny_assets import tiny_config, write_config

from lomix.recipes.config import load_config
from lomix.recipes.portable import absolute_paths


def test_relative_paths_become_absolute_and_names_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("model", "train", "hard", "bigbench"):
        (tmp_path / folder).mkdir()
    (tmp_path / "train.jsonl").write_text('{"input": "x", "target": "y"}\n')
    config = tiny_config(
        tmp_path, Path("model"), Path("train.jsonl"), None, output_dir="runs/new", loramixer={"init_from": "hard"}
    )
    config["data"]["test"] = "someone/dataset"  # a hub id: nothing of that name here
    path = write_config(tmp_path / "c.yaml", config)
    cfg = load_config(path, ["data.train_split=train", "resume_from=runs/missing"])
    absolute_paths(cfg)
    assert cfg.model.name_or_path == str(tmp_path / "model")
    assert cfg.data.train == str(tmp_path / "train.jsonl")
    assert cfg.output_dir == str(tmp_path / "runs" / "new")  # created by the run: always absolute
    assert cfg.loramixer.init_from == str(tmp_path / "hard")  # a method's path field, marked in its config
    assert cfg.data.test == "someone/dataset" and cfg.resume_from == "runs/missing"  # not local: unchanged
    assert cfg.data.train_split == "train"  # a split name, not a path, though ./train exists
    assert cfg.data.task == "default" and cfg.eval.accuracy_metric == "accuracy"
    builder = load_config(path, ["data.train=bigbench"])  # a keyword of data.train, though ./bigbench exists
    absolute_paths(builder)
    assert builder.data.train == "bigbench"
    # a resolved config reads back the same from any working directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "saved.yaml").write_text(cfg.to_yaml())
    monkeypatch.chdir(elsewhere)
    assert load_config(tmp_path / "saved.yaml") == cfg
