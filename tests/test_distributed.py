"""Data parallelism by launch flag only: two gloo processes on the CPU, launched by accelerate with
the shipped configs (DDP, FSDP, DeepSpeed ZeRO-2), train the same weights as one process with the
same global batch, evaluate to the same table, and resume a checkpoint exactly.

Everything is launched with this interpreter (``python -m accelerate.commands.launch``,
``python -m lomix.cli``), so the tests do not depend on which environment a console script names.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_config, write_jsonl

import lomix
import lomix.recipes
from lomix.errors import ConfigError
from lomix.recipes import distributed

ACCELERATE_CONFIGS = Path(lomix.recipes.__file__).resolve().parent / "configs" / "accelerate"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
LOMIX = [sys.executable, "-m", "lomix.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch(config_name: str, *args: str) -> subprocess.CompletedProcess:
    """``lomix train ARGS`` in 2 processes launched with a shipped accelerate config."""
    config = ACCELERATE_CONFIGS / config_name
    port = ["--main_process_port", str(free_port())]
    return run(
        [*LAUNCH, "--config_file", str(config), "--num_processes", "2", *port, "-m", "lomix.cli", "train", *args]
    )


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    """The logged training losses (or held-out losses with ``key="eval_loss"``), step by step."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [record[key] for record in records if key in record]


def mixture(run_dir: Path) -> dict:
    return load_file(str(run_dir / "mixture" / lomix.WEIGHTS_NAME))


def assert_same_mixture(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= rel * max(1.0, float(a[key].abs().max())), key


def quiet_config(tmp_path: Path, **train) -> dict:
    """The tiny run with no randomness inside the forward (dropout, jitter) and no batch-level
    balance loss: one process and two then compute the same gradients, up to the order of float
    additions."""
    model = make_model_dir(tmp_path / "model")
    train_file = write_jsonl(tmp_path / "train.jsonl", tiny_rows(0, 16))
    test = write_jsonl(tmp_path / "test.jsonl", tiny_rows(1, 3))
    return tiny_config(
        tmp_path,
        model,
        train_file,
        test,
        mixture={"dropout": 0.0, "balance": {"switch": 0.0}},
        router={"name": "topk", "k": 2, "jitter": 0.0},
        train={"batch_size": 2, "lr": 2e-2, **train},
        eval={"max_examples_per_task": 3, "max_new_tokens": 3, "before_training": False},
    )


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    config = quiet_config(tmp_path, max_steps=5)
    config["eval"]["before_training"] = True
    path = write_config(tmp_path / "ddp.yaml", config)
    two = launch("ddp.yaml", str(path), f"output_dir={tmp_path / 'two'}")
    assert "global batch 4, 2 process(es)" in two.stdout
    # one process: micro-batches of 2, accumulated twice (the same 4 examples per step)
    one = run([*LOMIX, "train", str(path), f"output_dir={tmp_path / 'one'}", "train.grad_accum=2"])
    assert "global batch 4, 1 process(es)" in one.stdout

    # evaluation shares the examples out across the processes and gathers them: same table
    one_eval = json.loads((tmp_path / "one" / "eval.json").read_text())
    two_eval = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two_eval["mean"]["n"] == one_eval["mean"]["n"] == 9
    for task, result in one_eval["tasks"].items():
        assert two_eval["tasks"][task]["score"] == pytest.approx(result["score"]), task

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a, b = mixture(tmp_path / "one"), mixture(tmp_path / "two")
    moved = max(float(v.abs().max()) for k, v in a.items() if k.endswith(".B"))
    assert moved > 1e-3, "training did not move the experts"
    assert_same_mixture(a, b, rel=1e-5)


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory):
    """(folder, config file, reference run) of 4 steps of global batch 4 in one process, with a
    held-out loss every 2 steps, and a checkpoint every 2 steps in the sharded runs that are
    compared with it."""
    tmp = tmp_path_factory.mktemp("sharded")
    path = write_config(tmp / "run.yaml", quiet_config(tmp, max_steps=4, save_every=2, eval_every=2))
    run([*LOMIX, "train", str(path), f"output_dir={tmp / 'one'}", "train.grad_accum=2"])
    return tmp, path, tmp / "one"


