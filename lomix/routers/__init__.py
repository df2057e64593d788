"""Routers: one file per routing method, registered by name with its config dataclass.

Every module of this package is imported here (registering its router), and so is the ``router``
module of every method package (`lomix.methods.<method>.router`): a new router is one file in
this folder, or one in its method's package. The explicit imports below only name the shipped
classes for users.
"""

import importlib
import pkgutil

from lomix import methods

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
    methods.modules("router")  # each method package's router module (lomix.methods.<method>.router)


_import_every_router()

# the shipped routers that live in a method package, under their old names here
from lomix.methods.glider.router import (  # noqa: E402
    GliderRouter,
    GliderRouterConfig,
    PhatgooseRouter,
    PhatgooseRouterConfig,
)
from lomix.methods.loramixer.router import LoRAMixerRouter, LoRAMixerRouterConfig  # noqa: E402
from lomix.methods.poly.router import MHRRouterConfig, PolyRouter, PolyRouterConfig  # noqa: E402
from lomix.methods.remix.router import RemixRouter, RemixRouterConfig  # noqa: E402
