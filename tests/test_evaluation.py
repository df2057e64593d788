"""The evaluation recipe: choice scoring against a plain forward, metrics through evaluate, baselines."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_experts
from tiny_assets import make_model_dir

import lomix
from lomix.errors import ConfigError
from lomix.recipes import evaluation
from lomix.recipes.config import DataConfig, EvalConfig
from lomix.recipes.data import Example, Formatter, TaskSet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4))
    randomize_experts(model, std=0.5)
    return model, tokenizer


def reference_scores(model, tokenizer, formatter, example, task_id=1):
    """Independent reference: each choice as one full sequence, log-probs summed by hand."""
    scores = []
    for choice in example.choices:
        prompt, answer = formatter.render(example, choice)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logprobs = model(input_ids=ids, task_ids=[task_id]).logits[0].log_softmax(-1)
        scores.append(sum(float(logprobs[len(prompt_ids) + i - 1, t]) for i, t in enumerate(answer_ids)))
    return scores


@pytest.mark.parametrize("reuse", [True, False])
def test_choice_scores_equal_summed_log_likelihood_of_a_plain_forward(tiny, reuse):
    model, tokenizer = tiny
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl"))
    example = Example("color", "color number 2 7", choices=["red", "green", "blue stone river"], label=2)
    scores = evaluation.score_choices(model, formatter, example, 1, "color", reuse_prompt_cache=reuse)
    expected = reference_scores(model, tokenizer, formatter, example)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 3) for s in scores)) == 3  # the mixture makes them differ


@pytest.mark.parametrize("reuse", [True, False])
def test_a_batch_of_prompts_of_different_lengths_scores_like_each_alone(tiny, reuse):
    model, tokenizer = tiny
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl"))
    items = [
        (Example("color", "color number 2 7", choices=["red", "green", "blue"], label=0), 0, "colors"),
        (Example("parity", "is 12 even or odd " * 4, choices=["even", "odd stone"], label=0), 1, "parity"),
        (Example("color", "hi", choices=["apple river", "red", "green", "blue"], label=0), 0, "colors"),
    ]
    batched = evaluation.score_batch(model, formatter, items, reuse_prompt_cache=reuse)
    for (example, task_id, _), scores in zip(items, batched, strict=True):
        alone = reference_scores(model, tokenizer, formatter, example, task_id)
        assert scores == pytest.approx(alone, abs=1e-4)


def test_evaluate_model_reports_accuracy_exact_match_and_baselines(tiny):
    model, tokenizer = tiny
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl"))
    tasks = TaskSet(["color", "echo"], {"color": "colors", "echo": "echo"})
    examples = [
        Example(
            "color",
            f"color number {i}",
            choices=["red", "green", "blue"],
            label=i % 3,
            target=["red", "green", "blue"][i % 3],
        )
        for i in range(5)
    ] + [Example("echo", f"repeat {w}", target=w) for w in ["apple", "apple", "river"]]
    results = evaluation.evaluate_model(model, formatter, examples, tasks, EvalConfig(max_new_tokens=3), progress=False)
    # independent recomputation of accuracy from the reference scorer
    hits = 0
    for example in examples[:5]:
        scores = reference_scores(model, tokenizer, formatter, example)
        hits += max(range(3), key=scores.__getitem__) == example.label
    color, echo = results["tasks"]["color"], results["tasks"]["echo"]
    assert color["metric"] == "accuracy" and color["score"] == pytest.approx(hits / 5)
    assert color["chance"] == pytest.approx(1 / 3) and color["majority"] == pytest.approx(2 / 5)
    assert echo["metric"] == "exact_match" and echo["chance"] is None and echo["majority"] == pytest.approx(2 / 3)
    assert 0.0 <= echo["score"] <= 1.0 and echo["n"] == 3
    assert results["mean"]["score"] == pytest.approx((color["score"] + echo["score"]) / 2)
    assert results["mean"]["chance"] is None  # not every task has a chance level


def test_max_examples_per_task_keeps_the_first_ones():
    examples = [Example("a", str(i), target="x") for i in range(5)] + [Example("b", "z", target="y")]
    chosen = evaluation.select_examples(examples, EvalConfig(max_examples_per_task=2))
    assert [(e.task, e.input) for e in chosen] == [("a", "0"), ("a", "1"), ("b", "z")]


def test_shipped_metrics_are_loaded_by_absolute_path_and_compute_like_a_hand_count(tmp_path):
    path = evaluation.resolve_metric("accuracy")
    assert path == str(evaluation.METRICS_DIR / "accuracy") and evaluation.METRICS_DIR.is_absolute()
    predictions, references = [0, 2, 1, 1, 0], [0, 1, 1, 1, 2]
    accuracy = evaluation.load_metric("accuracy", "eval.accuracy_metric")
    expected = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)
    assert accuracy.compute(predictions=predictions, references=references) == {"accuracy": expected}
    exact = evaluation.load_metric("exact_match", "eval.exact_match_metric")
    assert exact.compute(predictions=[" three", "4", "Five"], references=["three", "four", "five"]) == {
        "exact_match": 1 / 3
    }
    assert evaluation.shipped_metrics() == ["accuracy", "exact_match"]


def test_metric_names_resolve_to_folders_or_stay_bare_for_the_hub(tmp_path, monkeypatch):
    folder = tmp_path / "my_metric"
    folder.mkdir()
    assert evaluation.resolve_metric(str(folder)) == str(folder.resolve())
    assert evaluation.resolve_metric("bleu") == "bleu"  # not shipped: evaluate fetches it online
    import evaluate

    seen = []
    monkeypatch.setattr(evaluate, "load", lambda name: seen.append(name) or "metric")
    assert evaluation.load_metric("bleu", "eval.accuracy_metric") == "metric" and seen == ["bleu"]


def test_an_unloadable_bare_metric_says_it_needs_the_network(monkeypatch):
    import evaluate

    def offline(name):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(evaluate, "load", offline)
    with pytest.raises(ConfigError) as info:
        evaluation.load_metric("bleu", "eval.accuracy_metric")
    assert info.value.field == "eval.accuracy_metric"
    assert "lomix ships: accuracy, exact_match" in str(info.value) and "needs the network" in str(info.value)


def test_results_table_has_a_row_per_task_and_the_mean():
    before = {
        "tasks": {"a": {"metric": "accuracy", "score": 0.25, "n": 4, "chance": 0.5, "majority": 0.75}},
        "mean": {"score": 0.25, "n": 4, "chance": 0.5, "majority": 0.75},
    }
    after = {"tasks": {"a": {**before["tasks"]["a"], "score": 0.75}}, "mean": {**before["mean"], "score": 0.75}}
    table = evaluation.results_table({"base": before, "mixture": after}).splitlines()
    assert table[0] == "| task | metric | n | chance | majority | base | mixture | change |"
    assert table[2] == "| a | accuracy | 4 | 0.500 | 0.750 | 0.250 | 0.750 | +0.500 |"
    assert table[3].startswith("| **mean** |") and table[3].endswith("| 0.250 | 0.750 | +0.500 |")


@pytest.fixture(scope="module")
def tiny_mamba(tiny):
    """A config-built 2-layer Mamba with the tiny tokenizer, wrapped on in_proj and out_proj."""
    from transformers import MambaConfig, MambaForCausalLM

    _, tokenizer = tiny
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
        time_step_rank=4, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = MambaForCausalLM(config).eval()
    lomix.inject(model, lomix.MixtureConfig(target_modules=["in_proj", "out_proj"], num_experts=4))
    randomize_experts(model, std=0.5)
    return model, tokenizer


def test_a_mamba_cache_falls_back_to_scoring_whole_sequences(tiny_mamba):
    """Issue 25, item 8: Mamba's cache layers lack batch_select_indices; with the default
    (reuse_prompt_cache=True) scoring crashed. It now scores each choice as a whole sequence."""
    model, tokenizer = tiny_mamba
    prompt = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert not evaluation.rows_selectable(prompt.cache)  # the case this test is about
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl"))
    items = [
        (Example("color", "color number 2 7", choices=["red", "green", "blue"], label=0), 0, "colors"),
        (Example("parity", "is 12 even or odd " * 3, choices=["even", "odd stone"], label=0), 1, "parity"),
    ]
    batched = evaluation.score_batch(model, formatter, items)  # the default: reuse requested
    for (example, task_id, _), scores in zip(items, batched, strict=True):
        assert scores == pytest.approx(reference_scores(model, tokenizer, formatter, example, task_id), abs=1e-4)
    tasks = TaskSet(["color", "parity"], {"color": "colors", "parity": "parity"})
    examples = [example for example, _, _ in items]
    results = evaluation.evaluate_model(model, formatter, examples, tasks, EvalConfig(max_new_tokens=2), progress=False)
    assert results["tasks"]["color"]["n"] == 1 and results["tasks"]["parity"]["n"] == 1


def test_rerouted_evaluation_fits_offsets_per_prompt_and_leaves_the_model_as_it_was(tiny):
    model, tokenizer = tiny
    formatter = Formatter(tokenizer, DataConfig(train="t.jsonl"))
    example = Example("color", "color number 2 7", choices=["red", "green", "blue stone river"], label=2)
    cfg = EvalConfig(reroute_steps=3, reroute_lr=0.5, max_new_tokens=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = reference_scores(model, tokenizer, formatter, example)
    scores = evaluation.score_rerouted(model, formatter, (example, 1, "color"), cfg, reuse_cache=True)
    # reference: the full-sequence scorer inside offsets fitted by hand on the same prompt
    prompt = torch.tensor([formatter.encode(example, None)[0]])
    with lomix.reroute.rerouted(
        model, prompt, steps=3, lr=0.5, task_ids=torch.tensor([1]), task_descriptions=["color"]
    ):
        expected = reference_scores(model, tokenizer, formatter, example)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert scores != pytest.approx(plain, abs=1e-4)  # the offsets changed the routing
    echo = Example("echo", "repeat apple", target="apple")
    text = evaluation.generate_answer(model, formatter, echo, 0, "echo", 4, cfg)
    ids = torch.tensor([formatter.encode(echo, None)[0]])
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    with lomix.reroute.rerouted(model, ids, steps=3, lr=0.5):
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop)  # fmt: skip
    assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert reference_scores(model, tokenizer, formatter, example) == plain


def test_reroute_settings_are_checked_with_the_field_named():
    with pytest.raises(ConfigError, match=r"eval\.reroute_steps"):
        EvalConfig(reroute_steps=-1)
    with pytest.raises(ConfigError, match=r"eval\.reroute_lr"):
        EvalConfig(reroute_lr=0.0)
