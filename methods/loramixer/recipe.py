"""LoRA-Mixer as recipe stages over the finetune recipe (Li et al. 2025, arXiv:2507.00029).

    lomix loramixer recipes/configs/loramixer.yaml                       # hard stage, then soft stage
    lomix loramixer recipes/configs/loramixer.yaml loramixer.adapters='[./a, user/b-lora, ./c]'   # plug-and-play

1. hard (``output_dir/hard``): a ``loramixer`` router in ``stage: hard`` routes every sequence to the
   expert of its domain (the task id, in the order of the run's ``tasks.json``), so expert j trains
   on domain j's data only (the finetune recipe restores the other experts after each optimizer
   step, `lomix.loramixer.freeze_unrouted_experts`). Needs ``mixture.num_experts`` >= the number of tasks.
2. soft (``output_dir/soft``): the hard stage's experts, now frozen (``loramixer.soft_trains_experts``
   trains them too), and the router trained with dense softmax fusion (or the straight-through
   top-k, ``router.straight_through``) plus the specialization balance loss (``router.sbl_*``).
   ``loramixer.init_from`` starts here from an earlier run's hard stage.
3. inference: the soft stage's saved mixture (``output_dir/soft/mixture``) routes with sparse top-K
   (``router.k``, 3) in eval mode; the soft stage's final evaluation, and ``lomix eval``, use it.

Plug-and-play (``loramixer.adapters``): the experts are PEFT LoRA adapters (folders or hub ids,
`lomix.hub.load_peft_experts`), frozen; there is no hard stage, only the router trains.

Each stage is one finetune run with its own folder, config, log and checkpoints; the summary of
both goes to ``output_dir/loramixer.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

import lomix
import lomix.hub
from lomix import CONFIG_NAME
from lomix.checkpoint import read_config
from lomix.errors import ConfigError
from lomix.methods.loramixer.config import LoramixerConfig
from lomix.methods.loramixer.library import freeze_experts, serial_targets, set_router
from lomix.recipes import finetune
from lomix.recipes.config import FinetuneConfig, recipe_main
from lomix.recipes.data import TaskSet


def hard_mixture(path: str | Path) -> Path:
    """The mixture folder of a finished hard stage (``loramixer.init_from``), checked to be one."""
    path = Path(path)
    folder = next((f for f in (path / "mixture", path) if (f / CONFIG_NAME).is_file()), None)
    if folder is None:
        raise ConfigError(
            "loramixer.init_from", f"{path} holds no lomix mixture (neither {path / 'mixture'} nor itself)"
        )
    router = read_config(folder).router
    if router.name != "loramixer":
        raise ConfigError("loramixer.init_from", f"{folder} has a {router.name!r} router, not a loramixer hard stage")
    return folder


def stage_config(cfg: FinetuneConfig, stage: str, steps: int | None, out: Path, **eval_fields) -> FinetuneConfig:
    """``cfg`` for one stage: the router in ``stage``, its steps, its own folder and evaluation settings."""
    mixture = dataclasses.replace(cfg.mixture, router=dataclasses.replace(cfg.mixture.router, stage=stage))
    train = dataclasses.replace(cfg.train, max_steps=steps or cfg.train.max_steps)
    return dataclasses.replace(
        cfg,
        mixture=mixture,
        train=train,
        eval=dataclasses.replace(cfg.eval, **eval_fields),
        output_dir=str(out),
    )


def _set_mixture(cfg: FinetuneConfig, mixture) -> None:
    cfg.mixture = mixture


def build_hard(model: nn.Module, cfg: FinetuneConfig, tasks: TaskSet, data_tasks: list[str]) -> None:
    """Stage 1: a fresh mixture on the serial projections, expert j for task j."""
    if len(tasks.names) > cfg.mixture.num_experts:
        raise ConfigError(
            "mixture.num_experts",
            f"is {cfg.mixture.num_experts}, but the hard stage gives each of the {len(tasks.names)} training "
            f"tasks ({', '.join(tasks.names)}) its own expert; set it to at least {len(tasks.names)}",
        )
    if cfg.loramixer.targets == "serial":
        _set_mixture(cfg, dataclasses.replace(cfg.mixture, target_modules=serial_targets(model)))
    lomix.inject(model, cfg.mixture)
    # Label routing never reads the router weight: freeze it, so the optimizer and DDP (unused
    # parameters) do not see it. The soft stage loads the mixture trainable again.
    for _, layer in lomix.mixture_layers(model):
        layer.router.requires_grad_(False)


def soft_builder(source: Path | list[str]):
    """Stage 2: the hard stage's mixture (a folder) or PEFT adapters (a list), router in the soft stage."""

    def build(model: nn.Module, cfg: FinetuneConfig, tasks: TaskSet, data_tasks: list[str]) -> None:
        router = dict(vars(cfg.mixture.router))  # its dataclass fields
        if isinstance(source, list):
            lomix.hub.load_peft_experts(
                model, source, router=cfg.router, balance=cfg.mixture.balance, kernel=cfg.mixture.kernel
            )
        else:
            lomix.load(model, source, trainable=True)
            set_router(model, **router)
            if not cfg.loramixer.soft_trains_experts:
                freeze_experts(model)
        _set_mixture(cfg, model.lomix_state.config)

    return build


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """The stages; returns {"hard": ..., "soft": ...} with each stage's finetune result (hard: None
    in plug-and-play mode)."""
    if cfg.router.name != "loramixer":
        raise ConfigError("router.name", f"lomix loramixer needs the loramixer router, got {cfg.router.name!r}")
    if cfg.resume_from is not None:
        raise ConfigError(
            "resume_from",
            "lomix loramixer runs whole stages and does not resume; after a finished hard stage, rerun the soft "
            "stage alone with loramixer.init_from=OUTPUT_DIR/hard",
        )
    out = Path(cfg.output_dir)
    plan = cfg.loramixer
    results: dict[str, Any] = {"hard": None}
    if plan.adapters:
        source: Path | list[str] = list(plan.adapters)
        soft_eval = {}
    elif plan.init_from:
        source = hard_mixture(plan.init_from)
        soft_eval = {"before_training": False}
    else:
        hard = stage_config(cfg, "hard", plan.hard_steps, out / "hard")
        results["hard"] = finetune.run(hard, build=build_hard)
        source = out / "hard" / "mixture"
        soft_eval = {"before_training": False}  # the base model was evaluated by the hard stage
    soft = stage_config(cfg, "soft", plan.soft_steps, out / "soft", **soft_eval)
    results["soft"] = finetune.run(soft, build=soft_builder(source))
    summary = {
        stage: None if result is None else {k: result[k] for k in ("before", "after")} | {"log": result["records"]}
        for stage, result in results.items()
    }
    summary["mixture"] = str(out / "soft" / "mixture")
    (out / "loramixer.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe_main(
        run,
        argv,
        doc=__doc__,
        config="a YAML config with the loramixer router (recipes/configs/loramixer.yaml)",
        example="loramixer.hard_steps=20 router.k=2",
    )


if __name__ == "__main__":
    main()


__all__ = ["LoramixerConfig", "build_hard", "run", "soft_builder", "stage_config"]
