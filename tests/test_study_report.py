"""benchmarks/study_report.py's statistics against independent references (normal-approximation
intervals on large synthetic samples with a known mean or a known paired difference), its
docs/results.md sections (replaced in place, never duplicated), the committed study JSON files
against docs/results.md, and benchmarks/study.py's resume logic with a fake cell function."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study_report  # benchmarks/study_report.py

ROOT = Path(__file__).resolve().parents[1]

Z = 1.959964


def _close_interval(got: dict, low: float, high: float, tolerance: float) -> None:
    half = (high - low) / 2
    assert abs(got["low"] - low) < tolerance * half, (got, low, high)
    assert abs(got["high"] - high) < tolerance * half, (got, low, high)


def test_example_level_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    n, p = 10_000, 0.3
    correct = (rng.random((1, n)) < p).astype(float)  # one seed: the bootstrap is over examples only
    got = study_report.bootstrap(correct)
    mean = correct.mean()
    se = math.sqrt(mean * (1 - mean) / n)
    assert got["mean"] == pytest.approx(mean)
    assert got["se"] == pytest.approx(se, rel=0.1)
    _close_interval(got, mean - Z * se, mean + Z * se, 0.15)
    assert got["low"] < p < got["high"]


def test_seed_level_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(2)
    scores = rng.normal(0.6, 0.05, size=4000)  # per-seed scores, one "example": the seed level alone
    got = study_report.seed_bootstrap(scores)
    se = scores.std(ddof=1) / math.sqrt(len(scores))
    _close_interval(got, scores.mean() - Z * se, scores.mean() + Z * se, 0.15)
    assert got["low"] < 0.6 < got["high"]


def test_two_levels_add_the_seed_spread_to_the_example_noise():
    # Seed offsets shift every example of a seed: resampling examples alone would miss them
    rng = np.random.default_rng(3)
    seeds, n = 50, 400
    offsets = rng.normal(0, 0.1, size=(seeds, 1))
    correct = (rng.random((seeds, n)) < 0.5 + offsets).astype(float)
    got = study_report.bootstrap(correct)
    seed_means = correct.mean(1)
    seed_se = seed_means.std(ddof=1) / math.sqrt(seeds)  # the seed level's share (it holds the example noise too)
    assert got["se"] == pytest.approx(seed_se, rel=0.2)
    assert got["se"] > math.sqrt(correct.mean() * (1 - correct.mean()) / correct.size) * 2


def _cells(method: str, matrix: np.ndarray, tasks: list[str]) -> list[dict]:
    per_task = matrix.shape[1] // len(tasks)
    ids = [f"{t}/{i}" for t in tasks for i in range(per_task)]
    return [
        {
            "method": method,
            "seed": seed,
            "per_example": {"ids": ids, "correct": [int(v) for v in row]},
            "tasks": {t: {"score": float(row[j * per_task : (j + 1) * per_task].mean())} for j, t in enumerate(tasks)},
            "mean": {"score": float(row.mean())},
        }
        for seed, row in enumerate(matrix)
    ]


def test_paired_difference_interval_matches_the_normal_approximation_and_beats_unpaired():
    rng = np.random.default_rng(4)
    n = 6_000
    lora = (rng.random((1, n)) < 0.5).astype(float)
    # the mixture fixes 10% of LoRA's errors and nothing else: a true difference of 0.05
    mixture = np.where((lora == 0) & (rng.random((1, n)) < 0.1), 1.0, lora)
    cells = _cells("peft-lora", lora, ["a", "b"]) + _cells("mix", mixture, ["a", "b"])
    summary = study_report.summarise(cells, "peft-lora", resamples=1000)
    paired = summary["methods"]["mix"]["paired"]
    difference = mixture - lora
    se = difference.std(ddof=1) / math.sqrt(n)
    assert paired["mean"] == pytest.approx(difference.mean())
    _close_interval(paired, difference.mean() - Z * se, difference.mean() + Z * se, 0.15)
    assert paired["low"] < 0.05 < paired["high"]
    assert paired["mde"] == pytest.approx(2.801585 * paired["se"])
    unpaired = math.hypot(summary["methods"]["mix"]["overall"]["se"], summary["methods"]["peft-lora"]["overall"]["se"])
    assert paired["se"] < unpaired / 2  # pairing removes the examples' shared difficulty


def test_per_task_and_seed_only_summaries_follow_their_columns():
    rng = np.random.default_rng(5)
    matrix = (rng.random((3, 60)) < 0.5).astype(float)
    cells = _cells("peft-lora", matrix, ["t/x", "u"])
    summary = study_report.summarise(cells, "peft-lora")
    entry = summary["methods"]["peft-lora"]
    assert entry["tasks"]["t/x"]["mean"] == pytest.approx(matrix[:, :30].mean())
    assert entry["tasks"]["u"]["mean"] == pytest.approx(matrix[:, 30:].mean())
    for cell in cells:
        del cell["per_example"]  # a benchmark without per-example results: seeds only
    seeds_only = study_report.summarise(cells, "peft-lora")
    assert not seeds_only["per_example"]
    assert seeds_only["methods"]["peft-lora"]["overall"]["mean"] == pytest.approx(matrix.mean())


def test_unpaired_cells_are_refused():
    cells = _cells("peft-lora", np.ones((1, 4)), ["a"]) + _cells("mix", np.ones((1, 2)), ["a"])
    with pytest.raises(ValueError, match="no result for test examples"):
        study_report.summarise(cells, "peft-lora")


def _results(study: str = "toy", scale: str = "smoke") -> dict:
    rng = np.random.default_rng(6)
    cells = _cells("peft-lora", (rng.random((2, 20)) < 0.5).astype(float), ["a", "b"])
    cells += _cells("mix", (rng.random((2, 20)) < 0.6).astype(float), ["a", "b"])
    meta = {
        "command": f"python benchmarks/study.py {study} --scale {scale}",
        "machine": {"processor": "x86_64", "threads": "2", "platform": "Linux"},
        "device": "cpu",
        "versions": {"torch": "t", "transformers": "tf", "peft": "p"},
        "commits": ["abc"],
        "seeds": [0, 1],
        "balance_reductions": ["mean"],
        "wall_minutes": 1.0,
        "settings": "toy",
    }
    summary = study_report.summarise(cells, "peft-lora", resamples=200)
    return {"study": study, "scale": scale, "description": "A toy.", "meta": meta, "summary": summary, "cells": cells}


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d{3}", text)]


def test_section_is_replaced_in_place_and_its_numbers_are_the_summary_s(tmp_path):
    doc = tmp_path / "results.md"
    first = _results()
    study_report.update_document(doc, "# Intro\n", first)
    study_report.update_document(doc, "# Intro\n", _results("other"))
    second = _results()
    second["meta"]["wall_minutes"] = 2.0
    study_report.update_document(doc, "# Intro\n", second)
    text = doc.read_text()
    assert text.startswith("# Intro\n")
    assert text.count("<!-- study:toy:smoke begin -->") == 1 and text.count("<!-- study:other:smoke begin -->") == 1
    assert text.index("study:toy:smoke") < text.index("study:other:smoke")  # replaced where it was
    body = study_report.read_section(text, "toy", "smoke")
    assert "wall time 2.0 min" in body
    mix = second["summary"]["methods"]["mix"]
    row = next(line for line in body.splitlines() if line.startswith("| mix | 2 |"))
    expected = [mix["overall"][k] for k in ("mean", "low", "high")] + [
        mix["paired"][k] for k in ("mean", "low", "high")
    ]
    assert _numbers(row) == pytest.approx([*expected, mix["paired"]["mde"]], abs=5e-4)


def test_docs_results_tables_match_the_committed_json():
    """Every committed study_*.json has its section in docs/results.md with the tables its numbers
    give (recomputed from its cells), and every section there has its JSON."""
    doc = ROOT / "docs" / "results.md"
    text = doc.read_text() if doc.is_file() else ""
    committed = sorted((ROOT / "benchmarks" / "results").glob("study_*.json"))
    for path in committed:
        results = json.loads(path.read_text())
        body = study_report.read_section(text, results["study"], results["scale"])
        assert body is not None, f"docs/results.md has no section for {path.name}"
        assert study_report.tables(results["summary"]) in body, path.name
        regenerated = study_report.summarise(results["cells"], results["summary"]["baseline"], per_task=False)
        for method, entry in regenerated["methods"].items():  # the JSON's summary is its cells'
            stored = results["summary"]["methods"][method]
            assert entry["overall"] == pytest.approx(stored["overall"]), (path.name, method)
            if "paired" in stored:
                keys = ("mean", "low", "high", "se", "mde")
                got = [entry["paired"][k] for k in keys]
                assert got == pytest.approx([stored["paired"][k] for k in keys]), (path.name, method)
    sections = re.findall(r"<!-- study:([\w-]+):(\w+) begin -->", text)
    assert sorted(f"study_{s}_{c}.json" for s, c in sections) == sorted(p.name for p in committed)


def test_readme_shows_a_committed_study_with_its_json_numbers():
    """README's comparison section shows the accuracy table of a committed study, as its JSON gives it."""
    text = (ROOT / "README.md").read_text()
    shown = re.findall(r"<!-- readme-study:([\w-]+):(\w+) begin -->\n(.*?)\n<!-- readme-study", text, re.DOTALL)
    assert shown, "README.md shows no study"
    for study, scale, body in shown:
        path = ROOT / "benchmarks" / "results" / f"study_{study}_{scale}.json"
        assert path.is_file(), f"README.md shows {study} at {scale} scale, which has no committed JSON"
        assert study_report.accuracy_table(json.loads(path.read_text())["summary"]) in body, path.name


