"""Routers: one file per routing method, registered by name with its config dataclass."""

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
from .fixed import FixedRouter, FixedRouterConfig
from .glider import GliderRouter, GliderRouterConfig, PhatgooseRouter, PhatgooseRouterConfig
from .loramixer import LoRAMixerRouter, LoRAMixerRouterConfig
from .poly import MHRRouterConfig, PolyRouter, PolyRouterConfig
from .remix import RemixRouter, RemixRouterConfig
from .topk import TopKRouter, TopKRouterConfig

__all__ = [
    "DenseRouter",
    "DenseRouterConfig",
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
    "available_routers",
    "build_router",
    "load_plugins",
    "register_router",
    "router_class",
    "router_config",
    "router_config_from_dict",
]
