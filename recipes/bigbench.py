"""Build a multi-task data set from BIG-bench (Apache-2.0) locally, from the `bigbench` sdist on PyPI.

BIG-bench asks that its examples never appear in training corpora (the canary string in every
task.json): lomix commits only this builder and the task lists, never examples. The builder

1. downloads ``bigbench-<version>.tar.gz`` once into ``$LOMIX_CACHE/bigbench`` with pip (the package
   itself is never installed: it would pull tensorflow);
2. extracts only the chosen tasks' ``task.json`` from it;
3. normalises every example into ``{task, input, choices, label, target, description}`` and writes a
   fixed, seeded train/test split as JSONL (split by unique input text, so a question never lands
   in both).

    python -m lomix.recipes.bigbench --tasks date_understanding color/hex --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lomix.atomic import atomic_file
from lomix.recipes.assets import AssetError, cache_dir
from lomix.recipes.config import BigBenchConfig

# pip 25+ refuses to even download an sdist whose metadata has a direct-URL dependency, and
# bigbench's does (bleurt @ file://...). pip 24.3.1 still downloads it; it is fetched from PyPI once
# and run from its wheel (a wheel of pip is runnable as `python pip.whl/pip`). Nothing is installed.
PIP_FOR_DOWNLOAD = "24.3.1"
TASKS_ROOT = "bigbench/benchmark_tasks"
BUILDER_FORMAT = 1  # bump when normalise_task or split_task change what they write (invalidates the cache)


def _pip(*args: str, pip: Path | None = None) -> None:
    command = [sys.executable, str(pip / "pip")] if pip else [sys.executable, "-m", "pip"]
    result = subprocess.run(
        [*command, *args, "--disable-pip-version-check", "-q"], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise AssetError(f"`pip {' '.join(args)}` failed:\n{result.stderr.strip()[-2000:]}")


def download_sdist(version: str, folder: Path) -> Path:
    """``folder/bigbench-<version>.tar.gz``, downloaded from PyPI on first use (~360 MB, ~40 s)."""
    sdist = folder / f"bigbench-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    folder.mkdir(parents=True, exist_ok=True)
    tools = cache_dir() / "tools"
    pip_wheel = tools / f"pip-{PIP_FOR_DOWNLOAD}-py3-none-any.whl"
    if not pip_wheel.is_file():
        _pip("download", "--no-deps", "-d", str(tools), f"pip=={PIP_FOR_DOWNLOAD}")
    partial = folder / f".download-{version}"
    partial.mkdir(exist_ok=True)
    print(f"lomix: downloading bigbench=={version} (sdist, ~360 MB) from PyPI into {folder}", file=sys.stderr)
    _pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(partial), f"bigbench=={version}", pip=pip_wheel)
    (partial / sdist.name).replace(sdist)
    partial.rmdir()
    return sdist


def extract_tasks(sdist: Path, tasks: Iterable[str], folder: Path) -> dict[str, Path]:
    """``{task: folder/<task>/task.json}``, reading the archive once for every task not yet extracted."""
    wanted = {task: folder / task / "task.json" for task in tasks}
    missing = {task for task, path in wanted.items() if not path.is_file()}
    if missing:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:
                parts = member.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith(TASKS_ROOT + "/"):
                    continue
                task = parts[1][len(TASKS_ROOT) + 1 :].rpartition("/task.json")[0]
                if task in missing and member.name.endswith("/task.json") and member.isfile():
                    data = archive.extractfile(member).read()
                    with atomic_file(wanted[task], "wb") as handle:
                        handle.write(data)
                    missing.discard(task)
                    if not missing:
                        break
        if missing:
            raise AssetError(
                f"data.bigbench.tasks: {', '.join(sorted(missing))} not found in {sdist.name} "
                f"(task folders live under {TASKS_ROOT}/, e.g. date_understanding or color/hex)"
            )
    return wanted


def _stable_seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16], 16)


def normalise_task(task: str, spec: dict[str, Any], cfg: BigBenchConfig) -> list[dict[str, Any]]:
    """One task.json -> examples ``{task, input, choices, label, target, description}``.

    Multiple-choice examples (``target_scores``) keep their choices in a seeded shuffled order and
    the index of the single best-scored one; examples whose best score is shared are dropped (no
    unique label). Generative examples (``target``) keep the first reference. The task's own
    instruction (``task_prefix``) is prepended, and the choices appended where the task asks for it.
    """
    description = str(spec.get("description", "")).strip()
    prefix = str(spec.get("task_prefix", "") or "").strip() if cfg.task_prefix else ""
    append = cfg.append_choices and bool(spec.get("append_choices_to_input", False))
    examples = []
    for index, example in enumerate(spec.get("examples", [])):
        text = str(example.get("input", "")).strip()
        if not text:
            continue
        record: dict[str, Any] = {"task": task, "description": description, "choices": None, "label": None}
        scores = example.get("target_scores")
        if scores:
            best = max(scores.values())
            if sum(1 for v in scores.values() if v == best) != 1:
                continue
            choices = [str(c) for c in scores]
            random.Random(_stable_seed(cfg.split_seed, task, index)).shuffle(choices)
            correct = next(str(c) for c, v in scores.items() if v == best)
            record.update(choices=choices, label=choices.index(correct), target=correct)
            if append:
                text = f"{text}\nOptions: {', '.join(choices)}"
        elif "target" in example:
            target = example["target"]
            target = target[0] if isinstance(target, list) and target else target
            if not isinstance(target, str) or not target.strip():
                continue
            record["target"] = target.strip()
        else:
            continue
        record["input"] = f"{prefix}\n{text}" if prefix else text
        examples.append(record)
    return examples


def split_task(examples: list[dict[str, Any]], cfg: BigBenchConfig) -> tuple[list[dict], list[dict]]:
    """Seeded (train, test) by unique input text: test takes the first ``test_per_task`` inputs."""
    by_input: dict[str, list[dict]] = {}
    for example in examples:
        by_input.setdefault(example["input"], []).append(example)
    inputs = sorted(by_input)
    random.Random(_stable_seed(cfg.split_seed, examples[0]["task"] if examples else "")).shuffle(inputs)
    test_inputs = inputs[: cfg.test_per_task]
    train_inputs = inputs[cfg.test_per_task : cfg.test_per_task + cfg.train_per_task]
    test = [e for i in test_inputs for e in by_input[i]][: cfg.test_per_task]
    train = [e for i in train_inputs for e in by_input[i]][: cfg.train_per_task]
    return train, test


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(cfg: BigBenchConfig, out: Path | None = None) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl) for ``cfg``, built once and cached by its settings."""
    settings = {k: v for k, v in vars(cfg).items() if k != "sdist"}
    settings["builder_format"] = BUILDER_FORMAT
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / "bigbench"
    out = Path(out) if out is not None else root / "built" / key
    train_path, test_path = out / "train.jsonl", out / "test.jsonl"
    if train_path.is_file() and test_path.is_file():
        return train_path, test_path
    sdist = Path(cfg.sdist).expanduser() if cfg.sdist else download_sdist(cfg.version, root)
    if not sdist.is_file():
        raise AssetError(f"data.bigbench.sdist: no such file: {sdist}")
    files = extract_tasks(sdist, cfg.tasks, root / f"tasks-{cfg.version}")
    train, test = [], []
    for task in cfg.tasks:
        spec = json.loads(files[task].read_text())
        examples = normalise_task(task, spec, cfg)
        if not examples:
            raise AssetError(f"data.bigbench.tasks: {task} has no usable examples")
        task_train, task_test = split_task(examples, cfg)
        train += task_train
        test += task_test
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(test_path, test)
    _write_jsonl(train_path, train)
    (out / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return train_path, test_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", required=True, help="task folders, e.g. date_understanding color/hex")
    parser.add_argument("--train-per-task", type=int, default=300)
    parser.add_argument("--test-per-task", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--sdist", default=None, help="an already downloaded bigbench sdist")
    parser.add_argument("--out", default=None, help="output folder (default: the cache)")
    args = parser.parse_args(argv)
    cfg = BigBenchConfig(
        tasks=args.tasks,
        train_per_task=args.train_per_task,
        test_per_task=args.test_per_task,
        split_seed=args.seed,
        sdist=args.sdist,
    )
    train, test = build(cfg, args.out)
    print(f"{train}\n{test}")


if __name__ == "__main__":
    main()
