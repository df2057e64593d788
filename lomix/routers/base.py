"""The router interface and the registry that maps a router's name to its class and config.

A router is one file: a config dataclass (subclass of `RouterConfig`) and a module (subclass of
`Router`) registered together with `@register_router("name", ConfigClass)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import ConfigError
from ..typed import from_dict, to_dict


@dataclass
class RouterConfig:
    """Base of every router's config. ``name`` is set by `register_router`."""

    name: ClassVar[str] = ""

    def validate(self, num_experts: int) -> None:
        """Raise `ConfigError` (field ``router.<name>``) for values impossible with ``num_experts``."""

    @classmethod
    def from_config_dict(cls, data: Any, path: str = "router") -> RouterConfig:
        """Build the registered router config named by ``data["name"]``."""
        return router_config_from_dict(data, path)

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"name": self.name, **fields}


class Router(nn.Module):
    """Maps a layer's input to a `TokenRouting` or a `ParameterMixing`.

    Subclasses implement ``forward(x, context) -> TokenRouting | ParameterMixing``, where x is the
    layer input of shape (..., d_in) (the leading dims are (batch, seq) for transformers) and
    context the batch's `RoutingContext`.

    Optional hooks the layer calls when present: ``check_layer(name, d_in, d_out)`` (refuse a layer)
    and ``bind_mixture(mixture_config)`` (gates that depend on the rank or the LoRA scale, remix);
    a config may define ``validate_mixture(mixture_config)``, which `MixtureConfig` calls.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RouterConfig]] = RouterConfig

    def __init__(self, config: RouterConfig, d_in: int, num_experts: int):
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.num_experts = num_experts

    def softmax_topk_rule(self):
        """A `lomix.kernels.fused.SoftmaxTopK` when this router's decision right now is a linear
        softmax top-k that the fused GPU kernel may compute itself, else None (the default: the
        layer calls ``forward``)."""
        return None

    def extra_repr(self) -> str:
        return f"{self.name}, d_in={self.d_in}, experts={self.num_experts}"


_REGISTRY: dict[str, type[Router]] = {}


def register_router(name: str, config_class: type[RouterConfig]):
    """Class decorator: register a `Router` subclass under ``name`` with its config dataclass."""

    def decorate(cls: type[Router]) -> type[Router]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a router named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        cls.config_class = config_class
        config_class.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_routers() -> list[str]:
    return sorted(_REGISTRY)


def router_class(name: str) -> type[Router]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            "router.name", f"unknown router {name!r}; available: {', '.join(available_routers())}"
        ) from None


def router_config(name: str, **fields: Any) -> RouterConfig:
    """The config of router ``name`` with ``fields`` set, validated like a loaded config."""
    return router_config_from_dict({"name": name, **fields})


def router_config_from_dict(data: dict[str, Any] | RouterConfig, path: str = "router") -> RouterConfig:
    if isinstance(data, RouterConfig):
        return data
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(path, f"expected a mapping with a 'name' (one of: {', '.join(available_routers())})")
    fields = dict(data)
    name = fields.pop("name")
    cls = router_class(name).config_class
    return from_dict(cls, fields, path)


def build_router(config: RouterConfig, d_in: int, num_experts: int) -> Router:
    config.validate(num_experts)
    return router_class(config.name)(config, d_in, num_experts)
