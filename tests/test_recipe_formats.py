"""Row formats beyond lomix's columns (chat messages, prompt/completion, Alpaca, raw text), Parquet and
Arrow files, the held-out split of data.validation=auto, and the truncation count."""

from __future__ import annotations

import pytest
from tiny_assets import make_model_dir, write_jsonl

from lomix.recipes.config import DataConfig
from lomix.recipes.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Formatter,
    Truncation,
    load_examples,
    load_test_examples,
    task_set,
    tokenize,
)

CONVERSATION = [
    {"role": "system", "content": "answer briefly"},
    {"role": "user", "content": "repeat apple"},
    {"role": "assistant", "content": "apple"},
    {"role": "user", "content": "repeat river"},
    {"role": "assistant", "content": "river"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model_dir(tmp_path_factory.mktemp("tiny") / "model"))


def cfg(train, test=None, **kwargs) -> DataConfig:
    return DataConfig(train=str(train), test=str(test) if test else None, **kwargs)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_messages_learn_the_assistant_turns_only(tmp_path, tokenizer):
    (example,) = load_examples(cfg(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])))[0]
    assert example.messages == CONVERSATION and example.input == "repeat river" and example.target == "river"
    formatter = Formatter(tokenizer, DataConfig(train="chat.jsonl"))
    (feature,) = tokenize([example], formatter, task_set([example], formatter.cfg))
    # Hand-built from ChatML: masked header and turns, then each answer with its end-of-turn marker.
    pieces = [
        ("<|im_start|>system\nanswer briefly<|im_end|>\n<|im_start|>user\nrepeat apple<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("apple<|im_end|>", True),
        ("\n<|im_start|>user\nrepeat river<|im_end|>\n<|im_start|>assistant\n", False),
        ("river<|im_end|>", True),
    ]
    expected_ids = [i for text, _ in pieces for i in ids(tokenizer, text)]
    expected_labels = [i if learned else IGNORE_INDEX for text, learned in pieces for i in ids(tokenizer, text)]
    assert feature["input_ids"] == expected_ids
    assert feature["labels"] == expected_labels
    # Evaluation prompts with the conversation up to its last answer and compares with that answer.
    prompt, answer = formatter.render(example, example.target)
    assert prompt == "".join(text for text, _ in pieces[:4]) and answer == "river<|im_end|>"


def test_a_long_conversation_loses_its_start_and_is_counted(tokenizer):
    example = Example("t", "", target="river", messages=CONVERSATION)
    formatter = Formatter(tokenizer, DataConfig(train="chat.jsonl", max_length=12))
    whole = tokenize(
        [example], Formatter(tokenizer, DataConfig(train="chat.jsonl")), task_set([example], formatter.cfg)
    )
    truncation = Truncation()
    (feature,) = tokenize([example], formatter, task_set([example], formatter.cfg), truncation)
    assert feature["input_ids"] == whole[0]["input_ids"][-12:] and feature["labels"] == whole[0]["labels"][-12:]
    assert truncation.examples == 1 and truncation.cut == {0} and truncation.prompts + truncation.targets == 1


def test_messages_need_a_chat_template(tokenizer):
    example = Example("t", "", target="river", messages=CONVERSATION)
    formatter = Formatter(tokenizer, DataConfig(train="chat.jsonl", chat_template=False))
    with pytest.raises(DataError, match=r"data.format: conversation rows .* need a chat template, but data.chat_templ"):
        tokenize([example], formatter, task_set([example], formatter.cfg))


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "bot", "content": "hi"}], "role 'bot'"),
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "starts with an assistant"),
        ("hello", "non-empty list"),
    ],
)
def test_bad_conversations_are_named(tmp_path, messages, words):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=rf"^data.train: .*chat.jsonl row 1: .*{words}"):
        load_examples(cfg(path))


