"""bitsandbytes in the recipes: a quantized base (``model.load_in_4bit`` / ``model.load_in_8bit``) and
8-bit optimizers (``train.optimizer``).

    lomix train recipes/configs/quickstart_4bit.yaml                 # nf4 base, double quantization
    lomix train recipes/configs/quickstart.yaml model.load_in_8bit=true train.optimizer=adamw8bit

The model fields map one to one onto transformers' ``BitsAndBytesConfig``; the finetune recipe then
calls `lomix.quant.prepare_kbit_training` before injecting the mixture. bitsandbytes is optional:
a config that needs it fails, naming the field, before anything is loaded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lomix.errors import ConfigError
from lomix.quant import INSTALL_HINT
from lomix.recipes.config import ModelConfig, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# bitsandbytes' optimizer class for each train.optimizer (torch's AdamW for "adamw").
OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}


def require_bitsandbytes(field: str, value: Any) -> Any:
    """The bitsandbytes module, or a `ConfigError` naming the field that asked for it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(field, f"{value!r} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None
    return bitsandbytes


def check(model: ModelConfig, train: TrainConfig | None = None) -> None:
    """Fail early, naming the field, when a config needs bitsandbytes and it is missing."""
    if model.load_in_4bit:
        require_bitsandbytes("model.load_in_4bit", True)
    if model.load_in_8bit:
        require_bitsandbytes("model.load_in_8bit", True)
    if train is not None and train.optimizer in OPTIMIZERS:
        require_bitsandbytes("train.optimizer", train.optimizer)


def bnb_config(cfg: ModelConfig):
    """transformers' ``BitsAndBytesConfig`` for ``cfg``, or None for an unquantized base."""
    if not cfg.quantized:
        return None
    check(cfg)
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        quiet_int8_cast_warning()
    return BitsAndBytesConfig(
        load_in_4bit=cfg.load_in_4bit,
        load_in_8bit=cfg.load_in_8bit,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype or cfg.dtype],
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        llm_int8_threshold=cfg.llm_int8_threshold,
        llm_int8_skip_modules=cfg.llm_int8_skip_modules,
    )


def quantized_load_kwargs(cfg: ModelConfig, folder: str, **kwargs: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords that load ``folder`` quantized as ``cfg`` asks ({} for an unquantized base).

    A GGUF model's cached safetensors copy holds dequantized weights but keeps the GGUF file's
    ``quantization_config`` (quant_method gguf) in its config.json, which transformers would refuse to
    combine with a BitsAndBytesConfig: that stale entry is dropped from the loaded config.
    """
    quantization = bnb_config(cfg)
    if quantization is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **kwargs)
    stale = getattr(config, "quantization_config", None)
    method = stale.get("quant_method") if isinstance(stale, dict) else getattr(stale, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        del config.quantization_config
    return {"quantization_config": quantization, "config": config}


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "inputs will be cast ... to float16" at EVERY int8 inference matmul of a float32
    model (each layer, each step of an evaluation): it is expected there, so the recipes drop it."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in logger.filters):
        logger.addFilter(_DropInt8CastWarning())


def fusable(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter: floating point on the CPU or a GPU."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` over the parameter groups of `lomix.parameter_groups` (their lr, weight decay)."""
    if cfg.optimizer == "adamw":
        # One vectorised kernel per step (fused) instead of torch's default on the CPU, a loop of
        # per-parameter ops: a mixture holds E experts per layer, and at E=64 on SmolLM2 (166M
        # trainable parameters) that loop took 0.8 s a step, the fused kernel ~4x less. Same update,
        # other rounding.
        return torch.optim.AdamW(groups, fused=fusable(groups))
    bnb = require_bitsandbytes("train.optimizer", cfg.optimizer)
    return getattr(bnb.optim, OPTIMIZERS[cfg.optimizer])(groups)


__all__ = [
    "OPTIMIZERS",
    "bnb_config",
    "build_optimizer",
    "check",
    "fusable",
    "quantized_load_kwargs",
    "quiet_int8_cast_warning",
    "require_bitsandbytes",
]
