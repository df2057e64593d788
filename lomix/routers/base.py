"""The router interface and the registry that maps a router's name to its class and config.

A router is one file: a config dataclass (subclass of `RouterConfig`) and a module (subclass of
`Router`) registered together with `@register_router("name", ConfigClass)`. Routers of other
installed packages are found through the entry-point group ``lomix.routers`` (name = the router's
name, value = the module that registers it), imported the first time a name is looked up.

The contract is written down here: every hook that the layer, `lomix.inject`, the optimizer set-up
(`lomix.parameter_groups`) or a recipe may call is declared below with a no-op default, and callers
call it unconditionally. A router overrides only the hooks it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..typed import from_dict, to_dict

if TYPE_CHECKING:
    from ..config import MixtureConfig
    from ..routing import RoutingContext, TokenRouting


@dataclass
class RouterConfig:
    """Base of every router's config. ``name`` is set by `register_router`."""

    name: ClassVar[str] = ""

    estimator: ClassVar[str | None] = None
    """How a recipe trains this router: None (backpropagation through the gates) or ``"rloo"`` (the
    selection is sampled; the finetune recipe runs ``rloo.samples`` selections per example, remix)."""

    def validate(self, num_experts: int) -> None:
        """Raise `ConfigError` (field ``router.<name>``) for values impossible with ``num_experts``."""

    def validate_mixture(self, mixture: MixtureConfig) -> None:
        """Raise `ConfigError` for rules that involve other mixture fields (remix: no balance loss).

        Called by `MixtureConfig` after every field is checked, with the router's defaults applied.
        """

    def mixture_defaults(self) -> dict[str, Any]:
        """Values of other `MixtureConfig` fields this router needs, as nested plain dicts
        (remix: ``{"balance": {"switch": 0.0}}``).

        They replace the generic defaults of fields the user did not set (with a notice in the
        recipes); a value the user did set explicitly is checked by `validate_mixture` instead.
        """
        return {}

    @property
    def task_rows(self) -> list[str]:
        """Task names whose order fixes the task ids this router routes by (Poly/MHR: ``tasks``);
        evaluation gives a loaded mixture's tasks these ids. Empty for routers that take no task id."""
        return []

    def evaluation_changes(self, saved: RouterConfig, num_experts: int) -> dict[str, Any]:
        """Fields of a loaded mixture's router config ``saved`` that this config (a run's, with the
        user's overrides) changes for an evaluation (glider: alpha and k); applied with
        `lomix.update_router`. Default: none."""
        return {}

    @property
    def needs_whole_sequences(self) -> bool:
        """True when a forward call must see whole sequences: no KV-cached continuation (remix with
        granularity=sequence routes on the mean of all tokens of one call)."""
        return False

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

    The hooks below are called by `MixtureLinear` when it is built, in this order:
    ``check_layer``, ``init_experts``, ``bind_experts``, ``bind_mixture``; `lomix.parameter_groups`
    reads ``default_lr``, `lomix.attach_optimizer` calls ``attach_optimizer``, a training loop calls
    `lomix.after_optimizer_step` (hence ``after_optimizer_step``) after every optimizer step, and
    `lomix.reroute` calls ``route_logits``. Each default does nothing (``route_logits``: None).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[RouterConfig]] = RouterConfig

    default_lr: ClassVar[float | None] = None
    """The router's own learning rate when the user gives none (Poly/MHR: 0.1, the paper's rate);
    None: the experts' rate."""

    def __init__(self, config: RouterConfig, d_in: int, num_experts: int):
        super().__init__()
        self.config = config
        self.d_in = d_in
        self.num_experts = num_experts

    def check_layer(self, name: str, d_in: int, d_out: int) -> None:
        """Raise `ConfigError` when this router cannot serve layer ``name`` (d_in -> d_out) (Poly/MHR:
        the heads must divide both sizes)."""

    def init_experts(self, experts: nn.Module) -> None:
        """Re-initialise the layer's fresh `ExpertBank` the router's way (Poly/MHR: A per head);
        the default keeps the bank's own initialisation."""

    def bind_experts(self, experts: nn.Module) -> None:
        """Learn the layer's `ExpertBank` for a router that routes by the experts' own weights (Arrow:
        their top singular vectors). Called once when the layer is built, before any weight is loaded,
        so such a router reads the bank's tensors when it routes, not here."""

    def bind_mixture(self, mixture: MixtureConfig) -> None:
        """Learn the layer's mixture config (rank, LoRA scale) for gates that depend on them (remix's omega)."""

    def route_logits(self, logits: torch.Tensor, x: torch.Tensor, context: RoutingContext) -> TokenRouting | None:
        """The routing this router makes from router logits (N, E) it did not compute itself: its own
        selection and gate rule applied to ``logits``, so that ``route_logits(r.logits, x, context)``
        equals ``r = forward(x, context)``. Test-time rerouting (`lomix.reroute`) calls it with offset
        logits. None (the default): this router's routing is not a function of its logits, and
        rerouting refuses it."""
        return None

    @classmethod
    def attach_optimizer(cls, model: nn.Module, optimizer: Any) -> Any:
        """Act on the training optimizer of a model holding routers of this class, once per class
        (a stage that must leave some experts alone, say). Returns a handle with ``remove()``, or
        None when there is nothing to undo."""

    def softmax_topk_rule(self):
        """A `lomix.kernels.fused.SoftmaxTopK` when this router's decision right now is a linear
        softmax top-k that the fused GPU kernel may compute itself, else None (the default: the
        layer calls ``forward``)."""
        return None

    def softmax_topk_mismatch(self) -> str:
        """Why ``softmax_topk_rule`` is None right now, as one phrase an error can quote (an export to a
        native mixture-of-experts checkpoint, whose gate is a linear softmax top-k, says it). The
        default names the router; routers that know their reason say it (top-p, a balancing bias)."""
        return f"router {self.name!r} declares no linear softmax top-k rule (Router.softmax_topk_rule)"

    def after_optimizer_step(self) -> None:
        """Update state that is not trained by the optimizer, once per optimizer step, from what the
        router saw in the training forwards since the previous step (the loss-free balancing bias of
        `topk` / `topp`). Called for every router by `lomix.after_optimizer_step(model)`; the finetune
        recipe calls it after each step it takes (a skipped non-finite step calls nothing)."""

    def extra_repr(self) -> str:
        return f"{self.name}, d_in={self.d_in}, experts={self.num_experts}"


