"""The model card (README.md) pushed with a mixture, built with huggingface_hub's `ModelCard`.

YAML metadata: ``base_model`` (when it is a hub id), ``library_name: lomix``, ``tags``. Body: the
method (the mixture's equation and its router), the experts, the trainable parameters, an evaluation
table per ``eval*.json``, routing statistics per ``routing*.json``, the training config, and how to
load the mixture.

Evaluation and routing files are read leniently, since recipes write them: a JSON object of numbers
(one row per metric), an object of objects (one row per task, one column per metric; an
lm-evaluation-harness style ``{"results": {...}}`` is unwrapped), an object of lists (one row per
layer, one column per expert) or a list of objects (one row each). Anything else is shown as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .spec import REPO_ID_RE
from .validate import MixtureInfo

_ROUTERS = {
    "topk": (
        "**Top-k token routing** (`topk`): a linear router scores the {E} experts for every token and the k "
        "best are used, gated by their softmax probabilities (the sparse mixture of LoRA experts of MoLoRA and "
        "MixLoRA)."
    ),
    "dense": (
        "**Dense softmax routing** (`dense`): every token uses all {E} experts, weighted by a softmax over a "
        "linear router's scores (the soft stage of LoRA-Mixer)."
    ),
    "fixed": (
        "**Fixed route** (`fixed`): every token uses the same experts with the same weights, so the mixture is "
        "a single LoRA and can be exported as one."
    ),
}
_MAX_JSON = 4000
_MAX_CONFIG = 8000


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    if isinstance(value, str | int):
        text = str(value)
    else:
        text = json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_fmt(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _union(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return keys


def data_table(data: Any, first_column: str = "") -> str:
    """A markdown table for the JSON shapes described in the module docstring, or a JSON block."""
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        data = data["results"]
    if isinstance(data, dict) and data:
        values = list(data.values())
        if all(_scalar(v) for v in values):
            return _table(["metric", "value"], [[k, v] for k, v in data.items()])
        if all(isinstance(v, dict) and all(_scalar(x) for x in v.values()) for v in values):
            columns = _union(values)
            return _table([first_column, *columns], [[k, *(v.get(c) for c in columns)] for k, v in data.items()])
        if all(isinstance(v, list) and all(_scalar(x) for x in v) for v in values):
            width = max(len(v) for v in values)
            rows = [[k, *v, *([None] * (width - len(v)))] for k, v in data.items()]
            return _table([first_column, *(f"expert {i}" for i in range(width))], rows)
    if isinstance(data, list) and data and all(isinstance(r, dict) and all(map(_scalar, r.values())) for r in data):
        columns = _union(data)
        return _table(columns, [[r.get(c) for c in columns] for r in data])
    text = json.dumps(data, indent=2, sort_keys=True)
    if len(text) > _MAX_JSON:
        text = text[:_MAX_JSON] + "\n... (truncated)"
    return f"```json\n{text}\n```"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"could not read {path.name}: {exc}"}


def hub_base_model(info: MixtureInfo, base_model: str | None = None) -> str | None:
    """The base model as a hub id for the card's metadata (local paths and empty names are left out)."""
    name = base_model or info.base_model
    return name if name and REPO_ID_RE.match(name) else None


def _method(info: MixtureInfo) -> str:
    config = info.config
    router = config.router.to_dict()
    name = router.pop("name")
    scale = "alpha / sqrt(r) (rsLoRA)" if config.use_rslora else "alpha / r"
    parts = [
        "## Method",
        "",
        f"Each of the {len(info.layers)} wrapped linear layers computes",
        "",
        "    y = W x + s * sum_{e in I(x)} g_e(x) * B_e A_e x",
        "",
        "where W is the frozen base weight, A_e (r x d_in) and B_e (d_out x r) are the LoRA factors of expert e, "
        f"s = {scale}, and the router picks the experts I(x) of each token and their gates g_e(x).",
        "",
        _ROUTERS.get(name, f"The `{name}` router.").format(E=config.num_experts),
        "",
    ]
    if router:
        parts += [_table(["router field", "value"], [[k, v] for k, v in router.items()]), ""]
    losses = [f"Switch load balancing x {config.balance.switch:g}"] if config.balance.switch else []
    losses += [f"router z-loss x {config.balance.z_loss:g}"] if config.balance.z_loss else []
    if losses:
        parts += [f"Balance losses during training: {', '.join(losses)}.", ""]
    return "\n".join(parts)


