"""``lomix generate`` and ``lomix chat`` on a tiny task-routed run, against ``model.generate`` on the
run's mixture loaded by hand (the prompt built with the tokenizer's chat template, as the run trained)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_jsonl
from typer.testing import CliRunner

import lomix
from lomix.cli.app import app

NEW = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run of a task-routed mixture (Poly: one routing row per task) on the tiny Llama."""
    from accelerate.state import AcceleratorState

    from lomix.recipes import finetune
    from lomix.recipes.config import build_config

    root = tmp_path_factory.mktemp("infer")
    model_dir = make_model_dir(root / "model")
    train = write_jsonl(root / "train.jsonl", tiny_rows(0, 6))
    config = tiny_config(root, model_dir, train, None, train={"max_steps": 3, "batch_size": 4, "lr": 5e-2})
    config["router"] = {"name": "poly"}
    config["mixture"]["balance"] = {"switch": 0.0}
    config["eval"] = {"after_training": False}  # no test set: nothing to evaluate
    try:
        finetune.run(build_config(config))
    finally:
        AcceleratorState._reset_state(True)
    return root / "run", model_dir


@pytest.fixture(scope="module")
def reference(run):
    """(model, tokenizer, tasks) loaded by hand: the base from its folder, the run's mixture into it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, model_dir = run
    model = lomix.load(AutoModelForCausalLM.from_pretrained(str(model_dir)), run_dir / "mixture").eval()
    tasks = json.loads((run_dir / "tasks.json").read_text())["tasks"]
    return model, AutoTokenizer.from_pretrained(str(model_dir)), tasks


def _expected(reference, messages: list[dict], task: str, **sampling) -> tuple[str, int]:
    model, tokenizer, tasks = reference
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with lomix.routing_context(model, task_ids=[tasks.index(task)]):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            do_sample=bool(sampling),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
            **sampling,
        )
    new = out[0, ids.shape[1] :].tolist()
    end = next((i for i, t in enumerate(new) if t in (tokenizer.eos_token_id, tokenizer.pad_token_id)), len(new))
    return tokenizer.decode(new[:end], skip_special_tokens=True), end


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_generate_answers_jsonl_rows_in_batches_like_model_generate(run, reference, tmp_path):
    run_dir, _ = run
    rows = [
        {"prompt": "repeat apple", "task": "echo", "id": 1},
        {"prompt": "is 12 even or odd", "task": "parity"},
        {"prompt": "color number 2 5", "task": "color"},
    ]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["generate", str(run_dir), "--input", str(source), "--out", str(out), "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", str(NEW)])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k not in ("completion", "new_tokens")} for w in written] == rows
    for row, got in zip(rows, written, strict=True):
        text, count = _expected(reference, _user(row["prompt"]), row["task"])
        assert (got["completion"], got["new_tokens"]) == (text, count)
    assert any(w["new_tokens"] for w in written)


def test_generate_takes_the_mixture_folder_a_task_id_and_samples_reproducibly(run, reference):
    run_dir, _ = run
    _, _, tasks = reference
    common = ["--prompt", "repeat river", "--task", str(tasks.index("echo")), "--max-new-tokens", str(NEW)]
    sampling = ["--sample", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    result = CliRunner().invoke(app, ["generate", str(run_dir / "mixture"), *common, *sampling])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    torch.manual_seed(3)
    text, count = _expected(reference, _user("repeat river"), "echo", temperature=0.7, top_k=20, top_p=0.9)
    assert (row["prompt"], row["completion"], row["new_tokens"]) == ("repeat river", text, count)


def test_generate_refuses_a_missing_or_unknown_task_in_one_line(run):
    run_dir, _ = run
    missing = CliRunner().invoke(app, ["generate", str(run_dir), "--prompt", "repeat apple"])
    assert missing.exit_code == 2 and "--task: this run's router routes by task" in missing.stderr
    unknown = CliRunner().invoke(app, ["generate", str(run_dir), "--prompt", "x", "--task", "poetry"])
    assert unknown.exit_code == 2 and "unknown task 'poetry'" in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].startswith("error: --task: unknown task 'poetry'; this run's")


def test_chat_streams_answers_keeps_the_conversation_and_resets(run, reference, monkeypatch):
    from lomix.recipes import inference

    run_dir, _ = run
    _, tokenizer, _ = reference
    prompts = []  # the token ids chat asks an answer for
    generate = inference.generate

    def recording(loaded, ids, *args, **kwargs):
        prompts.append(ids[0])
        return generate(loaded, ids, *args, **kwargs)

    monkeypatch.setattr(inference, "generate", recording)
    lines = "repeat apple\nrepeat river\n/reset\nrepeat apple\n/exit\nnever read\n"
    args = ["chat", str(run_dir), "--task", "echo", "--max-new-tokens", str(NEW)]
    result = CliRunner().invoke(app, args, input=lines)
    assert result.exit_code == 0, result.output
    first, _ = _expected(reference, _user("repeat apple"), "echo")
    history = [*_user("repeat apple"), {"role": "assistant", "content": first}, *_user("repeat river")]
    second, _ = _expected(reference, history, "echo")
    assert result.stdout == f"{first}\n{second}\n{first}\n"  # streamed; after /reset the first answer again
    # the second prompt is the whole conversation, the third a new one
    template = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert prompts[1] == tokenizer(template, add_special_tokens=False)["input_ids"]
    assert len(prompts) == 3 and prompts[2] == prompts[0] and len(prompts[1]) > len(prompts[0])
    assert "/reset" in result.stderr and "(new conversation)" in result.stderr


def test_generate_routes_each_row_by_its_task_and_description(run, reference, tmp_path, monkeypatch):
    run_dir, _ = run
    _, _, tasks = reference
    descriptions = json.loads((run_dir / "tasks.json").read_text())["descriptions"]
    seen = []
    routing_context = lomix.routing_context

    def recording(model, **fields):
        seen.append(fields)
        return routing_context(model, **fields)

    monkeypatch.setattr(lomix, "routing_context", recording)
    rows = [{"prompt": "repeat apple", "task_description": "say the word again"}, {"prompt": "is 4 even or odd"}]
    source = write_jsonl(tmp_path / "prompts.jsonl", rows)
    args = ["generate", str(run_dir), "--input", str(source), "--task", "parity", "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == [
        {
            "task_ids": [tasks.index("parity")] * 2,
            "task_descriptions": ["say the word again", descriptions["parity"]],
        }
    ]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "task": "echo"}, {"prompt": "b"}])
    refused = CliRunner().invoke(app, ["generate", str(run_dir), "--input", str(mixed)])
    assert refused.exit_code == 2 and "--task: this run's router routes by task" in refused.stderr


def test_rows_must_agree_on_what_they_route_by():
    """A run whose router takes task ids but does not need them: some rows with a task, some without, is refused."""
    from types import SimpleNamespace

    from lomix.recipes.data import TaskSet
    from lomix.recipes.inference import GenerationOptions, generate_rows

    router = SimpleNamespace(task_rows=[])
    fake = SimpleNamespace(
        tasks=TaskSet(["a", "b"], {"a": "a", "b": "b"}),
        model=SimpleNamespace(lomix_state=SimpleNamespace(config=SimpleNamespace(router=router))),
    )
    rows = [{"prompt": "x", "task": "b"}, {"prompt": "y"}]
    with pytest.raises(lomix.ConfigError, match="rows differ in what they route by"):
        next(generate_rows(fake, rows, GenerationOptions(), None, 2))
    with pytest.raises(lomix.ConfigError, match="row 1: task: unknown task 'c'"):
        next(generate_rows(fake, [{"prompt": "x", "task": "c"}], GenerationOptions(), None, 2))
