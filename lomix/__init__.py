"""lomix: parameter-efficient fine-tuning with routed mixtures of LoRA experts.

import lomix
model = lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=8))
loss = model(**batch).loss + lomix.aux_loss(model)
lomix.save(model, "run/mixture")
model = lomix.load(base_model, "run/mixture")
"""

__version__ = "0.1.0"

from . import embedding, library, loramixer, rloo
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load, save
from .config import BalanceConfig, MixtureConfig
from .errors import (
    ArchitectureMismatchError,
    CheckpointError,
    ConfigError,
    CorruptFileError,
    LomixError,
    MissingFileError,
    RoutingError,
    ShapeMismatchError,
    TargetModulesNotFoundError,
    UnsupportedModuleError,
)
from .experts import ExpertBank
from .frozen import disabled, inject_frozen_experts, update_router
from .inject import (
    count_parameters,
    eject,
    find_targets,
    inject,
    mixture_layers,
    mixture_parameters,
    routing_context,
)
from .kernels import mixture_lora, mixture_lora_mixed
from .layer import MixtureLinear
from .losses import aux_loss, router_z_loss, switch_load_balancing_loss
from .mhr import add_tasks, average_skills, train_only_task_rows
from .params import parameter_groups
from .routers import Router, RouterConfig, available_routers, register_router, router_config
from .routing import ParameterMixing, RoutingContext, TokenRouting
from .stats import RoutingStats

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ArchitectureMismatchError",
    "BalanceConfig",
    "CheckpointError",
    "ConfigError",
    "CorruptFileError",
    "ExpertBank",
    "LomixError",
    "MissingFileError",
    "MixtureConfig",
    "MixtureLinear",
    "ParameterMixing",
    "Router",
    "RouterConfig",
    "RoutingContext",
    "RoutingError",
    "RoutingStats",
    "ShapeMismatchError",
    "TargetModulesNotFoundError",
    "TokenRouting",
    "UnsupportedModuleError",
    "__version__",
    "add_tasks",
    "aux_loss",
    "available_routers",
    "average_skills",
    "count_parameters",
    "disabled",
    "eject",
    "embedding",
    "find_targets",
    "inject",
    "inject_frozen_experts",
    "library",
    "load",
    "loramixer",
    "mixture_layers",
    "mixture_lora",
    "mixture_lora_mixed",
    "mixture_parameters",
    "parameter_groups",
    "register_router",
    "rloo",
    "router_config",
    "router_z_loss",
    "routing_context",
    "save",
    "switch_load_balancing_loss",
    "train_only_task_rows",
    "update_router",
]
