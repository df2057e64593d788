"""Poly and MHR: task-level routing that mixes the experts' PARAMETERS (METHODS.md section 1).

One row of router logits per TASK, independent of the tokens: Z (T, h, S) for T tasks, h heads and
S skills (the layer's experts). For a sequence of task t,

    training: z = RelaxedBernoulli(temperature, logits=Z[t]).rsample()   (Gumbel-sigmoid)
    eval:     z = sigmoid(Z[t])
    w[q, s] = z[q, s] / (sum_s z[q, s] + 1e-12)                          (per head q)

and the layer mixes the experts' slices: head q owns the q-th slice of d_in in A and of d_out in B
(`lomix.kernels.mixture_lora_mixed`). ``poly`` is one head; ``mhr`` is h > 1 heads (Multi-Head
Routing, Caccia et al.). Both match PEFT's poly tuner (``PolyConfig(n_splits=h)``) given the same
parameters and a LoRA scale of 1/r.

Task ids come from the batch's `RoutingContext` (``model(..., task_ids=...)`` or
``lomix.routing_context(model, task_ids=...)`` for generation). The task NAMES of the rows are part
of the config (``tasks``), so a saved mixture says which row is which task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from lomix.errors import ConfigError, RoutingError
from lomix.routers.base import Router, RouterConfig, register_router
from lomix.routing import ParameterMixing, RoutingContext

EPS = 1e-12  # PEFT's and mttl's constant in the per-head normalisation


@dataclass
class PolyRouterConfig(RouterConfig):
    """Poly: one routing row per task, mixing all skills of a layer as one LoRA (one head)."""

    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "task names, one routing row each in this order (task id i = row i); the recipes fill it from "
            "the training data, and it is saved with the mixture so a reloaded mixture routes a task name to the "
            "same row"
        },
    )
    n_tasks: int = field(
        default=0,
        metadata={"help": "number of routing rows; 0: len(tasks). Set it alone to route by bare task ids"},
    )
    gumbel: bool = field(
        default=True,
        metadata={
            "help": "training draws relaxed-Bernoulli (Gumbel-sigmoid) noise, as in Poly/MHR; false: plain sigmoid "
            "in training too (the T0 runs of the MHR paper). Eval is always the plain sigmoid"
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "temperature of the relaxed Bernoulli (paper: 1)"})
    init_range: float = field(default=1e-3, metadata={"help": "router logits start as U(-init_range, init_range)"})
    unknown_task: Literal["error", "uniform"] = field(
        default="error",
        metadata={
            "help": "a task id with no row (or no task ids at all): error, or uniform (every skill weighted 1/S: "
            "the MHR-mu average)"
        },
    )

    @property
    def heads(self) -> int:
        return 1

    @property
    def rows(self) -> int:
        return self.n_tasks or len(self.tasks)

    @property
    def task_rows(self) -> list[str]:
        return list(self.tasks)

    def validate(self, num_experts: int) -> None:
        if self.n_tasks < 0:
            raise ConfigError("router.n_tasks", f"must be >= 0, got {self.n_tasks}")
        if self.tasks and self.n_tasks not in (0, len(self.tasks)):
            raise ConfigError(
                "router.n_tasks", f"is {self.n_tasks} but router.tasks names {len(self.tasks)} tasks; set one of them"
            )
        if len(set(self.tasks)) != len(self.tasks):
            repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            raise ConfigError("router.tasks", f"names a task twice: {', '.join(repeated)}")
        if not self.temperature > 0:
            raise ConfigError("router.temperature", f"must be > 0, got {self.temperature}")
        if self.init_range < 0:
            raise ConfigError("router.init_range", f"must be >= 0, got {self.init_range}")

    def task_id(self, name: str) -> int:
        try:
            return self.tasks.index(name)
        except ValueError:
            known = ", ".join(self.tasks) or "(unnamed rows)"
            raise RoutingError(f"router {self.name}: no routing row for task {name!r}; its tasks: {known}") from None


@dataclass
class MHRRouterConfig(PolyRouterConfig):
    """MHR: Poly with h heads; head q mixes the skills' q-th slices of d_in (A) and d_out (B)."""

    n_heads: int = field(
        default=8, metadata={"help": "heads h (PEFT's n_splits); every wrapped layer's d_in and d_out must divide by h"}
    )

    @property
    def heads(self) -> int:
        return self.n_heads

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.n_heads < 1:
            raise ConfigError("router.n_heads", f"must be >= 1, got {self.n_heads}")


