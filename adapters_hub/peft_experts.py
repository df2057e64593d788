"""Several PEFT LoRA adapters as the frozen experts of one mixture, in one call.

    model = lomix.hub.load_peft_experts(model, ["user/math-lora", "user/code-lora@v2", "./my-lora"],
                                        router=lomix.router_config("topk", k=1))
    # only the routers train; expert j reproduces adapter j exactly

How each adapter becomes expert j of every layer it adapts:

- Ranks may differ (between adapters, and between the modules of one adapter through PEFT's
  ``rank_pattern``): every expert is zero-padded to the largest rank R. Padding is exact: the extra
  rows of A and columns of B are zero, so B_pad A_pad = B A.
- Scales: PEFT scales each module's delta by lora_alpha / r (lora_alpha / sqrt(r) with
  ``use_rslora``; ``alpha_pattern`` per module). The mixture is built with alpha = R, so the lomix
  scale alpha / R is 1, and each adapter's own scale is folded into its B. Expert j's delta is then
  exactly adapter j's.
- Modules: the mixture wraps every module any adapter adapts; an adapter that leaves a module alone
  has a zero expert there, exactly like the adapter itself.
- ``fan_in_fan_out`` (GPT-2's Conv1D) only says how the BASE weight is stored: PEFT keeps lora_A as
  (r, d_in) and lora_B as (d_out, r) either way, the layout of lomix's experts, so the factors are
  copied as they are.
- Features a frozen LoRA expert cannot reproduce (DoRA, trained biases, modules_to_save, activated
  LoRA, base-modifying initialisations such as PiSSA) are refused with the reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from lomix.config import BalanceConfig, MixtureConfig
from lomix.errors import ArchitectureMismatchError, LomixError, ShapeMismatchError
from lomix.frozen import inject_frozen_experts
from lomix.layer import linear_dims
from lomix.routers import RouterConfig, router_config

from .errors import BaseModelMismatchError
from .pull import pull
from .validate import PeftAdapter


def _model_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _same_name(a: str, b: str) -> bool:
    """'meta-llama/Llama-2-7b-hf' and '/models/Llama-2-7b-hf' name the same base; compare the last part."""
    return a.rstrip("/").rsplit("/", 1)[-1].lower() == b.rstrip("/").rsplit("/", 1)[-1].lower()


def _describe_base(model: nn.Module) -> str:
    name = _model_name(model)
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return f"{name!r} ({kind})" if name else f"an unnamed {kind} model"


def _check_base_names(adapters: Sequence[PeftAdapter], model: nn.Module) -> None:
    fix = "pass check_base=False if they are the same weights under another name"
    model_name = _model_name(model)
    named = [a for a in adapters if a.base_model]
    for adapter in named:
        if model_name and not _same_name(adapter.base_model, model_name):
            raise BaseModelMismatchError(
                f"{adapter.source} was trained on {adapter.base_model!r} (base_model_name_or_path in "
                f"adapter_config.json), but the model given is {model_name!r}; {fix}"
            )
    for first, other in itertools.pairwise(named):
        if not _same_name(first.base_model, other.base_model):
            raise BaseModelMismatchError(
                f"{first.source} was trained on {first.base_model!r} but {other.source} on {other.base_model!r}; "
                f"experts of one mixture must share a base model; {fix}"
            )


def _check_modules(adapter: PeftAdapter, model: nn.Module) -> None:
    trained_on = f"the adapter was trained on {adapter.base_model!r}" if adapter.base_model else "an unnamed base"
    for name, module in adapter.modules.items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ArchitectureMismatchError(
                f"{adapter.source}: adapts module {name}, which the model given ({_describe_base(model)}) lacks; "
                f"{trained_on}"
            ) from None
        d_in, d_out = linear_dims(target, name)
        if (d_in, d_out) != (module.d_in, module.d_out):
            raise ShapeMismatchError(
                f"{adapter.source}: module {name} has lora_A of shape {(module.rank, module.d_in)} and lora_B of "
                f"shape {(module.d_out, module.rank)} (a {module.d_in} -> {module.d_out} layer), but in the model "
                f"given ({_describe_base(model)}) {name} maps {d_in} -> {d_out}; {trained_on}"
            )


def load_peft_experts(
    model: nn.Module,
    adapters: Sequence[str | Path | PeftAdapter],
    router: RouterConfig | str | None = None,
    *,
    balance: BalanceConfig | None = None,
    kernel: str = "auto",
    check_base: bool = True,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """Inject a mixture whose expert j is PEFT LoRA adapter ``adapters[j]``, frozen; only routers train.

    Args:
        model: the frozen base model (not yet holding a mixture).
        adapters: hub ids (``namespace/name[@revision]``), local folders, or `PeftAdapter`s from
            `lomix.hub.pull`; at least one.
        router: a router config (`lomix.router_config`) or a registered name; default ``dense``
            (softmax over all experts).
        balance, kernel: as in `MixtureConfig`.
        check_base: refuse adapters whose ``base_model_name_or_path`` names another model than
            ``model.config._name_or_path`` (compared by their last path component).
        token, cache_dir, local_files_only: as in `lomix.hub.pull`.

    Every adapter is validated (its own files, then each module's shapes against ``model``)
    before the model is touched; on any error ``model`` is left as it was. Returns ``model``.
    The mixture saves with `lomix.save` like any other (its config records num_experts = number
    of adapters, rank = the largest rank, alpha = rank).
    """
    if not adapters:
        raise LomixError("load_peft_experts needs at least one adapter")
    if getattr(model, "lomix_state", None) is not None:
        raise LomixError(f"{type(model).__name__} already holds a lomix mixture; pass a fresh base model")
    loaded: list[PeftAdapter] = []
    for spec in adapters:
        if isinstance(spec, PeftAdapter):
            loaded.append(spec)
        else:
            pulled = pull(spec, kind="peft", token=token, cache_dir=cache_dir, local_files_only=local_files_only)
            assert isinstance(pulled.info, PeftAdapter)
            loaded.append(pulled.info)
    if check_base:
        _check_base_names(loaded, model)
    for adapter in loaded:
        _check_modules(adapter, model)

    adapted = set().union(*(a.modules for a in loaded))
    targets = [name for name, _ in model.named_modules() if name in adapted]
    rank = max(a.max_rank for a in loaded)
    if router is None:
        router = router_config("dense")
    elif isinstance(router, str):
        router = router_config(router)
    config = MixtureConfig(
        target_modules=targets,
        num_experts=len(loaded),
        rank=rank,
        alpha=float(rank),  # lomix scale alpha / rank = 1: each adapter's own scale is folded into its B
        dropout=0.0,
        router=router,
        balance=balance or BalanceConfig(),
        kernel=kernel,
    )
    factors = [
        {name: (lora_a, lora_b, adapter.modules[name].scale) for name, (lora_a, lora_b) in adapter.factors().items()}
        for adapter in loaded
    ]
    inject_frozen_experts(model, config, factors)
    return model
