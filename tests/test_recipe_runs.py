"""The recipes end to end through the real `lomix` command, on a tiny config-built model.

One reference run (6 steps, checkpoints at 3 and 6, periodic held-out loss, tensorboard, before
and after evaluation) is shared by the tests below: evaluation of the run folder, exact resume
from its step-3 checkpoint, a run killed while writing a checkpoint, and the recipe catalog.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_config, write_jsonl

import lomix

LOMIX = str(Path(sys.executable).parent / "lomix")
TOL = 1e-6

pytestmark = pytest.mark.slow


def lomix_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([LOMIX, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    model = make_model_dir(root / "model")
    train = write_jsonl(root / "train.jsonl", tiny_rows(0, 16))
    test = write_jsonl(root / "test.jsonl", tiny_rows(1, 3))
    return root, model, train, test


@pytest.fixture(scope="module")
def reference(assets):
    root, model, train, test = assets
    config = tiny_config(
        root,
        model,
        train,
        test,
        train={"save_every": 3, "eval_every": 3, "trackers": ["tensorboard"], "lr": 2e-2},
        eval={"before_training": True, "max_new_tokens": 4},
    )
    path = write_config(root / "reference.yaml", config)
    result = lomix_cli("train", path)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", path, result


def test_train_writes_a_complete_run_folder(reference):
    run, _, result = reference
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.yaml", "eval.json", "eval_base.json", "log.jsonl", "logs", "mixture", "tasks.json"
    ]  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert (run / "mixture" / lomix.CONFIG_NAME).is_file() and (run / "mixture" / lomix.WEIGHTS_NAME).is_file()
    assert not list(run.rglob("*.bin")) or all("checkpoints" in str(p) for p in run.rglob("*.bin"))
    assert list((run / "logs").rglob("events.out.tfevents.*")), "tensorboard tracker wrote nothing"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    # linear warm-up over 2 steps to lr=2e-2, then linear decay to 0 at step 6
    lrs = [r["lr"] for r in records if "loss" in r]
    assert lrs == pytest.approx([1e-2, 2e-2, 2e-2, 1.5e-2, 1e-2, 5e-3])
    loss = losses(run)
    assert loss[6] < loss[1], "the training loss did not fall"
    assert "| **mean** |" in result.stdout and "| base | mixture | change |" in result.stdout
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["save_every"] == 3 and saved["router"]["k"] == 2


def test_the_saved_mixture_loads_into_a_fresh_base(reference, assets):
    from transformers import AutoModelForCausalLM

    run, _, _ = reference
    model = lomix.load(AutoModelForCausalLM.from_pretrained(assets[1]), run / "mixture")
    assert len(list(lomix.mixture_layers(model))) == 8
    assert any(float(layer.experts.B.abs().max()) > 0 for _, layer in lomix.mixture_layers(model))


def test_eval_recomputes_the_final_table_and_the_base_model(reference, tmp_path):
    import shutil

    run, _, _ = reference
    run = Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "logs")))
    after = json.loads((run / "eval.json").read_text())
    before = json.loads((run / "eval_base.json").read_text())
    # From another working directory, and without replacing training's result: eval-2.json.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = lomix_cli("eval", run, "eval.max_new_tokens=4", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text()) == after
    assert json.loads((run / "eval-2.json").read_text()) == after
    assert "| **mean** |" in result.stdout and f"wrote {run / 'eval-2.json'}" in result.stdout
    # The base model alone (no lomix at all) scores exactly what the disabled mixture scored.
    base = lomix_cli("eval", run, "--base", "eval.max_new_tokens=4")
    assert base.returncode == 0, base.stderr[-3000:]
    assert json.loads((run / "eval_base-2.json").read_text()) == before
    # --out names the file; an existing one is replaced only with --overwrite (checked before any work).
    taken = lomix_cli("eval", run, "--out", run / "eval.json")
    assert taken.returncode == 2 and "--overwrite" in taken.stderr and "Traceback" not in taken.stderr
    again = lomix_cli("eval", run, "eval.max_new_tokens=4", "-o", run / "eval.json", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text()) == after
    assert not (run / "eval-3.json").exists()


def test_a_run_folder_is_portable(reference, assets):
    from transformers import AutoTokenizer

    run, _, _ = reference
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # (tests/test_portable.py: relative paths are saved absolute)
    assert saved["data"]["train"] == str(assets[2]) and saved["model"]["name_or_path"] == str(assets[1])
    assert saved["output_dir"] == str(run)
    # the tokenizer travels with the mixture
    tokenizer = AutoTokenizer.from_pretrained(run / "mixture")
    reference_tokenizer = AutoTokenizer.from_pretrained(assets[1])
    text = "is 3 even or odd"
    assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == reference_tokenizer.chat_template


def test_eval_reroute_flags_reach_the_evaluation(reference, tmp_path):
    import shutil

    from lomix.recipes import evaluation

    run, _, _ = reference
    copy = Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "logs")))
    bad = lomix_cli("eval", copy, "--reroute-steps", "-1")
    assert bad.returncode != 0 and "eval.reroute_steps" in bad.stderr
    flags = ("--reroute-steps", "2", "--reroute-every", "2", "--reroute-lr", "0.05")
    result = lomix_cli("eval", copy, "eval.max_new_tokens=4", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = evaluation.run(copy, ["eval.max_new_tokens=4", "eval.reroute_steps=2", "eval.reroute_every=2",
                                     "eval.reroute_lr=0.05", "train.progress=false"])  # fmt: skip
    assert json.loads((copy / "eval-2.json").read_text()) == json.loads(json.dumps(expected))


def test_resume_from_a_checkpoint_continues_exactly(reference, tmp_path):
    run, path, _ = reference
    result = lomix_cli(
        "train", path, f"resume_from={run / 'checkpoints' / 'step-000003'}", f"output_dir={tmp_path / 'resumed'}",
        "eval.before_training=false", "eval.after_training=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and "at step 3" in result.stdout
    expected, got = losses(run), losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=TOL, rel=TOL), step
    # dropout (0.1) and router jitter make the losses depend on the restored RNG: they are not flat
    assert len({round(v, 6) for v in got.values()}) == 3


def test_a_run_folder_is_not_overwritten_without_resume(reference):
    _, path, _ = reference
    result = lomix_cli("train", path)
    assert result.returncode == 2 and "already holds a run; pass resume_from=" in result.stderr


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import accelerate
    from lomix.cli import main

    original = accelerate.Accelerator.save_state
    calls = []

    def dying_save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        location = original(self, output_dir, **kwargs)
        if len(calls) == 2:  # the files are written but the checkpoint is not in place yet
            os.kill(os.getpid(), signal.SIGKILL)
        return location

    accelerate.Accelerator.save_state = dying_save_state
    sys.argv = ["lomix", *sys.argv[1:]]
    main()
    """
)


