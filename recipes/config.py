"""The recipes' typed configuration: YAML file + ``key=value`` overrides -> `FinetuneConfig`.

Every field carries its help text in ``field(metadata={"help": ...})``; the CLI prints those as the
``lomix train --help`` reference, so the docstrings here ARE the documentation. Validation happens
entirely here, before any model or data is loaded: an unknown key lists the valid ones, a wrong
type says what was expected, an impossible value names its dotted key (``train.lr``).

    cfg = load_config("recipes/configs/quickstart.yaml", ["router.k=3", "train.lr=2e-4"])
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lomix import methods
from lomix.config import MixtureConfig
from lomix.errors import ConfigError
from lomix.routers import RouterConfig, available_routers, router_class, router_config_from_dict
from lomix.typed import _type_name, coerce, field_docs, from_dict, to_dict, unknown_key_message


@dataclass
class ModelConfig:
    """The frozen base model and its tokenizer."""

    name_or_path: str = field(
        metadata={
            "path": True,
            "help": "the base model: a hub id, a local folder, or 'pypi:<package>' for a model shipped inside an "
            "installed PyPI package (its folder is located without importing it)",
        }
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "a GGUF file inside name_or_path; it is dequantized once (needs the gguf package) and cached as "
            "safetensors under $LOMIX_CACHE/models (default ~/.cache/lomix/models)"
        },
    )
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit) of a hub id"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "dtype of the frozen base weights (keep float32 on CPU: bf16 is ~40x slower there)"},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "run modelling code shipped with the model (off: only transformers' own code runs)"},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers attention implementation (eager, sdpa, ...); null: its default"}
    )
    # Quantized base (QLoRA-style): mapped onto transformers' BitsAndBytesConfig by lomix.recipes.quantization.
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "quantize the base's linear layers to 4 bits with bitsandbytes while loading (needs bitsandbytes; "
            "a GGUF model is quantized from its cached safetensors copy)"
        },
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "quantize the base's linear layers to int8 (LLM.int8()) with bitsandbytes"}
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 (normal float, QLoRA) or fp4"}
    )
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] | None = field(
        default=None,
        metadata={"help": "dtype the 4-bit layers multiply in; null: model.dtype (keep float32 on CPU)"},
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "quantize the 4-bit blocks' scales too (~0.4 bits per weight less)"}
    )
    llm_int8_threshold: float = field(
        default=6.0,
        metadata={"help": "8-bit: input features whose magnitude exceeds this are multiplied in fp16 (outliers)"},
    )
    llm_int8_skip_modules: list[str] | None = field(
        default=None,
        metadata={"help": "modules left unquantized (names as in transformers); null: transformers' choice (lm_head)"},
    )

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path", "must name a model (hub id, folder or pypi:<package>)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("model.load_in_8bit", "cannot be combined with model.load_in_4bit; choose one of them")
        if self.llm_int8_threshold < 0:
            raise ConfigError("model.llm_int8_threshold", f"must be >= 0, got {self.llm_int8_threshold}")

    @property
    def quantized(self) -> bool:
        """True when the base loads in 4 or 8 bits."""
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class ColumnsConfig:
    """Which column of the data holds each field of an example (task, input, choices, label, target)."""

    input: str = field(default="input", metadata={"help": "column with the prompt text (required in the data)"})
    target: str = field(default="target", metadata={"help": "column with the reference answer of generative examples"})
    choices: str = field(
        default="choices",
        metadata={"help": "column with the candidate answers (a list, or a JSON list in CSV) of multiple-choice rows"},
    )
    label: str = field(default="label", metadata={"help": "column with the index of the correct choice"})
    task: str = field(
        default="task", metadata={"help": "column with the task name; without it every row belongs to data.task"}
    )
    description: str = field(
        default="description",
        metadata={"help": "optional column with a free-text description of the row's task (routers may read it)"},
    )


@dataclass
class BigBenchConfig:
    """BIG-bench tasks built locally from the `bigbench` sdist on PyPI (used when data.train is 'bigbench')."""

    tasks: list[str] = field(
        default_factory=lambda: ["date_understanding", "sports_understanding"],
        metadata={"help": "task folders under bigbench/benchmark_tasks, e.g. date_understanding, color/hex"},
    )
    version: str = field(default="1.0.0", metadata={"help": "version of the bigbench sdist to download"})
    sdist: str | None = field(
        default=None,
        metadata={
            "path": True,
            "help": "path of an already downloaded bigbench-<version>.tar.gz; null: download it into the cache",
        },
    )
    train_per_task: int = field(default=300, metadata={"help": "training examples per task (at most)"})
    test_per_task: int = field(default=40, metadata={"help": "test examples per task (taken first, at most)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the fixed train/test split and the choice order"})
    task_prefix: bool = field(
        default=True, metadata={"help": "prepend the task's own instruction (task_prefix in task.json) to each input"}
    )
    append_choices: bool = field(
        default=True,
        metadata={"help": "list the choices after the input for tasks whose task.json asks for it"},
    )

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("data.bigbench.tasks", "must list at least one task")
        for name in ("train_per_task", "test_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.bigbench.{name}", f"must be >= 1, got {getattr(self, name)}")
        for task in self.tasks:
            if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*", task):
                raise ConfigError("data.bigbench.tasks", f"{task!r} is not a task folder name like color/hex")


@dataclass
class DataConfig:
    """Training and test data, normalised into examples (task, input, choices, label, target)."""

    train: str = field(
        metadata={
            "path": True,
            "keywords": ("bigbench",),  # a name with a meaning of its own, never made a path
            "help": "training data: a local data file (JSON, JSONL, CSV, TSV, Parquet or IPC: docs/own_data.md), "
            "a hub dataset id, or 'bigbench' "
            "(built from the PyPI sdist into $LOMIX_CACHE/bigbench, see data.bigbench)",
        }
    )
    test: str | None = field(
        default=None,
        metadata={
            "path": True,
            "help": "test data (same forms); null: the hub dataset's test_split, bigbench's own test split, "
            "or no test set for a local file",
        },
    )
    format: Literal["auto", "columns", "messages", "prompt_completion", "alpaca", "text"] = field(
        default="auto",
        metadata={
            "help": "row format: columns (data.columns: input + target, or choices + label), messages (a 'messages' "
            "list of {role, content}; loss on assistant turns only), prompt_completion ('prompt' + 'completion', "
            "TRL's names), alpaca ('instruction' + optional 'input' + 'output'), text ('text': LM loss on every "
            "token); auto: recognised from the first row's columns"
        },
    )
    validation: Literal["auto"] | None = field(
        default=None,
        metadata={
            "help": "auto: when there is no test data (no data.test, or a hub dataset without data.test_split), "
            "hold out data.validation_fraction of each task's training rows (seeded) as the test set; null: "
            "test only on data.test or the hub's test split"
        },
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "share of each task's training rows held out by data.validation=auto"}
    )
    validation_seed: int = field(default=0, metadata={"help": "seed of the held-out split of data.validation=auto"})
    subset: str | None = field(default=None, metadata={"help": "configuration name of a hub dataset"})
    train_split: str = field(default="train", metadata={"help": "split of a hub dataset used for training"})
    test_split: str = field(default="test", metadata={"help": "split of a hub dataset used for testing"})
    columns: ColumnsConfig = field(default_factory=ColumnsConfig, metadata={"help": "column mapping"})
    task: str = field(default="default", metadata={"help": "task name of rows when the data has no task column"})
    task_descriptions: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "task name -> description passed to routers (overrides descriptions found in the data)"},
    )
    bigbench: BigBenchConfig = field(default_factory=BigBenchConfig, metadata={"help": "BIG-bench builder"})
    prompt_template: str = field(
        default="{input}",
        metadata={"help": "prompt text; may use {input}, {task} and {choices} (the choices, comma-separated)"},
    )
    chat_template: bool = field(
        default=True, metadata={"help": "wrap prompt and answer in the tokenizer's chat template when it has one"}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "system message for the chat template; null: the template's default, '' an empty one"},
    )
    max_length: int = field(
        default=256, metadata={"help": "tokens per example; prompts are cut from the left to fit the answer"}
    )
    max_truncated: float = field(
        default=0.25,
        metadata={
            "help": "stop with an error when data.max_length cuts more than this share of the training examples "
            "(the count is logged whenever any is cut; 1.0: never stop)"
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "text rows: concatenate each task's texts (EOS between) and cut them into data.max_length "
            "blocks instead of cutting each text at data.max_length"
        },
    )

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("data.train", "must name the training data")
        if self.max_length < 8:
            raise ConfigError("data.max_length", f"must be >= 8, got {self.max_length}")
        if not 0 <= self.max_truncated <= 1:
            raise ConfigError("data.max_truncated", f"must be a share between 0 and 1, got {self.max_truncated}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(
                "data.validation_fraction", f"must be a share strictly between 0 and 1, got {self.validation_fraction}"
            )
        try:
            self.prompt_template.format(input="", task="", choices="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                "data.prompt_template", f"may only use {{input}}, {{task}} and {{choices}} ({exc!r})"
            ) from None


@dataclass
class TrainConfig:
    """The training loop (on accelerate; launch it with `accelerate launch` for several processes)."""

    max_steps: int = field(default=100, metadata={"help": "optimizer steps; the learning-rate schedule spans them"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch on each process"})
    grad_accum: int = field(
        default=1,
        metadata={"help": "micro-batches per optimizer step; global batch = batch_size x grad_accum x processes"},
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of the experts"})
    router_lr: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate of the routers; null: the router's own default_lr if it has one, else lr"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the experts"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up from 0 to the peak rate"})
    schedule: Literal["linear", "cosine", "constant"] = field(
        default="linear", metadata={"help": "decay after warm-up: linear or cosine to 0, or constant"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 disables)"})
    on_nonfinite: Literal["stop", "skip_step"] = field(
        default="stop",
        metadata={
            "help": "a step whose loss or gradient norm is NaN or infinite: stop with an error naming the last good "
            "checkpoint, or skip_step (no update; the step still counts)"
        },
    )
    group_by_length: int = field(
        default=0,
        metadata={
            "help": "sort each run of N global batches by length before cutting it into batches: less padding, "
            "rows of a batch of similar length (0: plain shuffle)"
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward (less memory, ~30% slower)"}
    )
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = field(
        default="adamw",
        metadata={
            "help": "adamw (torch), or bitsandbytes' adamw8bit (8-bit states for tensors of >= 4096 values), "
            "paged_adamw / paged_adamw8bit (states paged to CPU memory on CUDA; on a CPU bitsandbytes warns and "
            "runs them unpaged)"
        },
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "accelerate autocast precision (keep 'no' on CPU)"}
    )
    log_every: int = field(default=1, metadata={"help": "log metrics every N steps"})
    eval_every: int = field(default=0, metadata={"help": "held-out loss on the test set every N steps (0: never)"})
    save_every: int = field(
        default=0, metadata={"help": "write a resumable checkpoint every N steps (0: only the final save)"}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints (>= 1)"})
    trackers: list[str] = field(
        default_factory=list,
        metadata={"help": "accelerate trackers to log to, e.g. [tensorboard] (written under output_dir/logs)"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar with loss, LR and tokens/s"})
    routing_stats: bool = field(
        default=True,
        metadata={
            "help": "add each layer's routing statistics (lomix.stats: effective support of the gates, router "
            "entropy, expert load) over the training steps since the last record to every log record (main process)"
        },
    )

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "group_by_length"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps > self.max_steps:
            raise ConfigError("train.warmup_steps", f"must be <= train.max_steps={self.max_steps}")
        if not self.lr > 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if self.router_lr is not None and not self.router_lr > 0:
            raise ConfigError("train.router_lr", f"must be > 0, got {self.router_lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            name = "weight_decay" if self.weight_decay < 0 else "max_grad_norm"
            raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        known = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
        for tracker in self.trackers:
            if tracker not in known:
                raise ConfigError(
                    "train.trackers", f"unknown tracker {tracker!r}; accelerate knows: {', '.join(known)}"
                )


@dataclass
class EvalConfig:
    """Evaluation: accuracy of multiple-choice tasks, exact match of generative ones."""

    before_training: bool = field(
        default=False, metadata={"help": "also evaluate the base model (mixture off) before training"}
    )
    after_training: bool = field(default=True, metadata={"help": "evaluate the trained mixture after training"})
    max_examples_per_task: int | None = field(
        default=None, metadata={"help": "evaluate at most N test examples per task (null: all)"}
    )
    accuracy_metric: str = field(
        default="accuracy",
        metadata={
            "help": "evaluate metric for multiple choice: a name lomix ships (accuracy), a metric folder, or a "
            "bare hub name (needs the network)",
        },
    )
    exact_match_metric: str = field(
        default="exact_match", metadata={"help": "evaluate metric for generative tasks (same forms)"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "generation budget of generative tasks"})
    reuse_prompt_cache: bool = field(
        default=True,
        metadata={
            "help": "score the choices from the prompt's KV cache (one prompt pass per example); routers that route "
            "whole sequences (needs_whole_sequences) always score full sequences"
        },
    )
    batch_size: int = field(
        default=8, metadata={"help": "examples per batch when scoring choices and computing the held-out loss"}
    )

    reroute_steps: int = field(
        default=0,
        metadata={
            "help": "test-time rerouting: Adam steps on per-sequence router-logit offsets, fitted to each prompt's "
            "own next-token loss before it is scored or answered (0: off; routers that produce logits)"
        },
    )
    reroute_every: int = field(
        default=0, metadata={"help": "re-fit the offsets every N generated tokens (0: at the prompt only)"}
    )
    reroute_lr: float = field(default=0.1, metadata={"help": "learning rate of the rerouting offsets"})

    def __post_init__(self) -> None:
        for name in ("reroute_steps", "reroute_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not self.reroute_lr > 0:
            raise ConfigError("eval.reroute_lr", f"must be > 0, got {self.reroute_lr}")
        if self.max_examples_per_task is not None and self.max_examples_per_task < 1:
            raise ConfigError("eval.max_examples_per_task", f"must be >= 1 or null, got {self.max_examples_per_task}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclass
class _RunConfig:
    """A fine-tuning run: `lomix train CONFIG.yaml [key=value ...]`.

    `FinetuneConfig` is this plus one field per method section (`method_sections()`).
    """

    model: ModelConfig = field(metadata={"help": "the frozen base model"})
    data: DataConfig = field(metadata={"help": "training and test data"})
    mixture: MixtureConfig = field(
        default_factory=MixtureConfig,
        metadata={"help": "the mixture of LoRA experts (lomix.MixtureConfig; its router is the 'router' section)"},
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the training loop"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order, dropout and routing noise"})
    output_dir: str = field(
        default="runs/lomix", metadata={"path": "always", "help": "run folder: config, logs, checkpoints, mixture"}
    )
    resume_from: str | None = field(
        default=None,
        metadata={
            "path": True,
            "help": "a run folder (its newest checkpoint) or a checkpoint folder to continue from exactly",
        },
    )

    @property
    def router(self) -> RouterConfig:
        """The router: it lives in ``mixture.router`` only; YAML spells it as the top-level ``router`` section."""
        return self.mixture.router

    def to_dict(self) -> dict[str, Any]:
        data = {}
        for f in _ordered_fields(type(self)):
            data[f.name] = to_dict(getattr(self, f.name))
            if f.name == "mixture":  # the router has its own top-level section, right after the mixture
                data["router"] = data["mixture"].pop("router")
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


_RUN_TAIL = ("seed", "output_dir", "resume_from")  # after the method sections in a config file


def _ordered_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a run config in file order: the generic sections, the method sections, the run's own keys."""
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in _RUN_TAIL] + [f for f in fields if f.name in _RUN_TAIL]