def test_runner_resumes_without_recomputing_finished_cells(tmp_path):
    import study  # benchmarks/study.py

    calls = []

    def compute(method: str, seed: int, scratch: Path) -> dict:
        calls.append((method, seed))
        (scratch / "partial.bin").write_text("x")
        if len(calls) == 3 and fail:
            raise KeyboardInterrupt  # an interruption in the middle of the third cell
        return {"mean": {"score": seed / 10}, "commit": "c"}

    fail = True
    with pytest.raises(KeyboardInterrupt):
        study.run_cells(tmp_path, ["a", "b"], [0, 1], compute, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["a__s0.json", "b__s0.json"]
    assert (tmp_path / "runs" / "a__s1" / "partial.bin").is_file()  # left behind, not a result
    fail, calls = False, []
    lines = []
    cells = study.run_cells(tmp_path, ["a", "b"], [0, 1], compute, log=lines.append)
    assert calls == [("a", 1), ("b", 1)]  # the finished cells were read, not recomputed
    assert [(c["method"], c["seed"]) for c in cells] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert not (tmp_path / "runs" / "a__s1").exists()
    assert "skipped" in lines[0] and "ETA" in lines[-1]
    assert not list((tmp_path / "cells").glob(".*"))  # no temporary files left


def test_load_entropy_is_the_normalised_entropy_of_the_gate_share():
    import study

    uniform = study.layer_figures({"effective_support": 2.0, "gate_share": [0.25] * 4}, 4)
    assert uniform["load_entropy"] == pytest.approx(1.0)
    skewed = [0.7, 0.1, 0.1, 0.1]
    naive = -sum(p * math.log(p) for p in skewed) / math.log(4)
    assert study.layer_figures({"effective_support": 1.5, "gate_share": skewed}, 4)["load_entropy"] == pytest.approx(
        naive
    )
    assert study.layer_figures({"effective_support": 1.0, "gate_share": [1.0, 0, 0, 0]}, 4)["load_entropy"] == 0.0


def test_routing_curves_probe_on_schedule_and_match_direct_statistics():
    import study
    import torch
    from conftest import _llama

    import lomix
    from lomix.stats import RoutingStats

    torch.manual_seed(0)
    model = _llama()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 7), generator=generator)
    probe = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(7).expand(3, 7),
        "task_ids": torch.zeros(3, dtype=torch.long),
        "task_descriptions": ["", "", ""],
    }

    def inject(m, cfg, tasks, data_tasks):
        lomix.inject(m, lomix.MixtureConfig(target_modules=["q_proj", "up_proj"], num_experts=4, rank=2))

    curves = study.RoutingCurves(probe, every=2, total=5)
    curves.build(inject)(model, None, None, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    try:
        for _ in range(5):
            batch = torch.randint(0, 97, (2, 7), generator=generator)
            (model(input_ids=batch, labels=batch).loss + lomix.aux_loss(model)).backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        curves.close()
    optimizer.step()  # after close: not recorded
    result = curves.result()
    assert result["steps"] == [0, 2, 4, 5]
    model.eval()
    with torch.no_grad(), RoutingStats(model) as stats:
        model(**{k: v for k, v in probe.items() if k != "task_descriptions"}, use_cache=False)
    direct = {name: study.layer_figures(s, 4) for name, s in stats.summary().items()}
    assert set(result["layers"]) == set(direct) and len(direct) == 4
    for name, figures in direct.items():
        for metric, value in figures.items():
            assert result["layers"][name][metric][-1] == pytest.approx(value, abs=1e-4)
    supports = [figures["effective_support"] for figures in direct.values()]
    assert result["min"]["effective_support"][-1] == pytest.approx(min(supports), abs=1e-4)
    assert result["mean"]["effective_support"][-1] == pytest.approx(sum(supports) / 4, abs=1e-4)
    assert 1.0 <= min(supports) and max(supports) <= 2.0 + 1e-6  # top-2 gates


def test_a_report_over_cells_of_different_budgets_is_refused(tmp_path):
    import study

    same = {"tasks": ["a"], "steps": 8, "seed": 0}
    cells = [
        {"method": "a", "seed": 0, "settings": same},
        {"method": "a", "seed": 1, "settings": same | {"seed": 1}},
    ]
    study.check_same_budget(cells, tmp_path)  # seeds differ by design
    cells.append({"method": "b", "seed": 0, "settings": same | {"steps": 16}})
    with pytest.raises(SystemExit, match=r"different settings.*b__s0"):
        study.check_same_budget(cells, tmp_path)
