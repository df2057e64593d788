"""An expert library: independently trained single-task LoRA experts, each with a task description
and its PHATGOOSE gates, and GLIDER over it (METHODS.md section 4).

A library is a folder:

    LIBRARY/library.json            {"format": "lomix-library", "format_version": "1",
                                     "experts": [{"name", "description", "folder", "gate_steps", "source"}]}
    LIBRARY/experts/<name>/         one expert: a lomix mixture of ONE expert whose router is
                                    ``phatgoose`` (the gate vector of every module it adapts)

Each expert folder is an ordinary lomix mixture (``lomix.load`` reads it), so the library can be
pushed and pulled like any folder. Experts may adapt different modules with different ranks and
scales (third-party PEFT LoRAs): `load_library` wraps every module any expert adapts, pads ranks
with zeros (exact) and folds each expert's own LoRA scale into its B, like `lomix.hub.load_peft_experts`.

    model = lomix.library.load_library(base_model, "LIBRARY", alpha=3.0, k=2)   # a glider mixture
    out = model(**batch, task_descriptions=["Answer questions about dates."])

Building one: train an expert (any single-expert mixture), then `prepare_gate_training(model)`
turns it into a PHATGOOSE gate-training mixture (expert frozen, gates zero) and, once its gates are
trained, `Library.add(model, name, description)` stores it (lomix.recipes.glider does both).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lomix.atomic import atomic_file
from lomix.checkpoint import read_config, read_weights, save
from lomix.config import MixtureConfig
from lomix.errors import ConfigError, CorruptFileError, LomixError, MissingFileError, ShapeMismatchError
from lomix.frozen import inject_frozen_experts, update_router
from lomix.inject import mixture_layers
from lomix.layer import linear_dims
from lomix.methods.glider.embedding import DEFAULT_EMBEDDING_MODEL
from lomix.methods.glider.router import GliderRouterConfig
from lomix.paths import unsafe_reason
from lomix.routers import RouterConfig, build_router

LIBRARY_NAME = "library.json"
LIBRARY_FORMAT = "lomix-library"
LIBRARY_VERSION = "1"
EXPERTS_DIR = "experts"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass
class LibraryExpert:
    """One expert of a library: its name, task description, folder (relative to the library), the
    number of gate-training steps its PHATGOOSE gates had (0: untrained gates, local logit 0), and
    where it came from (a run folder, a PEFT adapter)."""

    name: str
    description: str
    folder: str
    gate_steps: int = 0
    source: str = ""


@dataclass
class Library:
    """An expert library folder (see the module docstring)."""

    path: Path
    experts: list[LibraryExpert] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, *, create: bool = False) -> Library:
        """Read ``path/library.json``; with ``create`` an absent library starts empty."""
        path = Path(path)
        index = path / LIBRARY_NAME
        if not index.is_file():
            if create:
                return cls(path)
            raise MissingFileError(f"{index} is missing; {path} is not a lomix expert library")
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"{index}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != LIBRARY_FORMAT:
            raise CorruptFileError(f"{index}: not a lomix library index (expected format {LIBRARY_FORMAT!r})")
        if str(data.get("format_version")) != LIBRARY_VERSION:
            raise CorruptFileError(
                f"{index}: format_version {data.get('format_version')!r}; this lomix reads version {LIBRARY_VERSION}"
            )
        experts = []
        for number, entry in enumerate(data.get("experts", [])):
            try:
                experts.append(LibraryExpert(**entry))
            except TypeError as exc:
                raise CorruptFileError(f"{index}: experts[{number}] is malformed ({exc})") from None
        library = cls(path, experts)
        for entry in experts:
            library.folder(entry)  # refuses a folder outside the library before anything is read
        return library

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def expert(self, name: str) -> LibraryExpert:
        for entry in self.experts:
            if entry.name == name:
                return entry
        raise ConfigError("library.experts", f"{self.path} has no expert {name!r}; it has: {', '.join(self.names())}")

    def folder(self, entry: LibraryExpert) -> Path:
        """The expert's folder; one that could lead outside the library is refused (the rule
        `lomix.hub.pull_library` applies to the same index)."""
        reason = unsafe_reason(entry.folder) if isinstance(entry.folder, str) else "it is not a string"
        if reason is not None:
            raise CorruptFileError(
                f"{self.path / LIBRARY_NAME}: expert {entry.name!r} folder {entry.folder!r} is refused: {reason}; "
                "lomix never reads or writes outside its folders"
            )
        return self.path / entry.folder

    def write_index(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = {
            "format": LIBRARY_FORMAT,
            "format_version": LIBRARY_VERSION,
            "experts": [asdict(e) for e in self.experts],
        }
        with atomic_file(self.path / LIBRARY_NAME) as handle:
            handle.write(json.dumps(data, indent=2) + "\n")

    def add(
        self,
        model: nn.Module,
        name: str,
        description: str,
        *,
        gate_steps: int = 0,
        source: str = "",
        overwrite: bool = False,
    ) -> LibraryExpert:
        """Store ``model``'s single-expert ``phatgoose`` mixture as expert ``name``; returns its entry."""
        if not _NAME.fullmatch(name or ""):
            raise ConfigError("name", f"an expert name must be letters, digits, '_', '-' or '.', got {name!r}")
        if not description or not description.strip():
            raise ConfigError("description", f"expert {name!r} needs a non-empty task description")
        state = getattr(model, "lomix_state", None)
        if state is None or state.config.num_experts != 1 or state.config.router.name != "phatgoose":
            got = (
                "no mixture"
                if state is None
                else f"{state.config.num_experts} experts, router {state.config.router.name!r}"
            )
            raise LomixError(
                f"a library expert is a mixture of one expert with the phatgoose router (got {got}); "
                "call lomix.library.prepare_gate_training(model) first"
            )
        if name in self.names() and not overwrite:
            raise ConfigError("name", f"{self.path} already has an expert {name!r}; choose another name or overwrite")
        entry = LibraryExpert(name, description.strip(), f"{EXPERTS_DIR}/{name}", int(gate_steps), str(source))
        save(model, self.path / entry.folder, metadata={"expert": name, "description": entry.description})
        self.experts = [e for e in self.experts if e.name != name] + [entry]
        self.write_index()
        return entry