_REGISTRY: dict[str, type[Router]] = {}
ENTRY_POINT_GROUP = "lomix.routers"
_plugin_errors: dict[str, str] = {}
_plugins_loaded = False


def load_plugins() -> None:
    """Import every router plugin of the entry-point group ``lomix.routers`` (once per process).

    A plugin that fails to import, or does not register the router it names, is remembered and
    reported when that router is asked for; the other routers keep working.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not break the routers that work
            _plugin_errors[entry.name] = f"the router plugin {entry.name!r} ({entry.value}) failed to load: {exc!r}"
            continue
        if entry.name not in _REGISTRY:
            _plugin_errors[entry.name] = (
                f"the router plugin {entry.name!r} ({entry.value}) registers no router of that name; its module "
                f"must apply @register_router({entry.name!r}, ...)"
            )


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
    """The registered routers' names, installed plugins included."""
    load_plugins()
    return sorted(_REGISTRY)


def router_class(name: str) -> type[Router]:
    if not isinstance(name, str):  # a list or mapping from a config file: no lookup can take it
        raise ConfigError(
            "router.name", f"expected a router name, got {name!r}; available: {', '.join(available_routers())}"
        )
    if name not in _REGISTRY:
        load_plugins()
    if name in _plugin_errors:
        raise ConfigError("router.name", _plugin_errors[name])
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
    if not isinstance(name, str):
        known = ", ".join(available_routers())
        raise ConfigError(f"{path}.name", f"expected a router name (one of: {known}), got {name!r}")
    cls = router_class(name).config_class
    return from_dict(cls, fields, path)


def build_router(config: RouterConfig, d_in: int, num_experts: int) -> Router:
    config.validate(num_experts)
    return router_class(config.name)(config, d_in, num_experts)
