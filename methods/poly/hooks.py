"""Poly/MHR's training hooks: which task id a task name gets, and few-shot starts.

Task routers (``poly``, ``mhr``) keep one routing row per task and save the task NAMES with the
mixture (``router.tasks``). The finetune recipe fills them from the training data (sorted names);
task ids then follow the router's rows, here and in ``lomix eval``, so a reloaded mixture routes
each task name to the row it was trained with.

Few-shot adaptation starts from a finished run (the ``fewshot`` section, METHODS.md section 1):

- ``mhr_z``: the run's experts and routing, a fresh routing row for each new task; only the routing
  rows of this run's tasks train (Poly-z / MHR-z).
- ``mhr_mu``: the mean of the skills as one LoRA per layer (uniform routing), fine-tuned.
- ``continue``: plain continued training of everything (experts and routers); new tasks get fresh rows.

    lomix train recipes/configs/mhr_multitask.yaml output_dir=runs/mhr
    lomix train recipes/configs/mhr_fewshot.yaml fewshot.init_from=runs/mhr fewshot.method=mhr_mu
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

import lomix
from lomix import CONFIG_NAME
from lomix.checkpoint import read_config
from lomix.errors import ConfigError
from lomix.methods.poly.config import FewshotConfig
from lomix.methods.poly.router import PolyRouterConfig
from lomix.recipes.config import FinetuneConfig
from lomix.recipes.data import TaskSet
from lomix.recipes.evaluation import mixture_task_set
from lomix.recipes.hooks import TrainingHooks

METHODS = ("mhr_z", "mhr_mu", "continue")


def source_mixture(cfg: FewshotConfig) -> Path:
    """The mixture folder ``fewshot.init_from`` names (a run folder's ``mixture/`` or the folder itself)."""
    path = Path(cfg.init_from)
    for folder in (path / "mixture", path):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise ConfigError(
        "fewshot.init_from",
        f"{path} holds no lomix mixture (neither {path / 'mixture' / CONFIG_NAME} nor {path / CONFIG_NAME}); "
        "give a finished run folder or a mixture folder",
    )


def _task_router(router) -> bool:
    return isinstance(router, PolyRouterConfig)


def _with_names(tasks: TaskSet, names: list[str]) -> TaskSet:
    return TaskSet(list(names), {n: tasks.descriptions.get(n, n) for n in names})


def resolve_tasks(cfg: FinetuneConfig, tasks: TaskSet) -> TaskSet:
    """The run's task ids: for a task router, its rows in order; fills ``router.tasks`` of a fresh one.

    ``tasks`` holds the training data's tasks. A fresh poly/mhr router with no ``tasks`` gets
    them; one that lists tasks must list every training task. A few-shot start keeps its
    mixture's tasks in place and appends the new ones.
    """
    if cfg.fewshot.init_from is not None:
        source = read_config(source_mixture(cfg.fewshot))
        if cfg.fewshot.method == "mhr_mu" or not _task_router(source.router):
            if cfg.fewshot.method == "mhr_z":
                raise ConfigError(
                    "fewshot.method",
                    f"mhr_z trains task routing rows, but the mixture in {cfg.fewshot.init_from} has a "
                    f"{source.router.name!r} router; use mhr_mu or continue, or start from a poly/mhr run",
                )
            return tasks
        known = list(source.router.tasks)
        if source.router.n_tasks and not known:
            raise ConfigError(
                "fewshot.init_from", f"the {source.router.name} router in {cfg.fewshot.init_from} has unnamed task rows"
            )
        return _with_names(tasks, known + [n for n in tasks.names if n not in known])
    router = cfg.mixture.router
    if not _task_router(router):
        return tasks
    if router.tasks:
        missing = [n for n in tasks.names if n not in router.tasks]
        if missing:
            raise ConfigError(
                "router.tasks",
                f"lacks the training tasks {', '.join(missing)}; it lists {', '.join(router.tasks)}. Leave it "
                "empty to take the tasks from the data",
            )
        return _with_names(tasks, router.tasks)
    if router.n_tasks not in (0, len(tasks.names)):
        raise ConfigError(
            "router.n_tasks",
            f"is {router.n_tasks}, but the training data has {len(tasks.names)} tasks ({', '.join(tasks.names)}); "
            "leave it 0 to take the tasks from the data",
        )
    _set_mixture(cfg, dataclasses.replace(cfg.mixture, router=dataclasses.replace(router, tasks=list(tasks.names))))
    return tasks


def _set_mixture(cfg: FinetuneConfig, mixture) -> None:
    cfg.mixture = mixture


def build_mixture(model: nn.Module, cfg: FinetuneConfig, tasks: TaskSet, data_tasks: list[str]) -> bool:
    """Set up the few-shot start (True), or leave the build to the recipe (False, no ``fewshot.init_from``);
    ``cfg.mixture`` then says what was built.

    ``tasks`` is `resolve_tasks`'s result, ``data_tasks`` the task names of the training data.
    """
    if cfg.fewshot.init_from is None:
        return False
    lomix.load(model, source_mixture(cfg.fewshot), trainable=True)
    method = cfg.fewshot.method
    if method == "mhr_mu":
        lomix.average_skills(model)
    elif _task_router(model.lomix_state.config.router):
        lomix.add_tasks(model, tasks.names)
        if method == "mhr_z":
            lomix.train_only_task_rows(model, [tasks.id(n) for n in data_tasks])
    _set_mixture(cfg, model.lomix_state.config)
    return True


def describe(cfg: FinetuneConfig) -> str:
    return f"; few-shot {cfg.fewshot.method} from {cfg.fewshot.init_from}" if cfg.fewshot.init_from else ""


HOOKS = TrainingHooks(resolve_tasks=resolve_tasks, build=build_mixture, describe=describe)

__all__ = [
    "HOOKS",
    "METHODS",
    "FewshotConfig",
    "build_mixture",
    "mixture_task_set",
    "resolve_tasks",
    "source_mixture",
]