def test_prompt_completion_rows_in_both_of_trls_forms(tmp_path):
    rows = [
        {"prompt": "repeat apple", "completion": "apple"},
        {
            "prompt": [{"role": "user", "content": "repeat river"}],
            "completion": [{"role": "assistant", "content": "r"}],
        },
    ]
    plain, conversational = (
        load_examples(cfg(write_jsonl(tmp_path / f"{i}.jsonl", [r])))[0][0] for i, r in enumerate(rows)
    )
    assert (plain.input, plain.target, plain.messages) == ("repeat apple", "apple", None)
    assert conversational.messages == rows[1]["prompt"] + rows[1]["completion"] and conversational.target == "r"


def test_alpaca_rows_use_their_input_only_when_it_has_text(tmp_path):
    rows = [
        {"instruction": "Name a color.", "input": "", "output": "red"},
        {"instruction": "Repeat the word.", "input": "apple", "output": "apple"},
    ]
    train, _ = load_examples(cfg(write_jsonl(tmp_path / "alpaca.jsonl", rows)))
    assert [(e.input, e.target) for e in train] == [("Name a color.", "red"), ("Repeat the word.\n\napple", "apple")]


def test_a_format_set_explicitly_names_the_column_it_misses(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "x", "target": "y"}])
    with pytest.raises(DataError, match=r"has no column 'messages' that data.format=messages needs; its columns"):
        load_examples(cfg(path, format="messages"))


def test_raw_text_learns_every_token_and_counts_what_max_length_cuts(tmp_path, tokenizer):
    rows = [{"text": "apple river stone " * 6}, {"text": "cloud"}]
    train, _ = load_examples(cfg(write_jsonl(tmp_path / "text.jsonl", rows)))
    assert all(e.is_text for e in train)
    formatter = Formatter(tokenizer, DataConfig(train="text.jsonl", max_length=10))
    truncation = Truncation()
    features = tokenize(train, formatter, task_set(train, formatter.cfg), truncation)
    eos = tokenizer.eos_token_id
    assert features[0]["input_ids"] == ids(tokenizer, rows[0]["text"])[:10]
    assert features[1]["input_ids"] == [*ids(tokenizer, "cloud"), eos]
    assert all(f["labels"] == f["input_ids"] for f in features)
    assert (truncation.examples, truncation.texts, truncation.cut) == (2, 1, {0})


def test_packing_cuts_each_tasks_concatenated_texts_into_blocks(tokenizer):
    examples = [Example("a", t, text=t) for t in ("apple river", "stone cloud tiger", "piano")]
    examples.append(Example("b", "lemon storm", text="lemon storm"))
    formatter = Formatter(tokenizer, DataConfig(train="text.jsonl", max_length=8, packing=True))
    tasks = task_set(examples, formatter.cfg)
    truncation = Truncation()
    features = tokenize(examples, formatter, tasks, truncation)
    eos = tokenizer.eos_token_id
    stream_a = [i for t in ("apple river", "stone cloud tiger", "piano") for i in [*ids(tokenizer, t), eos]]
    blocks_a = [stream_a[s : s + 8] for s in range(0, len(stream_a), 8)]
    assert [f["input_ids"] for f in features if f["task_id"] == tasks.id("a")] == blocks_a
    stream_b = [*ids(tokenizer, "lemon storm"), eos]
    assert len(stream_b) > 8  # a second block with the rest
    assert [f["input_ids"] for f in features if f["task_id"] == tasks.id("b")] == [stream_b[:8], stream_b[8:]]
    assert all(f["labels"] == f["input_ids"] for f in features) and not truncation.cut


