"""The BIG-bench builder, on a small fake sdist written here (no BIG-bench example is in the repo)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from lomix.recipes import bigbench
from lomix.recipes.assets import AssetError
from lomix.recipes.config import BigBenchConfig
from lomix.recipes.data import DataConfig, load_examples

YESNO = {
    "description": "Say whether the number is big",
    "task_prefix": "Answer big or small.",
    "append_choices_to_input": False,
    "examples": [
        {"input": f"number {i}", "target_scores": {"big": int(i >= 5), "small": int(i < 5)}} for i in range(10)
    ]
    # a tie (two best choices) has no unique label and is dropped; an empty input is dropped
    + [{"input": "number tie", "target_scores": {"big": 1, "small": 1}}, {"input": "", "target_scores": {"big": 1}}],
}
COLORS = {
    "description": "Name the color",
    "append_choices_to_input": True,
    "examples": [
        {"input": f"hex #{i:02d}0000", "target_scores": {"red": 1, "green": 0, "blue": 0, "gray": 0}} for i in range(8)
    ],
}
COUNT = {
    "description": "Count things",
    "examples": [{"input": f"how many in {'x' * i}", "target": [str(i), f"n{i}"]} for i in range(1, 7)],
}


def fake_sdist(path, tasks):
    with tarfile.open(path, "w:gz") as archive:
        for name, spec in tasks.items():
            data = json.dumps(spec).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        readme = tarfile.TarInfo("bigbench-1.0.0/README.md")
        archive.addfile(readme, io.BytesIO(b""))
    return path


@pytest.fixture
def sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMIX_CACHE", str(tmp_path / "cache"))
    return fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {"yesno": YESNO, "color/hex": COLORS, "count": COUNT})


def config(sdist, **kwargs):
    kwargs.setdefault("tasks", ["yesno", "color/hex", "count"])
    return BigBenchConfig(sdist=str(sdist), train_per_task=100, test_per_task=3, **kwargs)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_normalisation_keeps_the_right_answer_under_shuffled_choices(sdist):
    cfg = config(sdist)
    examples = bigbench.normalise_task("yesno", YESNO, cfg)
    assert len(examples) == 10  # the tie and the empty input are dropped
    for example in examples:
        number = int(example["input"].rsplit(" ", 1)[1])
        assert example["input"] == f"Answer big or small.\nnumber {number}"
        assert example["choices"][example["label"]] == example["target"] == ("big" if number >= 5 else "small")
        assert sorted(example["choices"]) == ["big", "small"]
        assert example["description"] == "Say whether the number is big" and example["task"] == "yesno"
    # the seeded shuffle moves the right answer around (BIG-bench often lists it first)
    assert len({e["label"] for e in examples}) == 2


def test_choices_are_appended_where_the_task_asks_and_generative_targets_take_the_first(sdist):
    cfg = config(sdist)
    color = bigbench.normalise_task("color/hex", COLORS, cfg)[0]
    assert color["input"] == f"hex #000000\nOptions: {', '.join(color['choices'])}"
    count = bigbench.normalise_task("count", COUNT, cfg)
    assert [(e["choices"], e["label"], e["target"]) for e in count[:2]] == [(None, None, "1"), (None, None, "2")]
    plain = bigbench.normalise_task("color/hex", COLORS, config(sdist, append_choices=False, task_prefix=False))[0]
    assert plain["input"] == "hex #000000"


def test_build_writes_a_fixed_disjoint_split_and_caches_it(sdist, tmp_path):
    cfg = config(sdist)
    train_path, test_path = bigbench.build(cfg)
    train, test = read(train_path), read(test_path)
    for task, total in (("yesno", 10), ("color/hex", 8), ("count", 6)):
        task_train = [e for e in train if e["task"] == task]
        task_test = [e for e in test if e["task"] == task]
        assert len(task_test) == 3 and len(task_train) == total - 3
        assert not {e["input"] for e in task_train} & {e["input"] for e in task_test}
    # only the chosen tasks were extracted, into the cache
    extracted = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("task.json"))
    assert [str(p) for p in extracted] == [
        "bigbench/tasks-1.0.0/color/hex/task.json",
        "bigbench/tasks-1.0.0/count/task.json",
        "bigbench/tasks-1.0.0/yesno/task.json",
    ]
    # same settings: same files, not rebuilt; another seed: another split
    stamp = train_path.stat().st_mtime_ns
    assert bigbench.build(cfg) == (train_path, test_path) and train_path.stat().st_mtime_ns == stamp
    _, other_test = bigbench.build(config(sdist, split_seed=1))
    assert other_test != test_path and read(other_test) != test


def test_data_train_bigbench_loads_through_the_builder(sdist):
    train, test = load_examples(DataConfig(train="bigbench", bigbench=config(sdist, tasks=["yesno", "count"])))
    assert {e.task for e in train} == {"yesno", "count"} and len(test) == 6
    assert all(e.choices[e.label] == e.target for e in train if e.choices)


def test_an_unknown_task_is_named(sdist):
    with pytest.raises(AssetError, match=r"data.bigbench.tasks: nope not found in bigbench-1.0.0.tar.gz"):
        bigbench.build(config(sdist, tasks=["yesno", "nope"]))
