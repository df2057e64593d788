"""Launch settings of the fused mixture kernels, per GPU, from a JSON file when one exists.

`benchmarks/autotune_fused.py` measures them on a GPU and writes ``tuning/<gpu-slug>.json`` next
to this module (``nvidia_h200.json`` for an "NVIDIA H200"); ``LOMIX_KERNEL_TUNING=/path/file.json``
points at another file. A GPU without a file has not been measured, and the fused path stays off
there (``max_columns`` 0: today's kernels, whose cost is known) unless ``LOMIX_FUSED=1`` forces it
on with the defaults below; the Triton interpreter on the CPU (tests) uses the defaults. A file
holds any subset of the fields of `FusedTuning` (unknown fields are refused, naming the file):

    {"gpu": "NVIDIA H200", "max_columns": 256,
     "gemm": {"block_m": 128, "block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 4},
     "decode_gemm": {...}, "shrink": {"block_m": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}}
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..errors import ConfigError

TUNING_DIR = Path(__file__).resolve().parent / "tuning"


@dataclass
class GemmTiles:
    """Tiles of `extended_gemm` (one program per BLOCK_M x BLOCK_N output tile)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4


@dataclass
class ShrinkTiles:
    """Tiles of `router_shrink` (one program per BLOCK_M rows, all E + E*r columns)."""

    block_m: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class FusedTuning:
    """What one GPU runs best. ``max_columns``: the largest E*r the fused path takes (0: none); above
    it the layer keeps the separate router and the sorted (grouped) mixture kernels. ``decode_tokens``:
    up to this many tokens the ``decode_*`` tiles apply (small BLOCK_M, more column blocks)."""

    gpu: str = "defaults"
    max_columns: int = 256
    decode_tokens: int = 64
    gemm: GemmTiles = field(default_factory=GemmTiles)
    decode_gemm: GemmTiles = field(
        default_factory=lambda: GemmTiles(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    )
    shrink: ShrinkTiles = field(default_factory=lambda: ShrinkTiles(num_warps=8))
    decode_shrink: ShrinkTiles = field(
        default_factory=lambda: ShrinkTiles(block_m=16, block_k=128, num_warps=4, num_stages=3)
    )

    def to_dict(self) -> dict:
        return asdict(self)


_NESTED = {"gemm": GemmTiles, "decode_gemm": GemmTiles, "shrink": ShrinkTiles, "decode_shrink": ShrinkTiles}


def _positive_int(value, where: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}:{where}", f"expected a positive integer, got {value!r}")
    return value


def _power_of_two(value, where: str, path: Path) -> int:
    value = _positive_int(value, where, path)
    if value & (value - 1):
        raise ConfigError(f"{path}:{where}", f"expected a power of two, got {value}")
    return value


def tuning_from_dict(data: dict, path: Path) -> FusedTuning:
    """Validate a tuning mapping (``path`` names the file in errors)."""
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(FusedTuning)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}:{unknown[0]}", f"unknown field; expected some of {', '.join(sorted(known))}")
    tuning = FusedTuning()
    for name, value in data.items():
        if name == "gpu":
            tuning.gpu = str(value)
        elif name in _NESTED:
            cls = _NESTED[name]
            if not isinstance(value, dict):
                raise ConfigError(f"{path}:{name}", f"expected an object, got {type(value).__name__}")
            allowed = {f.name for f in fields(cls)}
            bad = sorted(set(value) - allowed)
            if bad:
                raise ConfigError(f"{path}:{name}.{bad[0]}", f"unknown field; expected some of {', '.join(allowed)}")
            tiles = getattr(tuning, name)
            for key, number in value.items():
                check = _power_of_two if key.startswith("block") else _positive_int
                setattr(tiles, key, check(number, f"{name}.{key}", path))
        elif name == "max_columns":  # 0: this GPU never takes the fused path
            setattr(tuning, name, 0 if value == 0 and not isinstance(value, bool) else _positive_int(value, name, path))
        else:
            setattr(tuning, name, _positive_int(value, name, path))
    return tuning


def gpu_slug(name: str) -> str:
    """File stem for a device name: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@functools.cache
def _load(path: str) -> FusedTuning:
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(str(file), f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return tuning_from_dict(data, file)


def tuning_path(device: torch.device) -> Path | None:
    """The tuning file that applies to ``device``, or None (defaults)."""
    override = os.environ.get("LOMIX_KERNEL_TUNING", "").strip()
    if override:
        path = Path(override)
        if not path.is_file():
            raise ConfigError("LOMIX_KERNEL_TUNING", f"no such file: {path}")
        return path
    if device.type != "cuda":
        return None
    path = TUNING_DIR / f"{gpu_slug(torch.cuda.get_device_name(device))}.json"
    return path if path.is_file() else None


_by_device: dict[tuple[str, str], FusedTuning] = {}


def tuning_for(device: torch.device) -> FusedTuning:
    """The tuning of ``device``, looked up once per device (layers call this on every forward)."""
    forced = os.environ.get("LOMIX_FUSED", "").strip() == "1"
    key = (str(device), os.environ.get("LOMIX_KERNEL_TUNING", ""), forced)
    if key not in _by_device:
        path = tuning_path(device)
        if path is not None:
            _by_device[key] = _load(str(path))
        elif device.type == "cuda" and not forced:  # never measured on this GPU: keep today's path
            _by_device[key] = FusedTuning(gpu="unmeasured", max_columns=0)
        else:
            _by_device[key] = FusedTuning()
    return _by_device[key]


def clear_cache() -> None:
    """Forget loaded files (after writing a new one in the same process)."""
    _load.cache_clear()
    _by_device.clear()
