"""`lomix hub pull` / `lomix hub push` through the installed command, configured by the hub's
environment variables alone (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE) as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hubserver
import pytest
from hubdata import folder_files, save_mixture

LOMIX = str(Path(sys.executable).parent / "lomix")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from hubserver.serve(tmp_path, monkeypatch)  # also sets HF_ENDPOINT and HF_HOME in os.environ


def lomix_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOMIX, *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_pull_online_then_offline_from_the_cache(hub, tmp_path):
    folder, _ = save_mixture(tmp_path / "v1", seed=1)
    sha = hub.commit("user/mix", folder_files(folder))
    hub.tag("user/mix", "v1", sha)

    result = lomix_cli("hub", "pull", "user/mix@v1", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"lomix mixture user/mix@v1 (commit {sha}) -> {tmp_path / 'out'}" in result.stdout
    assert folder_files(tmp_path / "out") == folder_files(folder)
    assert (hub.cache / "models--user--mix" / "refs" / "v1").read_text() == sha  # HF_HOME was honoured

    requests = len(hub.requests)
    result = lomix_cli("hub", "pull", "user/mix@v1", "--out", str(tmp_path / "again"), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert folder_files(tmp_path / "again") == folder_files(folder) and len(hub.requests) == requests

    result = lomix_cli("hub", "pull", "user/other", "--out", str(tmp_path / "other"), HF_HUB_OFFLINE="1")
    assert result.returncode == 2 and result.stderr.startswith("error: user/other@main: offline mode is on")
    assert "lomix hub pull ./path/to/folder" in result.stderr and not (tmp_path / "other").exists()


def test_push_uploads_the_run(hub, tmp_path):
    folder, _ = save_mixture(tmp_path / "run" / "mixture", seed=2)
    (tmp_path / "run" / "config.yaml").write_text("lr: 0.01\n")
    result = lomix_cli("hub", "push", str(tmp_path / "run"), "user/cli-mix", "--private", HF_TOKEN=hub.write_token)
    assert result.returncode == 0, result.stderr
    (commit,) = hub.commits
    assert sorted(commit["files"]) == ["README.md", "config.yaml", "lomix_config.json", "lomix_model.safetensors"]
    assert f"(commit {hub.repos['user/cli-mix'].refs['main']})" in result.stdout
    assert hub.created[0]["visibility"] == "private"
    assert commit["files"]["lomix_model.safetensors"] == (folder / "lomix_model.safetensors").read_bytes()
