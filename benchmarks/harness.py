"""Side-by-side timing in one process: the protocol of every CPU benchmark here.

Implementations are run in alternation (A B C A B C ...) after a warm-up, each round's time is
divided by the baseline's time in the same round, and the median ratio is reported with its
interquartile range. Absolute times are never reported as results.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def ratio_table(
    candidates: dict[str, Callable[[], object]],
    baseline: str,
    rounds: int = 20,
    warmup: int = 3,
    baseline_of: dict[str, str] | None = None,
    pairs: dict[str, tuple[str, str]] | None = None,
) -> dict[str, dict[str, float]]:
    """{name: {"median": r, "p25": r, "p75": r}} of each candidate's time over the baseline's.

    ``baseline_of`` gives some candidates another baseline of the same rounds (a forward-only
    pass divided by the reference's forward-only pass, say); ``pairs`` adds entries {label:
    (numerator, denominator)}, the ratio of two candidates' times round by round (E=64 over E=8)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    compared = {name: (name, (baseline_of or {}).get(name, baseline)) for name in times}
    compared.update(pairs or {})
    result = {}
    for name, (numerator, denominator) in compared.items():
        ratios = sorted(v / b for v, b in zip(times[numerator], times[denominator], strict=True))
        q = statistics.quantiles(ratios, n=4)
        result[name] = {"median": statistics.median(ratios), "p25": q[0], "p75": q[2]}
    return result


def fmt(entry: dict[str, float]) -> str:
    return f"{entry['median']:.3f} ({entry['p25']:.2f}-{entry['p75']:.2f})"


def machine() -> dict[str, str]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
