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


def test_a_base_model_mismatch_suggests_the_cli_flag(tmp_path):
    """`lomix library add-peft` names its own flag (--no-check-base), not the Python argument."""
    from hubdata import save_peft_adapter
    from tiny_assets import make_model_dir
    from transformers import AutoModelForCausalLM

    model_dir = make_model_dir(tmp_path / "model")
    adapter = save_peft_adapter(
        AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter", r=2, target_modules=["q_proj"]
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    args = [LOMIX, "library", "add-peft", tmp_path / "lib", adapter, "--name", "a", "--description", "A task."]
    args += ["--model", model_dir]
    refused = subprocess.run(list(map(str, args)), capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]  # one line
    assert "'org/other'" in line and line.endswith(
        "pass --no-check-base if they are the same weights under another name"
    )
    assert "check_base=False" not in refused.stderr
    accepted = subprocess.run(list(map(str, [*args, "--no-check-base"])), capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr
    assert lomix.library.Library.open(tmp_path / "lib").names() == ["a"]
