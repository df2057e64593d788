"""The `lomix` command's foundation verbs, through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import MODEL_CASES, build_pair

import lomix

LOMIX = str(Path(sys.executable).parent / "lomix")


def test_help_lists_commands():
    result = subprocess.run([LOMIX, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "show" in result.stdout


def test_show_prints_a_saved_mixture(tmp_path):
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=3))
    lomix.save(model, tmp_path / "mix")
    result = subprocess.run([LOMIX, "show", str(tmp_path / "mix")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["config"]["num_experts"] == 3 and info["metadata"]["base_model_type"] == "llama"


def test_show_reports_a_missing_folder_clearly(tmp_path):
    result = subprocess.run([LOMIX, "show", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 2 and "no such folder" in result.stderr
