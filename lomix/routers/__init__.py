"""Routers: one file per routing method, registered by name with its config dataclass.

Every module of this package is imported here (registering its router), so a new router is one
file in this folder; the explicit imports below only name the shipped classes for users.
"""

import importlib
import pkgutil

from .base import (
    Router,
    RouterConfig,
    available_routers,
    build_router,
    load_plugins,
    register_router,
    router_class,
    router_config,
    router_config_from_dict,
)
from .dense import DenseRouter, DenseRouterConfig
from .expert_choice import ExpertChoiceRouter, ExpertChoiceRouterConfig
from .fixed import FixedRouter, FixedRouterConfig
from .glider import GliderRouter, GliderRouterConfig, PhatgooseRouter, PhatgooseRouterConfig
from .loramixer import LoRAMixerRouter, LoRAMixerRouterConfig
from .poly import MHRRouterConfig, PolyRouter, PolyRouterConfig
from .remix import RemixRouter, RemixRouterConfig
from .topk import TopKRouter, TopKRouterConfig
from .topp import TopPRouter, TopPRouterConfig

__all__ = [
    "DenseRouter",
    "DenseRouterConfig",
    "ExpertChoiceRouter",
    "ExpertChoiceRouterConfig",
    "FixedRouter",
    "FixedRouterConfig",
    "GliderRouter",
    "GliderRouterConfig",
    "LoRAMixerRouter",
    "LoRAMixerRouterConfig",
    "MHRRouterConfig",
    "PhatgooseRouter",
    "PhatgooseRouterConfig",
    "PolyRouter",
    "PolyRouterConfig",
    "RemixRouter",
    "RemixRouterConfig",
    "Router",
    "RouterConfig",
    "TopKRouter",
    "TopKRouterConfig",
    "TopPRouter",
    "TopPRouterConfig",
    "available_routers",
    "build_router",
    "load_plugins",
    "register_router",
    "router_class",
    "router_config",
    "router_config_from_dict",
]


def _import_every_router() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_every_router()