class PolyRouter(Router):
    """Routing logits ``logits`` (T, h, S); returns `ParameterMixing` weights (batch, h, S).

    The optimizer should give it a much larger learning rate than the experts (paper: 0.1 vs
    1e-3): `lomix.parameter_groups` uses ``default_lr`` when no router learning rate is given.
    """

    default_lr: ClassVar[float | None] = 0.1

    def __init__(self, config: PolyRouterConfig, d_in: int, num_experts: int):
        super().__init__(config, d_in, num_experts)
        if config.rows < 1:
            raise ConfigError(
                "router.n_tasks",
                f"{self.name} needs one routing row per task: set router.tasks (names) or router.n_tasks "
                "(the recipes fill router.tasks from the training data)",
            )
        self.layer_name = ""
        self.logits = nn.Parameter(torch.empty(config.rows, config.heads, num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logits.uniform_(-self.config.init_range, self.config.init_range)

    @property
    def num_tasks(self) -> int:
        return self.logits.shape[0]

    @property
    def num_heads(self) -> int:
        return self.logits.shape[1]

    def check_layer(self, name: str, d_in: int, d_out: int) -> None:
        """Every head owns an equal slice of d_in and d_out: both must divide by h."""
        self.layer_name = name
        h = self.num_heads
        if d_in % h or d_out % h:
            raise ConfigError(
                "router.n_heads",
                f"{h} heads do not divide layer {name or '?'} (d_in={d_in}, d_out={d_out}); each head owns "
                f"d/h features of the input and the output, so choose a common divisor of every targeted layer's "
                f"sizes or leave this layer out (exclude_modules), e.g. grouped-query k_proj/v_proj",
            )

    def init_experts(self, experts: nn.Module) -> None:
        """A per head like PEFT/mttl: kaiming-uniform over each head's fan-in d_in / h."""
        bound = 1.0 / math.sqrt(experts.d_in // self.num_heads)
        with torch.no_grad():
            experts.A.uniform_(-bound, bound)

    def mixing_weights(self, task_ids: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """(batch, h, S) weights for ``task_ids`` (batch,): noisy in training when ``gumbel``, sigmoid in eval."""
        device = self.logits.device
        if task_ids is None:
            if self.config.unknown_task != "uniform" or batch is None:
                raise RoutingError(
                    f"router {self.name} ({self.layer_name or 'layer'}) routes by task and got no task ids; pass "
                    "task_ids=... to the model's forward, or wrap generate in lomix.routing_context(model, "
                    "task_ids=...) (or set router.unknown_task=uniform)"
                )
            return self.logits.new_full((batch, self.num_heads, self.num_experts), 1.0 / self.num_experts)
        task_ids = task_ids.to(device=device, dtype=torch.long)
        known = (task_ids >= 0) & (task_ids < self.num_tasks)
        if not bool(known.all()):
            if self.config.unknown_task != "uniform":
                bad = sorted({int(t) for t in task_ids[~known]})
                names = f" ({', '.join(self.config.tasks)})" if self.config.tasks else ""
                raise RoutingError(
                    f"router {self.name} ({self.layer_name or 'layer'}): task id(s) {bad} have no routing row; it "
                    f"knows task ids 0..{self.num_tasks - 1}{names}. Add rows for new tasks (lomix.add_tasks, or "
                    "the recipes' fewshot section) or set router.unknown_task=uniform"
                )
        logits = self.logits[task_ids.clamp(0, self.num_tasks - 1)]
        if self.training and self.config.gumbel:
            z = RelaxedBernoulli(temperature=self.config.temperature, logits=logits).rsample()
        else:
            z = torch.sigmoid(logits)
        weights = z / (z.sum(dim=-1, keepdim=True) + EPS)
        if not bool(known.all()):
            weights = torch.where(known[:, None, None], weights, torch.full_like(weights, 1.0 / self.num_experts))
        return weights

    def forward(self, x: torch.Tensor, context: RoutingContext) -> ParameterMixing:
        batch = x.shape[0]
        context = context.for_batch(batch)
        return ParameterMixing(weights=self.mixing_weights(context.task_ids, batch))

    def extra_repr(self) -> str:
        return f"{self.name}, tasks={self.num_tasks}, heads={self.num_heads}, skills={self.num_experts}"


@register_router("poly", PolyRouterConfig)
class Poly(PolyRouter):
    pass


@register_router("mhr", MHRRouterConfig)
class MHR(PolyRouter):
    pass
