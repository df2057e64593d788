"""lomix: parameter-efficient fine-tuning with routed mixtures of LoRA experts.

import lomix
model = lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=8))
loss = model(**batch).loss + lomix.aux_loss(model)
lomix.save(model, "run/mixture")
model = lomix.load(base_model, "run/mixture")
model.save_pretrained("out")                  # the same format (Trainer.save_model calls it)
model = lomix.from_pretrained("out")         # the base named in its metadata, with the mixture

The names below are imported on first use (PEP 562), so ``import lomix`` (and the ``lomix``
command's ``--help``) does not import torch until a name that needs it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "CONFIG_NAME": "checkpoint",
    "WEIGHTS_NAME": "checkpoint",
    "load": "checkpoint",
    "save": "checkpoint",
    "BalanceConfig": "config",
    "MixtureConfig": "config",
    "ArchitectureMismatchError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "CorruptFileError": "errors",
    "LomixError": "errors",
    "MissingFileError": "errors",
    "RepackedWeightError": "errors",
    "RoutingError": "errors",
    "ShapeMismatchError": "errors",
    "TargetModulesNotFoundError": "errors",
    "UnsupportedModuleError": "errors",
    "ExpertBank": "experts",
    "disabled": "frozen",
    "inject_frozen_experts": "frozen",
    "update_router": "frozen",
    "count_parameters": "inject",
    "eject": "inject",
    "find_targets": "inject",
    "inject": "inject",
    "mixture_layers": "inject",
    "mixture_parameters": "inject",
    "routing_context": "inject",
    "mixture_lora": "kernels",
    "mixture_lora_mixed": "kernels",
    "MixtureLinear": "layer",
    "aux_loss": "losses",
    "router_z_loss": "losses",
    "switch_load_balancing_loss": "losses",
    "add_tasks": "mhr",
    "average_skills": "mhr",
    "train_only_task_rows": "mhr",
    "after_optimizer_step": "params",
    "from_pretrained": "pretrained",
    "attach_optimizer": "params",
    "parameter_groups": "params",
    "Router": "routers",
    "RouterConfig": "routers",
    "available_routers": "routers",
    "register_router": "routers",
    "router_config": "routers",
    "ParameterMixing": "routing",
    "RoutingContext": "routing",
    "TokenRouting": "routing",
    "RoutingStats": "stats",
}
_SUBMODULES = ("embedding", "library", "loramixer", "rloo")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (lomix.mhr, lomix.checkpoint ...), as an eager package would have it
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps the function ``lomix.inject`` from being shadowed by its submodule ``lomix.inject``:
    importing a submodule sets it as an attribute of the package, which an eager ``from .inject
    import inject`` used to overwrite."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
