"""Data parallelism by launch flag only: two gloo processes on the CPU, launched by accelerate with the
shipped DDP config, train the same weights as one process with the same global batch and evaluate
to the same table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_config, write_jsonl

import lomix
import lomix.recipes

BIN = Path(sys.executable).parent
DDP_CONFIG = Path(lomix.recipes.__file__).resolve().parent / "configs" / "accelerate" / "ddp.yaml"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model = make_model_dir(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows(0, 16))
    test = write_jsonl(tmp_path / "test.jsonl", tiny_rows(1, 3))
    # No randomness inside the forward (dropout, jitter) and no batch-level balance loss: the two
    # set-ups must then compute the same gradients, up to the order of float additions.
    config = tiny_config(
        tmp_path,
        model,
        train,
        test,
        mixture={"dropout": 0.0, "balance": {"switch": 0.0}},
        router={"name": "topk", "k": 2, "jitter": 0.0},
        train={"max_steps": 5, "batch_size": 2, "lr": 2e-2},
        eval={"max_examples_per_task": 3, "max_new_tokens": 3},
    )
    path = write_config(tmp_path / "ddp.yaml", config)
    two = run(
        [
            str(BIN / "accelerate"), "launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "lomix.cli", "train", str(path),
            f"output_dir={tmp_path / 'two'}",
        ]
    )  # fmt: skip
    assert "global batch 4, 2 process(es)" in two.stdout
    # one process: micro-batches of 2, accumulated twice (the same 4 examples per step)
    one = run([str(BIN / "lomix"), "train", str(path), f"output_dir={tmp_path / 'one'}", "train.grad_accum=2"])
    assert "global batch 4, 1 process(es)" in one.stdout

    # evaluation shares the examples out across the processes and gathers them: same table
    one_eval = json.loads((tmp_path / "one" / "eval.json").read_text())
    two_eval = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two_eval["mean"]["n"] == one_eval["mean"]["n"] == 9
    for task, result in one_eval["tasks"].items():
        assert two_eval["tasks"][task]["score"] == pytest.approx(result["score"]), task

    def losses(folder):
        lines = (tmp_path / folder / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
    a = load_file(str(tmp_path / "one" / "mixture" / lomix.WEIGHTS_NAME))
    b = load_file(str(tmp_path / "two" / "mixture" / lomix.WEIGHTS_NAME))
    assert a.keys() == b.keys()
    moved = max(float(v.abs().max()) for k, v in a.items() if k.endswith(".B"))
    assert moved > 1e-3, "training did not move the experts"
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5 * max(1.0, float(a[key].abs().max())), key
