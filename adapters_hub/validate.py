"""Check a folder's files before anything reaches a model: format, tensor names, shapes, no pickle.

Two kinds of folder are read:

- ``lomix``: ``lomix_config.json`` + ``lomix_model.safetensors`` (`lomix.save`);
- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's LoRA ``save_pretrained``).

Only safetensors headers are read here (names, shapes, dtypes); tensors are loaded later, by the
function that puts them into a model, after the checks against that model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from lomix.checkpoint import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, read_config
from lomix.config import MixtureConfig
from lomix.errors import CorruptFileError, MissingFileError, ShapeMismatchError

from .errors import AdapterError, UnsafeWeightsError, UnsupportedAdapterError

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
KINDS = ("lomix", "peft")
Kind = Literal["lomix", "peft"]
FILES = {"lomix": (CONFIG_NAME, WEIGHTS_NAME), "peft": (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)}
# PEFT writes LoRA factors of a linear layer as base_model.model.<module>.lora_{A,B}.weight.
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# Initialisations that also change the BASE weights (the adapter only fits the modified base),
# unless PEFT converted the adapter to a plain LoRA on save.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def detect_kind(names: Iterable[str], kind: str = "auto") -> Kind | None:
    """Which kind a folder (or repository listing, as file names) holds: lomix wins over peft."""
    names = set(names)
    if kind not in ("auto", *KINDS):
        raise ValueError(f"kind must be 'auto', 'lomix' or 'peft', got {kind!r}")
    for candidate in KINDS if kind == "auto" else (kind,):
        if FILES[candidate][0] in names:
            return candidate  # type: ignore[return-value]
    return None


def missing_files_error(source: str, names: Iterable[str], kind: str) -> Exception:
    """The error for a folder or repository holding no readable mixture/adapter (pickle-only included)."""
    names = sorted(set(names))
    pickles = [n for n in names if is_pickle(n)]
    wanted = [FILES[k] for k in (KINDS if kind == "auto" else (kind,))]
    if kind != "auto" and FILES[kind][0] in names:  # the config is there, the safetensors weights are not
        expected = FILES[kind][1]
    else:
        expected = " or ".join(f"{c} + {w}" for c, w in wanted)
    if pickles:
        return UnsafeWeightsError(
            f"{source} holds {', '.join(pickles)} but not {expected}: lomix loads weights from safetensors only, "
            "because loading a pickle file (.bin, .pt, .pth, .ckpt) can run arbitrary code. Ask the author to "
            "publish safetensors (PEFT's save_pretrained writes adapter_model.safetensors by default) or convert "
            "the file yourself in a sandbox you trust."
        )
    listing = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "no files"
    return MissingFileError(f"{source} holds no {expected} (it has: {listing})")


def read_header(path: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """{name: (shape, dtype)} and the metadata of a safetensors file, without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            header = {}
            for key in handle.keys():
                sliced = handle.get_slice(key)
                header[key] = (tuple(sliced.get_shape()), sliced.get_dtype())
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise CorruptFileError(f"{path}: not a readable safetensors file ({exc})") from None
    return header, metadata


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


# ---------------------------------------------------------------------------------------------
# PEFT LoRA adapters


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer of a PEFT adapter: y += scale * B A x."""

    name: str
    rank: int
    d_in: int
    d_out: int
    alpha: float
    scale: float


@dataclass
class PeftAdapter:
    """A validated PEFT LoRA adapter folder (nothing loaded into a model yet)."""

    source: str
    folder: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)

    kind: Literal["peft"] = "peft"

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A (r, d_in), B (d_out, r))}, loaded from the safetensors file."""
        path = self.folder / PEFT_WEIGHTS_NAME
        out = {}
        with safe_open(str(path), framework="pt") as handle:
            for name in self.modules:
                prefix = f"base_model.model.{name}"
                out[name] = (handle.get_tensor(f"{prefix}.lora_A.weight"), handle.get_tensor(f"{prefix}.lora_B.weight"))
        return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return patterns.get(module, default)