def check_sharded_mode(config_name: str, reference, name: str) -> Path:
    """Train 2 processes under ``config_name``; they match the one-process reference (losses, saved
    mixture in lomix's plain keys, evaluation table); resuming the step-2 checkpoint in a new
    folder reproduces steps 3-4 and the final mixture."""
    tmp, path, one = reference
    two = tmp / name
    result = launch(config_name, str(path), f"output_dir={two}")
    assert "global batch 4, 2 process(es)" in result.stdout
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert len(losses(one, "eval_loss")) == 2
    assert losses(two, "eval_loss") == pytest.approx(losses(one, "eval_loss"), rel=1e-5)
    assert_same_mixture(mixture(one), mixture(two), rel=1e-5)
    one_eval = json.loads((one / "eval.json").read_text())
    two_eval = json.loads((two / "eval.json").read_text())
    assert two_eval["mean"]["n"] == one_eval["mean"]["n"] == 9
    for task, result in one_eval["tasks"].items():
        assert two_eval["tasks"][task]["score"] == pytest.approx(result["score"]), task

    # The checkpoint holds the mixture in lomix's format (gathered from the shards) and no copy of
    # the frozen base: the raw bytes of a frozen weight (gate_proj is not a target) appear in no file.
    checkpoint = two / "checkpoints" / "step-000002"
    saved = load_file(str(checkpoint / "mixture" / lomix.WEIGHTS_NAME))
    assert saved.keys() == mixture(one).keys()
    frozen = load_file(str(tmp / "model" / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    frozen_bytes = frozen.contiguous().numpy().tobytes()
    for file in (p for p in checkpoint.rglob("*") if p.is_file()):
        assert frozen_bytes not in file.read_bytes(), file

    resumed = tmp / f"{name}-resumed"
    again = launch(
        config_name, str(path), f"output_dir={resumed}", f"resume_from={checkpoint}", "eval.after_training=false"
    )
    assert f"resuming from {checkpoint} at step 2" in again.stdout
    assert losses(resumed) == pytest.approx(losses(two)[2:], rel=1e-6)
    assert_same_mixture(mixture(two), mixture(resumed), rel=1e-6)
    return two


@pytest.mark.slow
def test_fsdp_on_two_gloo_processes_matches_one_process_and_resumes_exactly(one_process_reference):
    check_sharded_mode("fsdp.yaml", one_process_reference, "fsdp")


@pytest.mark.slow
def test_deepspeed_zero2_on_two_gloo_processes_matches_one_process_and_resumes_exactly(one_process_reference):
    check_sharded_mode("deepspeed_zero2.yaml", one_process_reference, "zero2")


def test_deepspeed_must_accumulate_and_clip_like_the_recipe_and_zero3_is_refused():
    from accelerate.utils import DistributedType

    def accelerator(zero_stage=2, **config):
        plugin = SimpleNamespace(deepspeed_config=config, zero_stage=zero_stage)
        return SimpleNamespace(
            distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
        )

    distributed.check_deepspeed(accelerator(gradient_accumulation_steps=2, gradient_clipping=1.0), 2, 1.0)
    distributed.check_deepspeed(accelerator(gradient_accumulation_steps="auto", gradient_clipping="auto"), 3, 0.5)
    with pytest.raises(ConfigError, match=r"train.grad_accum.*gradient_accumulation_steps is 1"):
        distributed.check_deepspeed(accelerator(gradient_accumulation_steps=1, gradient_clipping=1.0), 2, 1.0)
    with pytest.raises(ConfigError, match=r"train.max_grad_norm.*gradient_clipping is 1\.0"):
        distributed.check_deepspeed(accelerator(gradient_accumulation_steps=1, gradient_clipping=1.0), 1, 0.0)
    with pytest.raises(ConfigError, match=r"ZeRO-3 does not run lomix.*deepspeed_zero2\.yaml"):
        distributed.check_deepspeed(accelerator(zero_stage=3, gradient_accumulation_steps=1), 1, 1.0)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("FSDP_VERSION", "2", "fsdp_version 1 only"), ("FSDP_USE_ORIG_PARAMS", "false", "use_orig_params must be true")],
)
def test_cpu_fsdp_refuses_what_it_cannot_run_before_joining_a_group(monkeypatch, variable, value, message):
    from accelerate.state import PartialState

    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "true")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        distributed.cpu_fsdp_plugin()
    assert PartialState._shared_state == {}  # refused before accelerate's state was set up