def prepare_gate_training(model: nn.Module) -> nn.Module:
    """Turn a mixture of ONE expert (any router) into PHATGOOSE gate training, in place.

    Every layer's router becomes ``phatgoose`` with a zero gate vector (y = W x + s sigmoid(v . x) B A x);
    the expert is frozen and only the gates train. Returns ``model``.
    """
    state = getattr(model, "lomix_state", None)
    if state is None:
        raise LomixError(f"{type(model).__name__} holds no lomix mixture; load a trained expert first")
    if state.config.num_experts != 1:
        raise ConfigError(
            "mixture.num_experts",
            f"a library expert is ONE LoRA trained on one task; this mixture has {state.config.num_experts} experts",
        )
    config = MixtureConfig.from_dict({**state.config.to_dict(), "router": {"name": "phatgoose"}})
    for _, layer in mixture_layers(model):
        device = layer.experts.A.device
        layer.router = build_router(config.router, layer.d_in, 1).to(device)
        layer.experts.requires_grad_(False)
        layer.router.gate_vectors.requires_grad_(True)
    state.config = config
    return model


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The PHATGOOSE gate vectors of every layer (what gate training optimises)."""
    return [layer.router.gate_vectors for _, layer in mixture_layers(model)]


def _expert_scale(config: MixtureConfig) -> float:
    return config.scale


def load_library(
    model: nn.Module,
    library: str | Path | Library,
    *,
    alpha: float = 3.0,
    k: int = 2,
    experts: list[str] | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    missing_task: str = "error",
    kernel: str = "auto",
    router: RouterConfig | None = None,
) -> nn.Module:
    """Inject a GLIDER mixture of the library's experts into ``model`` (frozen, for inference).

    Args:
        experts: names to use, in this order (default: all of the library's, in its order).
        exclude: names left out (held-out evaluation: the query task's own expert is not there).
        alpha, k, embedding_model, missing_task: `GliderRouterConfig` fields.
        router: route the library's experts with this router config instead of GLIDER (a
            training-free one such as ``lomix.router_config("arrow", k=2)``); the GLIDER fields and
            the experts' PHATGOOSE gates are then unused.

    Every expert is read and checked against ``model`` before the model is touched.
    """
    if not isinstance(library, Library):
        library = Library.open(library)
    names = list(experts) if experts is not None else library.names()
    unknown = [n for n in list(names) + list(exclude) if n not in library.names()]
    if unknown:
        raise ConfigError(
            "library.exclude" if set(unknown) <= set(exclude) else "library.experts",
            f"{library.path} has no expert(s) {', '.join(unknown)}; it has: {', '.join(library.names())}",
        )
    names = [n for n in names if n not in set(exclude)]
    if not names:
        raise ConfigError("library.exclude", f"leaves no expert of {library.path} to route to")
    loaded = []
    for name in names:
        entry = library.expert(name)
        folder = library.folder(entry)
        config = read_config(folder)
        tensors, _ = read_weights(folder)
        if config.num_experts != 1:
            raise CorruptFileError(f"{folder}: a library expert holds one expert, this one {config.num_experts}")
        modules = sorted({key.rsplit(".experts.", 1)[0] for key in tensors if ".experts." in key})
        for module in modules:
            try:
                target = model.get_submodule(module)
            except AttributeError:
                raise ShapeMismatchError(f"{folder}: adapts module {module}, which the model given lacks") from None
            d_in, d_out = linear_dims(target, module)
            a, b = tensors[f"{module}.experts.A"], tensors[f"{module}.experts.B"]
            if a.shape[2] != d_in or b.shape[1] != d_out:
                raise ShapeMismatchError(
                    f"{folder}: module {module} maps {a.shape[2]} -> {b.shape[1]}, but in the model given it maps "
                    f"{d_in} -> {d_out}"
                )
        loaded.append((entry, config, tensors, modules))

    targets = {m for _, _, _, modules in loaded for m in modules}
    ordered = [name for name, _ in model.named_modules() if name in targets]
    rank = max(config.rank for _, config, _, _ in loaded)
    glider = GliderRouterConfig(
        k=min(k, len(loaded)),
        alpha=alpha,
        experts=[e.name for e, _, _, _ in loaded],
        descriptions=[e.description for e, _, _, _ in loaded],
        embedding_model=embedding_model,
        library=str(library.path),
        missing_task=missing_task,
    )
    config = MixtureConfig(
        target_modules=ordered,
        num_experts=len(loaded),
        rank=rank,
        alpha=float(rank),  # scale alpha / rank = 1: each expert's own scale is folded into its B
        dropout=0.0,
        router=glider if router is None else router,
        balance={"switch": 0.0, "z_loss": 0.0},
        kernel=kernel,
    )

    def fill(layers) -> None:  # GLIDER's own state: which experts each module has, their gate vectors
        for layer in layers.values():
            layer.router.present.fill_(False)
        for j, (_, _, tensors, modules) in enumerate(loaded):
            for module in modules:
                layer = layers[module]
                gate = tensors.get(f"{module}.router.gate_vectors")
                if gate is not None:
                    layer.router.gate_vectors[j] = gate[0].to(layer.router.gate_vectors.dtype)
                layer.router.present[j] = True

    factors = [
        {m: (tensors[f"{m}.experts.A"][0], tensors[f"{m}.experts.B"][0], _expert_scale(c)) for m in modules}
        for _, c, tensors, modules in loaded
    ]
    inject_frozen_experts(model, config, factors, freeze_routers=True, fill=fill if router is None else None)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def set_glider(model: nn.Module, *, alpha: float | None = None, k: int | None = None) -> None:
    """Change a loaded GLIDER mixture's alpha and k (per run: 100 held-in, 3 held-out in the paper)."""
    state = getattr(model, "lomix_state", None)
    if state is None or state.config.router.name != "glider":
        raise LomixError("set_glider needs a model holding a glider mixture (lomix.library.load_library)")
    changes: dict[str, Any] = {}
    if alpha is not None:
        changes["alpha"] = alpha
    if k is not None:
        changes["k"] = k
    update_router(model, **changes)


__all__ = [
    "LIBRARY_NAME",
    "Library",
    "LibraryExpert",
    "gate_parameters",
    "load_library",
    "prepare_gate_training",
    "set_glider",
]