def test_a_run_killed_mid_checkpoint_keeps_the_previous_one_and_resumes(reference, tmp_path):
    run, path, _ = reference
    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = [
        "train", str(path), f"output_dir={killed}", "train.save_every=2", "train.eval_every=0", "train.trackers=[]",
        "eval.before_training=false", "eval.after_training=false",
    ]  # fmt: skip
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-3000:]
    checkpoints = killed / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step-000002"]
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".step-000004.tmp")], "no partial folder"
    # The surviving checkpoint is a loadable mixture...
    from transformers import AutoModelForCausalLM

    from lomix.recipes.config import load_config

    cfg = load_config(path)
    lomix.load(AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path), checkpoints / "step-000002" / "mixture")
    # ...and resuming the run folder continues from it, exactly like the uninterrupted reference.
    resumed = lomix_cli("train", *args[1:], f"resume_from={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "the partial folder was not removed"
    expected, got = losses(run), losses(killed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=TOL, rel=TOL), step


def test_recipes_ls_and_cp(tmp_path):
    listing = lomix_cli("recipes", "ls")
    assert listing.returncode == 0
    for name in (
        "finetune",
        "evaluation",
        "bigbench",
        "quickstart.yaml",
        "accelerate/ddp.yaml",
        "accelerate/fsdp.yaml",
    ):
        assert name in listing.stdout
    import lomix.recipes.finetune as finetune

    copied = lomix_cli("recipes", "cp", "finetune", tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "finetune.py").read_bytes() == Path(finetune.__file__).read_bytes()
    again = lomix_cli("recipes", "cp", "finetune", tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    config = lomix_cli("recipes", "cp", "accelerate/ddp.yaml", tmp_path / "mine.yaml")
    assert config.returncode == 0 and yaml.safe_load((tmp_path / "mine.yaml").read_text())["num_processes"] == 2
    unknown = lomix_cli("recipes", "cp", "nope", tmp_path)
    assert unknown.returncode == 2 and "quickstart.yaml" in unknown.stderr
    # The copy is a standalone script: it runs from another folder with the installed lomix.
    help_text = subprocess.run(
        [sys.executable, str(tmp_path / "finetune.py"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert help_text.returncode == 0 and "key=value overrides" in help_text.stdout
