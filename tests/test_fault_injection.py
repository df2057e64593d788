"""Fault injection (issue 25, the harness): a tiny training run is SIGKILLed at points drawn from a
seed (mid log append, inside a checkpoint save, mid step, inside the final mixture save), resumed
after each kill the way a user would, and must end with the mixture and the loss curve of an
uninterrupted run, with no temporary left behind.

Each run is a forked child of this process (real SIGKILL, no new interpreter to import torch into),
limited to one thread so that the reference and the resumed runs add in the same order.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_jsonl

import lomix.atomic
from lomix.recipes import finetune, losses
from lomix.recipes.config import build_config

STEPS = 8
KILLS = 4  # three kinds in an order drawn from the seed, then one inside the final mixture save


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kind: str, occurrence: int) -> None:
    """In the child: SIGKILL it at the ``occurrence``-th event of ``kind`` (counted in this child)."""
    seen = [0]

    def due() -> bool:
        seen[0] += 1
        return seen[0] == occurrence

    if kind == "log":  # half a record appended, then the kill: the cut line resume must drop
        original_log = finetune.log

        def cut_log(run, record, bar=None):
            if not due():
                return original_log(run, record, bar)
            line = json.dumps(record) + "\n"
            with open(run.out / "log.jsonl", "a") as handle:
                handle.write(line[: len(line) // 2])
                handle.flush()
            kill_now()

        finetune.log = cut_log
    elif kind == "step":  # in the middle of a forward pass
        original_loss = losses.answer_loss_sum  # the training loss (losses.plain_loss) calls it

        def dying_loss(logits, labels):
            if due():
                kill_now()
            return original_loss(logits, labels)

        losses.answer_loss_sum = dying_loss
    else:  # at a step of an atomic folder write (lomix.atomic._reached) in a checkpoint or the final save
        inside = [False]

        def reached(point):
            if inside[0] and due():
                kill_now()

        lomix.atomic._reached = reached
        if kind == "checkpoint":
            original_save = finetune.save_checkpoint

            def save_checkpoint(run):
                inside[0] = True
                try:
                    return original_save(run)
                finally:
                    inside[0] = False

            finetune.save_checkpoint = save_checkpoint
        else:  # "mixture": what follows the loop is the final save (evaluation is off)
            original_train = finetune.train

            def train(run):
                records = original_train(run)
                inside[0] = True
                return records

            finetune.train = train


# Events of each kind per run, at least: kills draw their occurrence from these ranges. A checkpoint
# save reaches 6 steps (its mixture folder's written/complete/done, then its own); the final save 3
# or, overwriting a mixture a kill left complete, 5.
OCCURRENCES = {"log": (1, 3), "step": (1, 3), "checkpoint": (1, 6), "mixture": (1, 3)}


def in_child(cfg, log_file: Path, kill: tuple[str, int] | None = None) -> int:
    """Run the recipe in a forked child; its exit status (negative: the signal that ended it)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            descriptor = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(descriptor, 1)
            os.dup2(descriptor, 2)
            sys.stdout = sys.stderr = open(descriptor, "w", buffering=1, closefd=False)  # not pytest's capture
            torch.set_num_threads(1)
            if kill is not None:
                arm(*kill)
            finetune.run(cfg)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def logged_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def mixture_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "mixture" / lomix.WEIGHTS_NAME))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_a_run_killed_at_random_points_and_resumed_equals_an_uninterrupted_run(tmp_path, seed):
    model = make_model_dir(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", tiny_rows(0, 8))

    def cfg(out: Path, resume: bool):
        data = tiny_config(
            tmp_path, model, train, None,
            train={"max_steps": STEPS, "save_every": 2, "lr": 2e-2, "log_every": 1, "progress": False},
            eval={"after_training": False},
        )  # fmt: skip
        data["output_dir"] = str(out)
        data["resume_from"] = str(out) if resume else None
        return build_config(data)

    child_log = tmp_path / "children.log"
    reference = tmp_path / "reference"
    assert in_child(cfg(reference, False), child_log) == 0, child_log.read_text()[-3000:]

    rng = random.Random(seed)
    kinds = [*rng.sample(["log", "checkpoint", "step"], 3), "mixture"]
    plan = [(kind, rng.randint(*OCCURRENCES[kind])) for kind in kinds]
    assert len(plan) == KILLS
    out = tmp_path / "killed"
    for kill in [*plan, None]:  # four killed runs, then one that finishes
        resume = out.exists() and bool(finetune.completed_checkpoints(out))  # as a user would rerun it
        status = in_child(cfg(out, resume), child_log, kill)
        expected = 0 if kill is None else -signal.SIGKILL
        assert status == expected, f"{kill}: exit {status}\n" + child_log.read_text()[-3000:]

    notices = child_log.read_text()
    assert "dropped the cut last line" in notices  # the kill mid-append left half a record
    assert "resuming from" in notices
    assert logged_losses(out) == logged_losses(reference)  # every step once, the same losses
    assert [step for step, _ in logged_losses(out)] == list(range(1, STEPS + 1))
    got, want = mixture_tensors(out), mixture_tensors(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    leftovers = [p.name for folder in (out, out / "checkpoints") for p in folder.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