def _experts(info: MixtureInfo) -> str:
    config = info.config
    targets = config.target_modules
    target_text = (
        f"`{targets}` (regular expression)" if isinstance(targets, str) else ", ".join(f"`{t}`" for t in targets)
    )
    rows = [
        ["experts per layer", config.num_experts],
        ["rank r", config.rank],
        ["alpha", config.alpha],
        ["scale s", config.scale],
        ["rsLoRA", config.use_rslora],
        ["expert dropout", config.dropout],
        ["wrapped layers", len(info.layers)],
        ["target modules", target_text],
    ]
    if config.exclude_modules:
        rows.append(["excluded modules", ", ".join(f"`{t}`" for t in config.exclude_modules)])
    parts = ["## Experts", "", _table(["setting", "value"], rows), ""]
    sources = info.metadata.get("expert_sources")
    if sources:
        try:
            listed = json.loads(sources)
        except json.JSONDecodeError:
            listed = [sources]
        parts += ["The experts were loaded from:", "", *(f"{j}. `{s}`" for j, s in enumerate(listed)), ""]
    return "\n".join(parts)


def _parameters(info: MixtureInfo) -> str:
    counts = info.parameter_counts()
    total = counts["experts"] + counts["routers"]
    return "\n".join(
        [
            "## Trainable parameters",
            "",
            f"{total:,} parameters, all stored in `lomix_model.safetensors`: {counts['experts']:,} in the experts "
            f"and {counts['routers']:,} in the routers. The base model's weights are frozen and are not part of "
            "this repository.",
            "",
        ]
    )


def _how_to_load(repo_id: str, base: str | None) -> str:
    base_text = base or "<the base model>"
    return "\n".join(
        [
            "## How to load",
            "",
            "```python",
            "import lomix.hub",
            "from transformers import AutoModelForCausalLM  # or the class of your base model",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{base_text}")',
            f'model = lomix.hub.load(model, "{repo_id}")  # pin a version with "{repo_id}@<commit>"',
            "```",
            "",
            "Or download it first, then load the folder:",
            "",
            "```bash",
            f"lomix hub pull {repo_id} --out mixture/",
            "```",
            "",
            "```python",
            'model = lomix.load(model, "mixture/")',
            "```",
            "",
        ]
    )


def model_card(
    info: MixtureInfo,
    *,
    repo_id: str,
    base_model: str | None = None,
    training_config: Path | None = None,
    eval_files: list[Path] = (),
    routing_files: list[Path] = (),
):
    """The `huggingface_hub.ModelCard` of a validated mixture (see the module docstring).

    ``base_model`` overrides the name saved in the mixture's metadata (``config._name_or_path`` of
    the model it was saved from, which is empty for models built from a config).
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = info.config
    hub_base = hub_base_model(info, base_model)
    name = base_model or info.base_model
    data = ModelCardData(
        base_model=hub_base,
        library_name="lomix",
        tags=["lomix", "lora", "mixture-of-lora-experts", f"router-{config.router.name}"],
    )
    if hub_base:
        over = f"the frozen base model [`{hub_base}`](https://huggingface.co/{hub_base})"
    elif name:
        over = f"the frozen base model `{name}`"
    else:
        over = f"a frozen `{info.metadata.get('base_model_type', 'transformers')}` model"
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A routed mixture of {config.num_experts} LoRA experts (rank {config.rank}) over {over}, made with lomix.",
        "",
        _method(info),
        _experts(info),
        _parameters(info),
    ]
    if eval_files:
        body += ["## Evaluation", ""]
        for path in eval_files:
            body += [f"### `{path.name}`", "", data_table(_read_json(path), "task"), ""]
    if routing_files:
        body += [
            "## Routing statistics",
            "",
            "How the routers spread tokens over the experts, as the run recorded it.",
            "",
        ]
        for path in routing_files:
            body += [f"### `{path.name}`", "", data_table(_read_json(path), "layer"), ""]
    if training_config is not None:
        body += ["## Training configuration", "", f"The resolved training config is `{training_config.name}`."]
        text = training_config.read_text(errors="replace")
        if len(text) <= _MAX_CONFIG:
            body += ["", "<details><summary>show</summary>", "", "```yaml", text.rstrip(), "```", "", "</details>"]
        body.append("")
    body.append(_how_to_load(repo_id, hub_base or name))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
