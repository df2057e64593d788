"""Folder writes are atomic as a whole (issue 25, item 4): a process killed at any step of
overwriting a folder leaves either the complete old folder or the complete new one, never the new
config beside the old weights, and the user's other files survive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CASES, build_pair

import lomix
import lomix.atomic
from lomix.atomic import atomic_directory, recover_interrupted_swap

POINTS = ["mid-block", "written", "complete", "aside", "swapped", "done"]

# Loads lomix/atomic.py by path (stdlib only, no torch: starts in a fraction of a second), overwrites
# a folder's version 1 with version 2, and SIGKILLs itself at the point named in argv.
KILLER = textwrap.dedent(
    """
    import importlib.util, os, signal, sys
    spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    target, point = sys.argv[2], sys.argv[3]

    def die(at):
        if at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    atomic._reached = die
    with atomic.atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("version 2")
        die("mid-block")
        (tmp / "weights.bin").write_bytes(b"2" * 100_000)
    """
)


def write_version(folder: Path, version: int) -> None:
    with atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text(f"version {version}")
        (tmp / "weights.bin").write_bytes(str(version).encode() * 100_000)


def version_of(folder: Path) -> int:
    """The folder's version; fails unless its config and weights are of the same version."""
    config = (folder / "config.json").read_text()
    weights = (folder / "weights.bin").read_bytes()
    version = int(config.split()[-1])
    assert weights == str(version).encode() * 100_000, f"{config} beside other weights"
    return version


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_every_step_of_an_overwrite_loses_nothing(tmp_path, point):
    target = tmp_path / "mixture"
    write_version(target, 1)
    (target / "notes.txt").write_text("mine")  # not rewritten by the writer: kept
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    result = subprocess.run(
        [sys.executable, str(script), lomix.atomic.__file__, str(target), point], capture_output=True, text=True
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    # the state the kill left, before any recovery
    survivor = target if target.exists() else None
    assert (survivor is None) == (point == "aside"), "only a kill between the two renames leaves no folder"
    if survivor is not None:
        assert version_of(target) == (2 if point in ("swapped", "done") else 1)
    recover_interrupted_swap(target)  # what the next write or lomix.load does first
    assert version_of(target) == (2 if point in ("swapped", "done") else 1)
    assert (target / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".mixture.old-*"))
    write_version(target, 3)  # and the folder can be overwritten again
    assert version_of(target) == 3 and (target / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("point", POINTS[1:])
def test_an_exception_at_every_step_of_a_mixture_save_keeps_a_whole_mixture(tmp_path, monkeypatch, point):
    case = MODEL_CASES["llama"]
    model, fresh = build_pair(case)
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=2))
    lomix.save(model, tmp_path / "mix")
    (tmp_path / "mix" / "notes.txt").write_text("mine")
    old = {k: v.clone() for k, v in lomix.checkpoint.mixture_state_dict(model).items()}
    with torch.no_grad():
        for _, layer in lomix.mixture_layers(model):
            layer.experts.B.add_(1.0)
    new = {k: v.clone() for k, v in lomix.checkpoint.mixture_state_dict(model).items()}

    def fail(at):
        if at == point:
            raise OSError(f"disk gone at {at}")

    monkeypatch.setattr(lomix.atomic, "_reached", fail)
    with pytest.raises(OSError, match="disk gone"):
        lomix.save(model, tmp_path / "mix")
    monkeypatch.undo()
    loaded = lomix.checkpoint.mixture_state_dict(lomix.load(fresh, tmp_path / "mix"))
    expected = new if point in ("swapped", "done") else old
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert (tmp_path / "mix" / "notes.txt").read_text() == "mine"
    lomix.save(model, tmp_path / "mix")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]  # nothing aside, no temporary left


def test_load_recovers_a_mixture_left_aside_by_a_kill_between_the_renames(tmp_path):
    model, fresh = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=2))
    lomix.save(model, tmp_path / "mix")
    os.rename(tmp_path / "mix", tmp_path / ".mix.old-0123abcd")  # the state a kill at "aside" leaves
    loaded = lomix.checkpoint.mixture_state_dict(lomix.load(fresh, tmp_path / "mix"))
    saved = lomix.checkpoint.mixture_state_dict(model)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]


def test_a_saved_mixture_is_readable_like_any_new_file_and_a_users_narrow_file_stays_narrow(tmp_path):
    # safetensors >= 0.8 writes owner-only files; a run folder copied to a server run by another user
    # must stay readable there. Reference: the mode a plain new file gets under this process's umask.
    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=2, rank=2))
    plain = tmp_path / "plain"
    plain.write_text("x")
    usual = plain.stat().st_mode & 0o777
    target = tmp_path / "mixture"
    lomix.save(model, target)
    secret = target / "notes.txt"
    secret.write_text("mine")
    secret.chmod(0o600)
    lomix.save(model, target)  # an overwrite carries the user's file over, as it was
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir() if p.is_file()}
    assert modes.pop("notes.txt") == 0o600
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {usual}, modes