def method_sections() -> tuple:
    """Every method's sections of the run config (``SECTIONS`` of each `lomix.methods.<method>.config`)."""
    return tuple(s for module in methods.modules("config") for s in module.SECTIONS)


def _with_method_sections(base: type) -> type:
    sections = [
        (s.name, s.config, field(default_factory=s.config, metadata={"help": s.help})) for s in method_sections()
    ]
    cls = dataclasses.make_dataclass("FinetuneConfig", sections, bases=(base,))
    cls.__module__ = __name__
    cls.__doc__ = (
        "A fine-tuning run: `lomix train CONFIG.yaml [key=value ...]` (the generic sections and every method's)."
    )
    return cls


FinetuneConfig = _with_method_sections(_RunConfig)


# ----------------------------------------------------------------------------------------------
# YAML with numbers as a person writes them: PyYAML (YAML 1.1) reads 2e-4 as a string.


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    """Writes what `_Loader` reads back: a string such as '1e5' is quoted, not left to turn into a float."""


_FLOAT = (
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(*_FLOAT)
_Dumper.add_implicit_resolver(*_FLOAT)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    # PyYAML's constructors raise plain ValueError / IndexError / ... for a malformed tagged scalar
    # (`!!float x`, `!!float` alone): bad YAML all the same.
    except (yaml.YAMLError, ValueError, TypeError, IndexError, OverflowError) as exc:
        raise ConfigError(source, f"not valid YAML ({yaml_problem(exc)})") from None


def yaml_problem(exc: Exception) -> str:
    """PyYAML's error on one line: 'line L, column C: problem' (its own text spans several lines
    and quotes the snippet with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = " ".join((f"{context}; {problem}" if context else problem).split())
    if isinstance(exc, yaml.constructor.ConstructorError):
        text += " (lomix configs are plain YAML: no tags)"
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark is not None else text


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path), f"not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start]:#04x}); save it as UTF-8"
        ) from None
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys from ``key=value`` strings; values are parsed as YAML (``[a, b]``, ``null``, ``2e-4``).

    A value for a field that takes text is the raw text whenever its YAML reading is not what the
    field wants (``data.prompt_template={input}`` is a flow mapping in YAML, ``Q: {input} A:`` is not
    valid YAML): shells make quoting inside the value awkward, and the field can only mean the text.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(item, "an override must look like section.key=value (e.g. train.lr=2e-4)")
        value = _override_value(key, raw, item, data)
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    ".".join(parts[: depth + 1]), f"is a value ({child!r}), not a section; cannot set {key}"
                )
            node = child
        node[parts[-1]] = value
    return data


def _override_value(key: str, raw: str, item: str, data: dict[str, Any]) -> Any:
    """The value of ``key=raw``: its YAML reading, or ``raw`` itself for a text field that the
    YAML reading does not fit (see `apply_overrides`)."""
    if not raw.strip():
        return ""
    takes_text = _takes_text(_field_type(key, data))
    try:
        value = parse_yaml(raw, item)
    except ConfigError:
        if takes_text:
            return raw
        raise
    if takes_text and not isinstance(value, str):
        try:
            coerce(_field_type(key, data), value, key)
        except ConfigError:
            return raw  # e.g. {input} read as a mapping, 2024 as a number, for a text field
    return value


def _field_type(key: str, data: dict[str, Any]) -> Any:
    """The declared type of dotted config ``key`` (``data.prompt_template`` -> ``str``), or None when
    the key names no field (the error about that comes later, from validation)."""
    parts = key.split(".")
    if parts[0] == "router":
        section = data.get("router")
        name = section.get("name") if isinstance(section, dict) else None
        try:
            cls: Any = router_class(name if isinstance(name, str) else MixtureConfig().router.name).config_class
        except Exception:  # an unknown router name: validation names it
            return None
        parts = parts[1:]
    else:
        cls = FinetuneConfig
    tp: Any = cls
    for part in parts:
        if get_origin(tp) in (Union, types.UnionType):  # an optional section
            tp = next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if not dataclasses.is_dataclass(tp):
            return None
        hints = get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _takes_text(tp: Any) -> bool:
    """Whether a field of type ``tp`` accepts free text (``str``, ``str | None``)."""
    if tp is str:
        return True
    return get_origin(tp) in (Union, types.UnionType) and str in get_args(tp)


def _prefixed(exc: ConfigError, prefix: str) -> ConfigError:
    message = str(exc).split(": ", 1)[-1]
    name = (
        exc.field
        if exc.field.startswith(("router.", prefix + ".")) or exc.field == "router"
        else f"{prefix}.{exc.field}"
    )
    return ConfigError(name, message)


ROUTER_HELP = "the router: name (one of lomix.available_routers()) plus that router's own fields"


def notice(message: str) -> None:
    """A one-line note on stderr about a value the config resolution chose (stdout stays the YAML)."""
    print(f"lomix: note: {message}", file=sys.stderr, flush=True)


def switch_router(data: dict[str, Any], overrides: list[str]) -> set[str]:
    """Apply an override ``router.name=X`` that names another router than the file's: the file's
    router section is replaced whole (its other keys belonged to the old router), with a notice.

    Returns the dotted mixture keys the file set that the new router may default (the file was
    written for another router, so its values there are not a choice against the new one).
    """
    names = [item.partition("=")[2].strip() for item in overrides if item.partition("=")[0].strip() == "router.name"]
    for item in overrides:  # router={name: X, ...} replaces the section itself
        key, _, raw = item.partition("=")
        value = parse_yaml(raw, item) if key.strip() == "router" and raw.strip() else None
        if isinstance(value, dict) and "name" in value:
            names.append(str(value["name"]))
    section = data.get("router") or {}
    if not names or not isinstance(section, dict):
        return set()
    new = parse_yaml(names[-1], "router.name") if names[-1] else names[-1]
    old = section.get("name", MixtureConfig().router.name)
    if new == old:
        return set()
    dropped = sorted(k for k in section if k != "name")
    if dropped:
        notice(
            f"router.name={new} replaces the {old} router section; dropped {', '.join(f'router.{k}' for k in dropped)}"
        )
    data["router"] = {}
    mixture = data.get("mixture")
    return set(_leaves(mixture, "mixture")) if isinstance(mixture, dict) else set()


def _leaves(tree: dict[str, Any], prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}"


def apply_router_defaults(mixture: dict[str, Any], router: RouterConfig, replaceable: set[str] = frozenset()) -> None:
    """Fill the mixture fields the router needs (`RouterConfig.mixture_defaults`) that the user left
    unset (or set in a file written for another router: ``replaceable``), with a notice each.
    A value the user did set is kept; the router's `validate_mixture` then refuses a conflict."""

    def walk(defaults: dict[str, Any], node: dict[str, Any], prefix: str) -> None:
        for key, value in defaults.items():
            path = f"{prefix}.{key}"
            if isinstance(value, dict):
                child = node.get(key)
                if child is None or not isinstance(child, dict):
                    child = node[key] = {} if child is None else child
                if isinstance(child, dict):
                    walk(value, child, path)
            elif key not in node or (path in replaceable and node[key] != value):
                how = "unset" if key not in node else f"{node[key]!r} in the file"
                node[key] = value
                notice(f"{path}={value!r}: the {router.name} router's default ({how} before)")

    walk(router.mixture_defaults(), mixture, "mixture")


def build_config(data: dict[str, Any], replaceable: set[str] = frozenset()) -> FinetuneConfig:
    """Validate a plain dict (YAML + overrides) into a `FinetuneConfig`; raises `ConfigError` naming the key.

    ``replaceable``: dotted mixture keys whose values the router's defaults may replace (`switch_router`).
    """
    data = dict(data)
    sections = sorted([f.name for f in dataclasses.fields(FinetuneConfig)] + ["router"])
    unknown = sorted(str(key) for key in set(data) - set(sections))  # YAML keys may be numbers or null
    if unknown:
        raise ConfigError(str(unknown[0]), unknown_key_message(unknown[0], sections))
    mixture = data.pop("mixture", None) or {}
    router = data.pop("router", None)
    if not isinstance(mixture, dict):
        raise ConfigError("mixture", f"expected a mapping of fields, got {mixture!r}")
    if "router" in mixture:
        raise ConfigError("mixture.router", "set the router in the top-level 'router' section (router.name, router.k)")
    mixture = copy.deepcopy(mixture)
    if isinstance(router, dict) and "name" not in router:
        router = {"name": MixtureConfig().router.name, **router}  # router.k=3 alone keeps the default router
    if router is not None:
        router_config = router_config_from_dict(router)
        apply_router_defaults(mixture, router_config, replaceable)
        mixture["router"] = router_config
    try:
        mixture_config = from_dict(MixtureConfig, mixture)
    except ConfigError as exc:
        raise _prefixed(exc, "mixture") from None
    data["mixture"] = mixture_config
    return from_dict(FinetuneConfig, data)


def recipe_main(
    run: Callable[[FinetuneConfig], Any], argv: list[str] | None, *, doc: str | None, config: str, example: str
) -> Any:
    """The command line every recipe script shares: ``CONFIG [key=value ...]`` -> ``run(load_config(...))``.

    ``doc``: the script's docstring (its --help text); ``config``: what CONFIG is; ``example``: overrides.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=config)
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    args = parser.parse_args(argv)
    return run(load_config(args.config, args.overrides))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a YAML config, apply ``key=value`` overrides and validate it.

    ``router.name=X`` naming another router than the file's replaces the whole router section (the
    old router's keys are dropped, with a notice); a router's needs on other sections
    (`RouterConfig.mixture_defaults`) fill what the user did not set.
    """
    data = read_yaml(path) if path is not None else {}
    overrides = list(overrides or [])
    replaceable = switch_router(data, overrides)
    data = apply_overrides(data, overrides)
    overridden = {item.partition("=")[0].strip() for item in overrides}
    return build_config(data, replaceable - overridden)


def config_reference() -> str:
    """Every field of a recipe config with its type, default and help: the ``lomix train --help`` text."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        for f in _ordered_fields(cls) if cls is FinetuneConfig else dataclasses.fields(cls):
            if cls is MixtureConfig and f.name == "router":
                continue  # listed as the top-level router section
            name = f"{prefix}{f.name}"
            tp = _type_name(get_type_hints(cls)[f.name])
            nested = _nested_dataclass(cls, f.name)
            if nested is not None:
                lines.append(f"{name}: {f.metadata.get('help', '')}")
                walk(nested, name + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = f" = {f.default!r}"
            elif f.default_factory is not dataclasses.MISSING:
                default = f" = {to_dict(f.default_factory())!r}"
            else:
                default = " (required)"
            lines.append(f"  {name} ({tp}){default}: {f.metadata.get('help', '')}")

    def routers() -> None:
        lines.append(f"  router (RouterConfig) = {MixtureConfig().router.to_dict()!r}: {ROUTER_HELP}")
        for router in available_routers():
            config_class = router_class(router).config_class
            docs = "; ".join(f"{k}: {v}" for k, v in field_docs(config_class).items())
            lines.append(f"      router.name={router}: {docs}")

    walk(FinetuneConfig, "")
    mixture_end = max(i for i, line in enumerate(lines) if line.lstrip().startswith("mixture."))
    tail = lines[mixture_end + 1 :]
    del lines[mixture_end + 1 :]
    routers()
    lines.extend(tail)
    return "\n".join(lines)


def _nested_dataclass(cls: type, name: str) -> type | None:
    tp = get_type_hints(cls)[name]
    if get_origin(tp) in (Union, types.UnionType):  # an optional section (mixture.balance: null = the router's)
        tp = next((a for a in get_args(tp) if a is not type(None)), tp)
    if dataclasses.is_dataclass(tp) and not issubclass(tp, RouterConfig):
        return tp
    return None


__all__ = [
    "BigBenchConfig",
    "ColumnsConfig",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "config_reference",
    "load_config",
    "notice",
    "parse_yaml",
    "read_yaml",
]
