"""Recipe data: reading, normalisation, clear errors on bad data, prompts, masks and batches."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_assets import CHATML, make_model_dir, tiny_rows, write_jsonl

from lomix.recipes.config import DataConfig
from lomix.recipes.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    EpochSampler,
    Example,
    Formatter,
    load_examples,
    task_set,
    tokenize,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def cfg(train, test=None, **kwargs) -> DataConfig:
    return DataConfig(train=str(train), test=str(test) if test else None, **kwargs)


def test_jsonl_rows_become_examples(tmp_path):
    rows = tiny_rows(0, 4)
    train, test = load_examples(cfg(write_jsonl(tmp_path / "tr.jsonl", rows), write_jsonl(tmp_path / "te.jsonl", rows)))
    assert len(train) == len(rows) and len(test) == len(rows)
    for example, row in zip(train, rows, strict=True):
        assert example.task == row["task"] and example.input == row["input"]
        if "choices" in row:
            assert example.choices == row["choices"] and example.label == row["label"]
            assert example.target == row["choices"][row["label"]]
        else:
            assert example.choices is None and example.target == row["target"]


def test_csv_with_mapped_columns_json_choices_and_text_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "question,options,answer,kind\n"
        '"2+2?","[""3"", ""4""]",4,math\n'
        '"capital of France?","[""Paris"", ""Rome""]",Rome,geo\n'
    )
    columns = {"input": "question", "choices": "options", "label": "answer", "task": "kind"}
    from lomix.recipes.config import ColumnsConfig

    train, test = load_examples(cfg(path, columns=ColumnsConfig(**columns)))
    assert test is None
    # A text label names its choice ("4" is the second choice's text, not an index).
    assert [(e.task, e.choices, e.label) for e in train] == [("math", ["3", "4"], 1), ("geo", ["Paris", "Rome"], 1)]


def test_rows_without_a_task_column_belong_to_data_task(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "hi", "target": "hello"}])
    (train, _) = load_examples(cfg(path, task="greet"))
    assert train[0].task == "greet"


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([{"question": "x", "target": "y"}], ["no column 'input'", "data.columns.input", "question, target"]),
        ([{"input": "x", "choices": ["a", "b"]}], ["no column 'label'", "data.columns.label"]),
        ([{"input": "x", "answer": "y"}], ["neither", "data.columns.target", "answer, input"]),
        ([{"input": "x", "choices": ["a", "b", "c"], "label": 3}], ["row 1", "label 3 is out of range for 3 choices"]),
        ([{"input": "x", "choices": ["a", "b"], "label": -1}], ["row 1", "out of range"]),
        ([{"input": "x", "choices": "a|b", "label": 0}], ["row 1", "choices must be a list"]),
        ([{"input": "", "target": "y"}], ["row 1", "non-empty"]),
    ],
)
def test_bad_training_data_is_named(tmp_path, rows, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_examples(cfg(path))
    message = str(info.value)
    assert message.startswith("data.train: ") and str(path) in message
    for word in words:
        assert word in message


def test_an_empty_file_and_a_missing_file_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"data.train: .*empty.jsonl is empty; it holds no examples"):
        load_examples(cfg(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match=r"data.train: no such file: .*missing.jsonl"):
        load_examples(cfg(tmp_path / "missing.jsonl"))


def test_a_test_task_unknown_to_training_is_rejected(tmp_path):
    train = write_jsonl(tmp_path / "tr.jsonl", [{"task": "a", "input": "x", "target": "y"}])
    test = write_jsonl(
        tmp_path / "te.jsonl",
        [{"task": "a", "input": "x", "target": "y"}, {"task": "zeta", "input": "x", "target": "y"}],
    )
    with pytest.raises(DataError, match=r"data.test: tasks 'zeta' are not in the training data \(training tasks: a\)"):
        load_examples(cfg(train, test))


def test_bad_test_data_is_named_as_test(tmp_path):
    train = write_jsonl(tmp_path / "tr.jsonl", [{"task": "a", "input": "x", "choices": ["p", "q"], "label": 0}])
    test = write_jsonl(tmp_path / "te.jsonl", [{"task": "a", "input": "x", "choices": ["p", "q"], "label": 2}])
    with pytest.raises(DataError, match=r"^data.test: .*row 1: label 2 is out of range for 2 choices"):
        load_examples(cfg(train, test))


def test_task_ids_follow_sorted_names_and_descriptions_fall_back(tmp_path):
    examples = [Example("b", "x", target="y"), Example("a", "x", target="y", description="about a")]
    tasks = task_set(examples, DataConfig(train="t.jsonl", task_descriptions={"b": "custom b"}))
    assert tasks.names == ["a", "b"] and tasks.id("b") == 1
    assert tasks.descriptions == {"a": "about a", "b": "custom b"}
    assert task_set([Example("c", "x", target="y")], DataConfig(train="t.jsonl")).descriptions == {"c": "c"}


def test_chat_prompts_mask_everything_but_the_answer_and_end_of_turn(tokenizer):
    assert tokenizer.chat_template == CHATML
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl", system_prompt=""))
    example = Example("parity", "is 3 even or odd", choices=["even", "odd"], label=1, target="odd")
    prompt, answer = formatter.render(example, "odd")
    assert prompt == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nis 3 even or odd<|im_end|>\n<|im_start|>assistant\n"
    )
    assert answer == "odd<|im_end|>"
    tasks = task_set([example], formatter.cfg)
    (feature,) = tokenize([example], formatter, tasks)
    kept = [t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "odd<|im_end|>"
    assert tokenizer.decode(feature["input_ids"]) == prompt + answer


def test_without_a_chat_template_the_answer_ends_with_eos(tokenizer):
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl", chat_template=False, prompt_template="Q: {input}"))
    prompt, answer = formatter.render(Example("t", "2+2", target="4"), "4")
    assert prompt == "Q: 2+2\n" and answer == "4" + tokenizer.eos_token


def test_long_prompts_are_cut_from_the_left_keeping_the_answer(tokenizer):
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl", max_length=12))
    example = Example("t", " ".join(["apple river stone"] * 20), target="cloud")
    prompt_ids, answer_ids = formatter.encode(example, "cloud")
    assert len(prompt_ids) + len(answer_ids) == 12
    assert tokenizer.decode(answer_ids) == "cloud<|im_end|>"
    full_prompt = tokenizer(formatter.render(example, "cloud")[0], add_special_tokens=False)["input_ids"]
    assert prompt_ids == full_prompt[-len(prompt_ids) :]


def test_collator_pads_left_and_carries_routing_fields():
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "task_id": 1, "description": "b"},
        {"input_ids": [8], "labels": [8], "task_id": 0, "description": "a"},
    ]
    batch = Collator(pad_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    assert batch["task_ids"].tolist() == [1, 0] and batch["task_descriptions"] == ["b", "a"]


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=3, keep=8)
    first = list(sampler)
    assert len(first) == 8 == len(sampler) and len(set(first)) == 8
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    again = EpochSampler(10, seed=3, keep=8)
    again.set_epoch(1)
    assert list(again) == second
    torch.manual_seed(123)  # the global RNG plays no part
    again.set_epoch(0)
    assert list(again) == first


def test_grouping_by_length_sorts_within_runs_of_global_batches():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0, 11, 10]
    plain = list(EpochSampler(12, seed=0))
    sampler = EpochSampler(12, seed=0, lengths=lengths, group=2, batch=3)
    grouped = list(sampler)
    assert sorted(grouped) == list(range(12))
    for start in (0, 6):  # each run of 2 batches of 3 holds the same rows as the plain order, sorted
        run = grouped[start : start + 6]
        assert set(run) == set(plain[start : start + 6])
        batches = [run[:3], run[3:]]
        low, high = sorted(batches, key=lambda b: max(lengths[i] for i in b))
        assert max(lengths[i] for i in low) <= min(lengths[i] for i in high)
    assert grouped == list(EpochSampler(12, seed=0, lengths=lengths, group=2, batch=3))


def test_hub_ids_are_loaded_through_datasets(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load(source, subset=None, split=None, **kwargs):
        calls.append((source, subset, split))
        return datasets.Dataset.from_list([{"input": f"{split} q", "target": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, test = load_examples(DataConfig(train="someone/dataset", subset="en", test_split="validation"))
    assert calls == [("someone/dataset", "en", "train"), ("someone/dataset", "en", "validation")]
    assert train[0].input == "train q" and test[0].input == "validation q"


def test_data_file_rows_are_json_roundtrippable(tmp_path):
    # Sanity of the fixture writer the other recipe tests rely on.
    rows = tiny_rows(1, 2)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