def test_truncation_is_reported_and_refused_above_the_threshold(tokenizer):
    long = Example("t", "apple river stone " * 10, target="cloud")
    short = Example("t", "apple", target="cloud")
    for limit, expect_error in ((0.5, False), (0.4, True)):
        data = DataConfig(train="t.jsonl", max_length=12, max_truncated=limit, chat_template=False)
        formatter = Formatter(tokenizer, data)
        truncation = Truncation()
        tokenize([long, short], formatter, task_set([long], data), truncation)
        assert (truncation.examples, truncation.prompts, truncation.targets) == (2, 1, 0)
        if expect_error:
            with pytest.raises(DataError, match=r"^data.max_length: .*cut 1 of 2 .*above data.max_truncated=0.4"):
                truncation.report(data)
        else:
            assert truncation.report(data) == "lomix: data.max_length=12 cut 1 of 2 training examples (50%: 1 prompts)"
    assert Truncation(examples=3).report(DataConfig(train="t.jsonl")) is None


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_parquet_and_arrow_files_are_read(tmp_path, suffix):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"task": "a", "input": "x", "target": "y"}, {"task": "b", "input": "p", "choices": ["q", "r"], "label": 1}]
    rows = [{"task": r["task"], "input": r["input"], "target": r.get("target"), "choices": r.get("choices"),
             "label": r.get("label")} for r in rows]  # fmt: skip
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
        (tmp_path / "saved" / "data-00000-of-00001.arrow").rename(path)
    train, _ = load_examples(cfg(path))
    assert [(e.task, e.input, e.target, e.choices, e.label) for e in train] == [
        ("a", "x", "y", None, None),
        ("b", "p", "r", ["q", "r"], 1),
    ]


def test_validation_auto_holds_out_a_seeded_share_of_each_task(tmp_path):
    rows = [{"task": t, "input": f"{t} {i}", "target": "y"} for t in ("a", "b") for i in range(10)]
    rows.append({"task": "c", "input": "c 0", "target": "y"})  # one row: nothing to hold out of it
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert load_examples(cfg(path))[1] is None
    data = cfg(path, validation="auto", validation_fraction=0.2, validation_seed=3)
    train, test = load_examples(data)
    assert sorted(e.task for e in test) == ["a", "a", "b", "b"]
    inputs = [r["input"] for r in rows]
    assert sorted(e.input for e in train + test) == sorted(inputs)  # disjoint and complete
    assert [e.input for e in train] == [i for i in inputs if i in {e.input for e in train}]  # file order
    assert [e.input for e in load_test_examples(data)] == [e.input for e in test]  # eval sees the same rows
    other = load_examples(cfg(path, validation="auto", validation_fraction=0.2, validation_seed=4))[1]
    assert [e.input for e in load_examples(data)[1]] == [e.input for e in test]
    assert {e.input for e in other} != {e.input for e in test}


def test_a_hub_dataset_without_a_test_split(monkeypatch):
    import datasets

    def fake_load(source, subset=None, split=None, **kwargs):
        if split != "train":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train'].")
        return datasets.Dataset.from_list([{"input": f"q{i}", "target": "a"} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(
        DataError, match=r"^data.test: hub dataset 'someone/data' has no split 'test' .*data.validation=auto"
    ):
        load_examples(DataConfig(train="someone/data"))
    train, test = load_examples(DataConfig(train="someone/data", validation="auto"))
    assert len(train) == 9 and len(test) == 1
    assert [e.input for e in load_test_examples(DataConfig(train="someone/data", validation="auto"))] == [test[0].input]


def test_training_reports_the_cut_examples_and_stops_above_the_threshold(tmp_path, run_recipe, capsys):
    from tiny_assets import run_assets, tiny_config

    from lomix.recipes.config import build_config

    root, model, train, _ = run_assets(tmp_path)
    short = {"max_length": 12}  # every tiny prompt with its chat header is longer

    def config(name, **data):
        cfg = tiny_config(root, model, train, None, data=data, output_dir=str(root / name))
        cfg["train"].update(max_steps=1, batch_size=4, warmup_steps=0)
        return build_config(cfg)

    with pytest.raises(DataError, match=r"^data.max_length: data.max_length=12 cut 24 of 24 training examples"):
        run_recipe(config("refused", **short))
    capsys.readouterr()
    run_recipe(config("accepted", **short, max_truncated=1.0))
    assert "lomix: data.max_length=12 cut 24 of 24 training examples (100%: 24 prompts)" in capsys.readouterr().out
