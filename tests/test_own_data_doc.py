"""docs/own_data.md's worked example, run as the page says: its JSONL and YAML blocks written to a
folder, `lomix train my_chat.yaml` there, `lomix eval runs/my_chat` (also from another folder). The
one change: a tiny offline model replaces SmolLM2 (no download, seconds instead of minutes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_assets import make_model_dir

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own_data.md"
LOMIX = str(Path(sys.executable).parent / "lomix")

pytestmark = pytest.mark.slow


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", PAGE.read_text(), flags=re.S | re.M)


def test_the_pages_example_trains_and_evaluates(tmp_path):
    (rows,) = blocks("jsonl")
    (config,) = blocks("yaml")
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_chat.jsonl").write_text(rows)
    (work / "my_chat.yaml").write_text(config)
    assert "lomix train my_chat.yaml" in blocks("bash")[0] and "lomix eval runs/my_chat" in blocks("bash")[0]
    model = make_model_dir(tmp_path / "model")
    overrides = [f"model.name_or_path={model}", "model.gguf_file=null"]
    result = subprocess.run([LOMIX, "train", "my_chat.yaml", *overrides], capture_output=True, text=True, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]

    run = work / "runs" / "my_chat"
    lines = [json.loads(line) for line in rows.splitlines()]
    tasks = sorted({r["task"] for r in lines})
    after = json.loads((run / "eval.json").read_text())
    before = json.loads((run / "eval_base.json").read_text())
    # validation: auto held out 25% of each task's 8 rows: 2 per task, scored by exact match.
    assert sorted(after["tasks"]) == tasks == sorted(before["tasks"])
    assert all(after["tasks"][t]["n"] == 2 for t in tasks), after
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 4 and losses[-1] < losses[0]  # 20 steps, a record every 5
    assert {after["tasks"][t]["metric"] for t in tasks} == {"exact_match"}

    # The run folder is portable: its config names the data by absolute path, so evaluation works
    # from any folder, and it does not overwrite the training's eval.json.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["train"] == str(work / "my_chat.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = subprocess.run([LOMIX, "eval", str(run)], capture_output=True, text=True, cwd=elsewhere)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text()) == after