def _check_peft_config(config: dict[str, Any], where: str) -> None:
    def refuse(what: str) -> None:
        raise UnsupportedAdapterError(f"{where}: {what}; lomix loads plain LoRA adapters as frozen experts")

    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        refuse(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if config.get("use_dora"):
        refuse("use_dora is true (DoRA rescales the adapted weight's column norms, which a LoRA expert cannot do)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse(f"the adapter trains biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')!r})")
    if config.get("target_parameters"):
        refuse(f"target_parameters={config['target_parameters']!r} (LoRA on raw parameters, not linear layers)")
    if config.get("layer_replication"):
        refuse("layer_replication is set (the adapter expects a base model with duplicated layers)")
    if config.get("alora_invocation_tokens"):
        refuse("it is an activated LoRA (alora_invocation_tokens), switched on by tokens rather than always")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        refuse(
            f"init_lora_weights={init!r} also changes the base weights, so the adapter only fits the modified base; "
            "convert it to a plain LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{where}: {name} must be a positive number, got {value!r}")


def _targeted(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _check_targets(targets: Any, modules: Iterable[str], source: str) -> None:
    """Tensors only for modules that ``target_modules`` selects, and some tensor for every listed name.

    Only a list of names is checked: PEFT also accepts one regular expression and the shorthand
    'all-linear', whose meaning depends on the model.
    """
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return
    modules = list(modules)
    for name in modules:
        if not any(_targeted(name, t) for t in targets):
            raise AdapterError(
                f"{source}: {PEFT_WEIGHTS_NAME} holds LoRA tensors for {name}, which target_modules {targets} in "
                f"{PEFT_CONFIG_NAME} does not select"
            )
    for target in targets:
        if not any(_targeted(name, target) for name in modules):
            raise AdapterError(
                f"{source}: target_modules in {PEFT_CONFIG_NAME} lists {target!r}, but {PEFT_WEIGHTS_NAME} holds "
                "no LoRA tensor for a module of that name"
            )


def inspect_peft(folder: Path, source: str) -> PeftAdapter:
    """Validate a PEFT LoRA folder: config fields, tensor names, one (A, B) pair per module, shapes."""
    config_path = folder / PEFT_CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{source}: {PEFT_CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{source}: {PEFT_CONFIG_NAME} must hold a JSON object")
    where = f"{source} ({PEFT_CONFIG_NAME})"
    _check_peft_config(config, where)
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise missing_files_error(source, [p.name for p in folder.iterdir()], "peft")
    header, metadata = read_header(weights)
    pairs: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for key, (shape, dtype) in header.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(
                f"{source} ({PEFT_WEIGHTS_NAME}): tensor {key!r} is not a LoRA factor of a linear layer "
                "(base_model.model.<module>.lora_A.weight / lora_B.weight); lomix cannot hold modules_to_save, "
                "trainable tokens, embedding or DoRA tensors in an expert"
            )
        if len(shape) != 2 or dtype not in _FLOAT_DTYPES:
            raise AdapterError(
                f"{source} ({PEFT_WEIGHTS_NAME}): tensor {key!r} has shape {shape} and dtype {dtype}; "
                "a LoRA factor is a 2-d floating-point matrix"
            )
        pairs.setdefault(match["module"], {})[match["factor"]] = (shape, dtype)
    if not pairs:
        raise AdapterError(f"{source} ({PEFT_WEIGHTS_NAME}) holds no LoRA tensors")
    _check_targets(config.get("target_modules"), pairs, source)
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = {}
    for name, factors in pairs.items():
        if set(factors) != {"A", "B"}:
            lacking = "lora_B" if "A" in factors else "lora_A"
            raise AdapterError(f"{source} ({PEFT_WEIGHTS_NAME}): module {name} has no {lacking}.weight")
        (r_a, d_in), (d_out, r_b) = factors["A"][0], factors["B"][0]
        if r_a != r_b:
            raise ShapeMismatchError(
                f"{source} ({PEFT_WEIGHTS_NAME}): module {name} has lora_A of shape {(r_a, d_in)} and lora_B of "
                f"shape {(d_out, r_b)}; their ranks must agree"
            )
        expected_rank = _pattern_value(rank_pattern, name, config["r"])
        if expected_rank != r_a:
            raise ShapeMismatchError(
                f"{source}: {PEFT_CONFIG_NAME} gives module {name} rank {expected_rank}, but its lora_A has "
                f"{r_a} rows ({PEFT_WEIGHTS_NAME})"
            )
        alpha = float(_pattern_value(alpha_pattern, name, config["lora_alpha"]))
        scale = alpha / (math.sqrt(r_a) if use_rslora else r_a)
        modules[name] = LoraModule(name, r_a, d_in, d_out, alpha, scale)
    return PeftAdapter(source=source, folder=folder, config=config, modules=modules, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# lomix mixtures


@dataclass
class MixtureInfo:
    """A validated lomix mixture folder (nothing loaded into a model yet)."""

    source: str
    folder: Path
    config: MixtureConfig
    metadata: dict[str, str]
    header: dict[str, tuple[tuple[int, ...], str]]

    kind: Literal["lomix"] = "lomix"

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("base_model") or None

    @property
    def layers(self) -> list[str]:
        """Names of the wrapped modules, in file order."""
        return [key[: -len(".experts.A")] for key in self.header if key.endswith(".experts.A")]

    def parameter_counts(self) -> dict[str, int]:
        """Numbers of stored parameters: experts (A and B) and routers."""
        counts = {"experts": 0, "routers": 0}
        for key, (shape, _) in self.header.items():
            counts["experts" if ".experts." in key else "routers"] += math.prod(shape)
        return counts


def inspect_lomix(folder: Path, source: str) -> MixtureInfo:
    """Validate a lomix folder: config, and expert shapes that agree with it (no model needed)."""
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise missing_files_error(source, [p.name for p in folder.iterdir()], "lomix")
    header, metadata = read_header(weights)
    where = f"{source} ({WEIGHTS_NAME})"
    experts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, (shape, dtype) in header.items():
        module, sep, param = key.rpartition(".experts.")
        if sep:
            if param not in ("A", "B") or len(shape) != 3 or dtype not in _FLOAT_DTYPES:
                raise CorruptFileError(f"{where}: unexpected expert tensor {key!r} of shape {shape} and dtype {dtype}")
            experts.setdefault(module, {})[param] = shape
        elif ".router." not in key:
            raise CorruptFileError(f"{where}: tensor {key!r} is neither an expert nor a router parameter")
    if not experts:
        raise CorruptFileError(f"{where}: holds no expert tensors")
    e, r = config.num_experts, config.rank
    for module, shapes in experts.items():
        if set(shapes) != {"A", "B"}:
            raise CorruptFileError(f"{where}: module {module} lacks experts.{'B' if 'A' in shapes else 'A'}")
        a, b = shapes["A"], shapes["B"]
        if a[:2] != (e, r) or b[0] != e or b[2] != r:
            raise ShapeMismatchError(
                f"{where}: {module}.experts.A has shape {a} and .experts.B {b}, but {CONFIG_NAME} says "
                f"num_experts={e}, rank={r} (A is (E, r, d_in), B is (E, d_out, r))"
            )
    return MixtureInfo(source=source, folder=folder, config=config, metadata=metadata, header=header)


def inspect(folder: str | Path, kind: str = "auto", source: str | None = None) -> PeftAdapter | MixtureInfo:
    """Validate the mixture or PEFT adapter in ``folder``; refuses pickle-only folders, naming the files."""
    folder = Path(folder)
    source = source or str(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{source}: no such folder")
    names = [p.name for p in folder.iterdir() if p.is_file()]
    found = detect_kind(names, kind)
    if found is None:
        raise missing_files_error(source, names, kind)
    return inspect_lomix(folder, source) if found == "lomix" else inspect_peft(folder, source)
