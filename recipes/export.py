"""Export a run's mixture for deployment: one PEFT LoRA, a merged transformers checkpoint, a native
mixture-of-experts checkpoint (Mixtral, Qwen3-MoE) or lomix.

    lomix export RUN_DIR --format peft --task date_understanding --out out/peft
    lomix export RUN_DIR --format merged --out out/merged       # a router with a fixed route
    lomix export MERGED_RUN --format lomix --out out/mixture    # token-routed: keeps the lomix runtime
    lomix export RUN_DIR --format moe --out out/moe             # block-routed: a Mixtral checkpoint

- ``peft``: a mixture whose routing is fixed (for task T with ``--task``, or by its router) as ONE
  standard PEFT LoRA of rank k*r (`lomix.export.export_peft`); loads with
  ``PeftModel.from_pretrained`` and no lomix installed.
- ``merged``: the same folded into the base weights, saved with the tokenizer as a plain
  transformers checkpoint (`lomix.export.export_merged`); a bitsandbytes base is dequantized,
  merged and saved in full precision, and the command says so.
- ``moe``: a block-routed mixture (``mixture.routing_scope: block``, a softmax top-k router) of a
  Llama/Mistral-family base as a ``MixtralForCausalLM`` checkpoint with the base's tokenizer files
  (`lomix.export_moe.export_moe`), served by transformers, llama.cpp, vLLM or SGLang without lomix.
  Anything Mixtral cannot compute exactly is refused with the reason.
- ``lomix``: the mixture in the lomix format (after `lomix merge` when run on a merged run), with
  the run's tasks.json so task ids keep their meaning. The only option for token-routed mixtures.

Every folder is written atomically and carries ``lomix_export.json`` (format, routes, notes).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lomix
from lomix.atomic import atomic_directory
from lomix.errors import ConfigError
from lomix.export import EXPORT_INFO_NAME, export_merged, export_peft
from lomix.recipes.runs import LoadedRun, load_run

FORMATS = ("merged", "peft", "lomix", "moe")


def task_route(run: LoadedRun, task: str | None) -> dict[str, Any]:
    """Routing fields of one sequence of ``task`` (a name from tasks.json or its id); {} without a task."""
    if task is None:
        return {}
    names = run.tasks.names
    if task in names:
        task_id = names.index(task)
    elif task.isdigit() and int(task) < len(names):
        task_id = int(task)
    else:
        raise ConfigError("--task", f"unknown task {task!r}; the run's tasks are: {', '.join(names)} (or their ids)")
    return {"task_ids": [task_id], "task_descriptions": [run.tasks.descriptions[names[task_id]]]}


def run(
    run_dir: str | Path,
    fmt: Literal["merged", "peft", "lomix", "moe"],
    out: str | Path,
    task: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    loaded = load_run(run_dir, overrides)
    route = task_route(loaded, task)
    out = Path(out)
    if fmt == "lomix":
        with atomic_directory(out) as tmp:
            lomix.save(loaded.model, tmp)
            shutil.copyfile(loaded.directory / "tasks.json", tmp / "tasks.json")
            info = {"format": "lomix", "lomix_version": lomix.__version__, "notes": [], "source": str(run_dir)}
            (tmp / EXPORT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        return info
    if fmt == "moe":
        from lomix.export_moe import export_moe
        from lomix.recipes.assets import model_folder

        return export_moe(loaded.model, out, tokenizer_dir=model_folder(loaded.cfg.model), tokenizer=loaded.tokenizer)
    if fmt == "peft":
        export_peft(loaded.model, out, **route)
        info = json.loads((out / EXPORT_INFO_NAME).read_text())
    else:
        info = export_merged(loaded.model, out, tokenizer=loaded.tokenizer, **route)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default=None)
    args = parser.parse_args(argv)
    info = run(args.run_dir, args.format, args.out, args.task)
    for note in info["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
