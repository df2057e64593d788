"""The statistics and the markdown of benchmarks/study.py, as pure functions (no model, no files
except `replace_section`).

Accuracy of a method = the mean over seeds and test examples of a 0/1 correctness matrix
``correct`` of shape (S seeds, N examples); every method of a study is scored on the same N test
examples in the same order and trains with the same S seeds, so two methods pair cell by cell.

The interval is a two-level bootstrap: each resample draws S seeds with replacement and N test
examples with replacement (the same examples for every drawn seed, which keeps the pairing) and
takes the mean of the resampled matrix; the 95% interval is the 2.5 and 97.5 percentiles of B
such means (B = 2000, a fixed RNG seed: the same JSON gives the same numbers). The paired
difference to the baseline applies the same bootstrap to ``correct_method - correct_baseline``.

Minimum detectable effect (MDE) of a paired difference: (z_{0.975} + z_{0.80}) x SE = 2.80 x SE,
SE the bootstrap standard error of the difference: the true difference a two-sided 5% test detects
with 80% power. A difference smaller than the MDE is not evidence either way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

RESAMPLES = 2000
RNG_SEED = 0
MDE_FACTOR = 1.959964 + 0.841621  # z_{0.975} + z_{0.80}
_CHUNK_ELEMENTS = 2_000_000  # resamples are drawn in chunks of at most this many gathered cells


def bootstrap(correct, resamples: int = RESAMPLES, seed: int = RNG_SEED) -> dict[str, float]:
    """Mean of ``correct`` (S, N) with its two-level bootstrap 95% interval and standard error.

    Returns {"mean", "low", "high", "se"}; ``correct`` may hold any real values (a paired
    difference holds -1, 0 and 1)."""
    values = np.asarray(correct, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"bootstrap: expected a non-empty (seeds, examples) matrix, got shape {values.shape}")
    seeds, examples = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, _CHUNK_ELEMENTS // (seeds * examples))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        seed_rows = rng.integers(0, seeds, size=(count, seeds))
        example_cols = rng.integers(0, examples, size=(count, examples))
        drawn = values[seed_rows[:, :, None], example_cols[:, None, :]]  # (count, S, N)
        means[start : start + count] = drawn.mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "se": float(means.std(ddof=1))}


def seed_bootstrap(values, resamples: int = RESAMPLES, seed: int = RNG_SEED) -> dict[str, float]:
    """The same figures from per-seed scores only (S,): a bootstrap over seeds (for benchmarks that
    give no per-example correctness)."""
    return bootstrap(np.asarray(values, dtype=np.float64)[:, None], resamples, seed)


def mde(se: float) -> float:
    """Minimum detectable effect of a paired difference with bootstrap standard error ``se``."""
    return MDE_FACTOR * se


def correctness(cells: list[dict], ids: list[str] | None = None) -> tuple[np.ndarray, list[str], list[int]]:
    """(S, N) matrix of one method's cells (sorted by seed), its example ids and seeds. With ``ids``
    the columns follow that order (a cell that lacks one of them is an error: nothing pairs)."""
    cells = sorted(cells, key=lambda c: c["seed"])
    order = ids or cells[0]["per_example"]["ids"]
    rows = []
    for cell in cells:
        lookup = dict(zip(cell["per_example"]["ids"], cell["per_example"]["correct"], strict=True))
        missing = [i for i in order if i not in lookup]
        if missing:
            raise ValueError(f"{cell['method']} seed {cell['seed']}: no result for test examples {missing[:3]}")
        rows.append([lookup[i] for i in order])
    return np.asarray(rows, dtype=np.float64), list(order), [c["seed"] for c in cells]


def summarise(
    cells: list[dict], baseline: str | dict[str, str], resamples: int = RESAMPLES, per_task: bool = True
) -> dict:
    """Per method: overall and per-task accuracy with intervals and, when its baseline ran, the
    paired difference to it (only on the seeds both ran) with its interval and MDE. ``baseline``
    names one method, or maps each method to its own (a few-shot method to LoRA at the same shots).
    ``per_task=False`` leaves the per-task intervals out (a quick check of the headline numbers)."""
    by_method: dict[str, list[dict]] = {}
    for cell in cells:
        by_method.setdefault(cell["method"], []).append(cell)
    per_example = all("per_example" in c for c in cells)
    ids = None
    if per_example:
        ids = sorted({i for c in cells for i in c["per_example"]["ids"]}, key=_id_order)
    tasks = sorted({t for c in cells for t in c["tasks"]}) if per_task else []
    methods = {}
    for method, group in by_method.items():
        entry: dict = {"seeds": sorted(c["seed"] for c in group)}
        if per_example:
            matrix, order, _ = correctness(group, ids)
            entry["overall"] = bootstrap(matrix, resamples)
            columns = {t: [j for j, i in enumerate(order) if _task_of(i) == t] for t in tasks}
            entry["tasks"] = {t: bootstrap(matrix[:, cols], resamples) for t, cols in columns.items() if cols}
        else:
            entry["overall"] = seed_bootstrap([c["mean"]["score"] for c in sorted(group, key=_seed)], resamples)
            entry["tasks"] = {
                t: seed_bootstrap([c["tasks"][t]["score"] for c in sorted(group, key=_seed)], resamples)
                for t in tasks
                if all(t in c["tasks"] for c in group)
            }
        methods[method] = entry
    for method, group in by_method.items():
        reference = baseline.get(method) if isinstance(baseline, dict) else baseline
        if reference is None or reference == method or reference not in by_method:
            continue
        seeds = sorted({c["seed"] for c in group} & {c["seed"] for c in by_method[reference]})
        if seeds:
            mine = [c for c in group if c["seed"] in seeds]
            theirs = [c for c in by_method[reference] if c["seed"] in seeds]
            if per_example:
                difference = correctness(mine, ids)[0] - correctness(theirs, ids)[0]
                paired = bootstrap(difference, resamples)
            else:
                pairs = zip(sorted(mine, key=_seed), sorted(theirs, key=_seed), strict=True)
                paired = seed_bootstrap([a["mean"]["score"] - b["mean"]["score"] for a, b in pairs], resamples)
            methods[method]["paired"] = paired | {"mde": mde(paired["se"]), "seeds": seeds, "to": reference}
    return {
        "baseline": baseline,
        "per_example": per_example,
        "resamples": resamples,
        "rng_seed": RNG_SEED,
        "mde_formula": "MDE = (z_0.975 + z_0.80) x SE = 2.80 x SE of the paired difference (bootstrap SE)",
        "test_examples": len(ids) if ids else None,
        "tasks": tasks,
        "methods": methods,
    }


def _seed(cell: dict) -> int:
    return cell["seed"]


def _task_of(example_id: str) -> str:
    return example_id.rsplit("/", 1)[0]


def _id_order(example_id: str) -> tuple[str, int]:
    task, index = example_id.rsplit("/", 1)
    return task, int(index)


# ----------------------------------------------------------------------------------------------
# Markdown


def _ci(entry: dict) -> str:
    return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _signed(entry: dict) -> str:
    return f"{entry['mean']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def tables(summary: dict) -> str:
    """The accuracy table (`accuracy_table`) and the per-task table, from a `summarise` result."""
    return accuracy_table(summary) + "\n\n" + task_table(summary)


def accuracy_table(summary: dict) -> str:
    """Per method: seeds, mean accuracy with its 95% interval, the paired difference to the
    baseline with its interval, and the MDE (what README's comparison section shows)."""
    methods = summary["methods"]
    single = isinstance(summary["baseline"], str)
    versus = f"vs {summary['baseline']}" if single else "vs baseline"
    lines = [
        f"| method | seeds | accuracy [95% CI] | {versus} (paired) [95% CI] | MDE |",
        "|---|---|---|---|---|",
    ]
    for name, entry in methods.items():
        paired = entry.get("paired")
        to = "" if single or not paired else f" (vs {paired['to']})"
        lines.append(
            f"| {name} | {len(entry['seeds'])} | {_ci(entry['overall'])} | "
            + (f"{_signed(paired)}{to} | {paired['mde']:.3f} |" if paired else "— | — |")
        )
    return "\n".join(lines)


def task_table(summary: dict) -> str:
    """Per method and task: mean accuracy with its 95% interval."""
    methods = summary["methods"]
    tasks = summary["tasks"]
    short = [t.split("/")[0] for t in tasks]
    lines = ["| method | " + " | ".join(short) + " |", "|---|" + "---|" * len(tasks)]
    for name, entry in methods.items():
        cells = [_ci(entry["tasks"][t]) if t in entry["tasks"] else "—" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(curves: dict) -> str:
    """Final routing figures of the collapse study: per method, the mean over seeds at the last
    probe of the layer-mean and layer-minimum curves."""
    lines = [
        "| method | step | eff. support (mean / min layer) | router support (mean / min) "
        "| load entropy / log E (mean / min) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in curves.items():
        final = entry["final"]

        def pair(metric: str, final=final) -> str:
            if metric not in final:
                return "—"
            return f"{final[metric]['mean']:.3f} / {final[metric]['min']:.3f}"

        lines.append(
            f"| {name} | {entry['steps'][-1]} | {pair('effective_support')} | {pair('prob_support')} | "
            f"{pair('load_entropy')} |"
        )
    return "\n".join(lines)


def section(results: dict) -> str:
    """The docs/results.md section of one study at one scale (between its markers)."""
    meta = results["meta"]
    versions = meta["versions"]
    machine = meta["machine"]
    parts = [
        f"### {results['study']} ({results['scale']} scale)",
        "",
        results["description"],
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {machine['processor']}, {machine['threads']} threads, {machine['platform']}; device "
        f"{meta['device']}  ",
        f"Versions: torch {versions['torch']}, transformers {versions['transformers']}, peft {versions['peft']}, "
        f"lomix {', '.join(meta['commits'])}  ",
        f"Seeds: {', '.join(map(str, meta['seeds']))}; balance-loss reduction: "
        f"{', '.join(meta['balance_reductions'])}; wall time {meta['wall_minutes']:.1f} min (sum over cells)  ",
        f"Settings: {meta['settings']}",
        "",
        tables(results["summary"]),
    ]
    if results.get("curves"):
        parts += ["", curve_table(results["curves"])]
    summary = results["summary"]
    basis = (
        f"{summary['test_examples']} test examples x seeds (two-level bootstrap)"
        if summary["per_example"]
        else "seeds only (the benchmark gives no per-example correctness)"
    )
    parts += [
        "",
        f"Intervals: 95% bootstrap over {basis}, {summary['resamples']} resamples, RNG seed "
        f"{summary['rng_seed']}. {summary['mde_formula']}.",
    ]
    return "\n".join(parts)


def markers(study: str, scale: str) -> tuple[str, str]:
    return f"<!-- study:{study}:{scale} begin -->", f"<!-- study:{study}:{scale} end -->"


def replace_section(document: str, study: str, scale: str, body: str) -> str:
    """``document`` with the study's section (between its markers) replaced by ``body``, or
    ``body`` appended with its markers when the study has none yet."""
    begin, end = markers(study, scale)
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document, count=1)
    return document.rstrip("\n") + "\n\n" + block + "\n"


def read_section(document: str, study: str, scale: str) -> str | None:
    """The body between a study's markers, or None."""
    begin, end = markers(study, scale)
    match = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), document, re.DOTALL)
    return match.group(1) if match else None


def update_document(path: Path, intro: str, results: dict) -> None:
    """Write the study's section into ``path`` (created with ``intro`` when missing), atomically."""
    document = path.read_text() if path.is_file() else intro.rstrip("\n") + "\n"
    updated = replace_section(document, results["study"], results["scale"], section(results))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(updated)
    os.replace(tmp, path)
