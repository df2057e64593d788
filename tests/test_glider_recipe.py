"""GLIDER through the recipes on a tiny config-built model: per-task finetune runs become a library
(PHATGOOSE gates trained on each run's own data, expert frozen), a PEFT LoRA joins it, `lomix glider`
routes over it, and `lomix eval` takes a task description for a held-out task."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hubdata import save_peft_adapter
from tiny_assets import make_model_dir, tiny_config, tiny_rows, write_config, write_jsonl

import lomix
from lomix.methods.glider import recipe as glider
from lomix.methods.glider.config import LibraryConfig
from lomix.methods.glider.library import Library, load_library
from lomix.recipes.config import ModelConfig, build_config
from lomix.recipes.finetune import run as finetune

LOMIX = str(Path(sys.executable).parent / "lomix")
DESCRIPTIONS = {
    "parity": "Decide whether a number is even or odd.",
    "color": "Name the color that a color number stands for.",
    "echo": "Repeat the given word exactly.",
}

pytestmark = pytest.mark.slow


def recipe_config(tmp, model_dir, train_file, test_file, router: dict, mixture: dict | None = None, **sections) -> dict:
    """tiny_config with its router (and mixture) sections replaced, not merged."""
    config = tiny_config(tmp, model_dir, train_file, test_file, **sections)
    config["router"] = router
    config["mixture"] = mixture or {}
    return config


def lomix_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([LOMIX, *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Two single-task expert runs (parity, color) and a library built from them (6 gate steps)."""
    root = tmp_path_factory.mktemp("glider")
    model = make_model_dir(root / "model")
    rows = tiny_rows(0, 16)
    test_rows = tiny_rows(1, 4)
    runs = {}
    for task in ("parity", "color"):
        train = write_jsonl(root / f"{task}.jsonl", [r for r in rows if r["task"] == task])
        test = write_jsonl(root / f"{task}_test.jsonl", [r for r in test_rows if r["task"] == task])
        config = recipe_config(
            root, model, train, test,
            mixture={"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "num_experts": 1, "rank": 4,
                     "alpha": 8, "balance": {"switch": 0.0}},
            router={"name": "fixed", "experts": [0]},
            data={"task_descriptions": {task: DESCRIPTIONS[task]}},
            train={"lr": 3e-2, "max_steps": 6},
            output_dir=str(root / "runs" / task),
        )  # fmt: skip
        finetune(build_config(config))
        runs[task] = root / "runs" / task
    lib = Library.open(root / "library", create=True)
    added = [glider.add_run(lib, runs[t], LibraryConfig(gate_steps=6, gate_lr=5e-2)) for t in ("parity", "color")]
    test_all = write_jsonl(root / "test_all.jsonl", test_rows)
    return SimpleNamespace(root=root, model_dir=model, runs=runs, lib=lib, added=added, test_all=test_all)


def test_library_experts_are_the_runs_loras_with_trained_gates(library):
    root, runs, lib, added = library.root, library.runs, library.lib, library.added
    assert Library.open(root / "library").names() == ["parity", "color"]
    assert [a["description"] for a in added] == [DESCRIPTIONS["parity"], DESCRIPTIONS["color"]]
    for task in ("parity", "color"):
        run_tensors, _ = lomix.checkpoint.read_weights(runs[task] / "mixture")
        lib_tensors, _ = lomix.checkpoint.read_weights(lib.folder(lib.expert(task)))
        experts = [k for k in run_tensors if ".experts." in k]
        assert experts and all(torch.equal(run_tensors[k], lib_tensors[k]) for k in experts)  # frozen
        gates = [v for k, v in lib_tensors.items() if k.endswith("router.gate_vectors")]
        assert len(gates) == len(experts) // 2 and all(g.abs().sum() > 0 for g in gates)  # trained from zero
        assert lib.expert(task).gate_steps == 6 and lib.expert(task).source == str(runs[task])


def test_glider_with_a_huge_alpha_and_k1_is_each_tasks_own_expert(library, tmp_path):
    """Held-in, alpha -> infinity, k = 1: every token goes to the expert whose description matches,
    so GLIDER's evaluation equals each expert run's own evaluation, prediction for prediction."""
    model_dir, runs, lib = library.model_dir, library.runs, library.lib
    rows = [r for r in tiny_rows(1, 4) if r["task"] != "echo"]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    config = recipe_config(
        tmp_path, model_dir, test, test,
        router={"name": "glider", "k": 1, "alpha": 1e4},
        library={"path": str(lib.path)},
        data={"task_descriptions": {}},
        output_dir=str(tmp_path / "glider"),
    )  # fmt: skip
    result = glider.run(build_config(config))
    for task in ("parity", "color"):
        own = json.loads((runs[task] / "eval.json").read_text())["tasks"][task]
        assert result["eval"]["tasks"][task]["score"] == own["score"]
        assert result["routing"][task]["load"] == pytest.approx(1.0)
        assert result["routing"][task]["gate_share"] == pytest.approx(1.0)
    out = tmp_path / "glider"
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "tasks.json", "mixture", "eval.json", "routing.json"}
    tasks = json.loads((out / "tasks.json").read_text())
    assert tasks["descriptions"] == {
        "color": DESCRIPTIONS["color"],
        "parity": DESCRIPTIONS["parity"],
    }  # from the library


def test_lomix_glider_and_eval_with_a_task_description_for_a_held_out_task(library, tmp_path):
    model_dir, lib, test_all = library.model_dir, library.lib, library.test_all
    path = write_config(
        tmp_path / "glider.yaml",
        recipe_config(
            tmp_path, model_dir, test_all, test_all,
            router={"name": "glider", "k": 2, "alpha": 3.0},
            library={"path": str(lib.path)},
            data={"task_descriptions": {"echo": DESCRIPTIONS["echo"]}},
            eval={"max_examples_per_task": 2, "max_new_tokens": 3},
            output_dir=str(tmp_path / "glider"),
        ),
    )  # fmt: skip
    result = lomix_cli("glider", path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "glider"
    first = json.loads((out / "eval.json").read_text())
    assert set(first["tasks"]) == {"parity", "color", "echo"}
    assert set(json.loads((out / "routing.json").read_text())) == {"parity", "color"}  # echo has no own expert

    # a task the run never saw, described on the command line, at another alpha
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [
        {"task": "oddness", "input": f"is {n} even or odd", "choices": ["even", "odd"], "label": n % 2}
        for n in range(7, 13)
    ])  # fmt: skip
    result = lomix_cli(
        "eval", out, f"data.test={held_out}", "router.alpha=100", "--task-description",
        "oddness=Tell whether a whole number is even or odd.",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "eval.json").read_text()) == first  # the run's own result is kept
    table = json.loads((out / "eval-2.json").read_text())
    assert set(table["tasks"]) == {"oddness"} and table["tasks"]["oddness"]["n"] == 2  # eval.max_examples_per_task
    tasks = json.loads((out / "tasks.json").read_text())
    assert "oddness" not in tasks["tasks"]  # the run's own task list is unchanged
    # without a description an unknown task is refused, naming it
    from lomix.recipes.evaluation import run as evaluate

    with pytest.raises(lomix.LomixError, match="oddness"):
        evaluate(out, [f"data.test={held_out}"])


def test_eval_alpha_override_reaches_the_router(library, tmp_path):
    """`lomix eval RUN router.alpha=A` evaluates what a run assembled with alpha A evaluates."""
    from lomix.recipes.evaluation import run as evaluate

    model_dir, lib, test_all = library.model_dir, library.lib, library.test_all
    scores = {}
    for alpha in (0.0, 50.0):
        config = recipe_config(
            tmp_path, model_dir, test_all, test_all,
            router={"name": "glider", "k": 1, "alpha": alpha},
            library={"path": str(lib.path)},
            data={"task_descriptions": {"echo": DESCRIPTIONS["echo"]}},
            eval={"max_examples_per_task": 3, "max_new_tokens": 2},
            output_dir=str(tmp_path / f"a{alpha}"),
        )  # fmt: skip
        scores[alpha] = glider.run(build_config(config))["eval"]
    again = evaluate(tmp_path / "a0.0", ["router.alpha=50.0"])
    assert again == scores[50.0]


def test_a_peft_lora_joins_the_library_and_routes_like_peft(library, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, lib = library.model_dir, library.lib
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapter = save_peft_adapter(base, tmp_path / "peft", seed=3, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    copy_lib = Library.open(tmp_path / "lib", create=True)
    for entry in lib.experts:
        copy_lib.add(lomix.load(AutoModelForCausalLM.from_pretrained(model_dir), lib.folder(entry)), entry.name,
                     entry.description)  # fmt: skip
    glider.add_peft(copy_lib, str(adapter), ModelConfig(name_or_path=str(model_dir)), name="third_party",
                    description="Translate a sentence into French.", check_base=False)  # fmt: skip
    assert copy_lib.expert("third_party").gate_steps == 0
    model = load_library(AutoModelForCausalLM.from_pretrained(model_dir).eval(), copy_lib, alpha=1e4, k=1)
    layers = dict(lomix.mixture_layers(model))
    absent = [n for n in layers if n.endswith(("v_proj", "up_proj", "down_proj"))]
    assert absent and not any(layers[n].router.present[2] for n in absent)  # a zero expert there, like PEFT
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad(), lomix.routing_context(model, task_descriptions=["Translate this text to French."] * 2):
        ours = model(input_ids=ids).logits
    assert torch.allclose(ours, reference(input_ids=ids).logits, atol=1e-5)


def test_a_local_lm_writes_descriptions_greedily(library):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = library.model_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from lomix.recipes.data import Example

    examples = [Example(task="parity", input=f"is {n} even or odd", target="odd") for n in (3, 5)]
    text = glider.describe_task(examples, model, tokenizer, max_new_tokens=6)
    # the same continuation, decoded token by token with argmax
    prompt = glider.DESCRIBE_PROMPT.format(
        n=2, examples="Input: is 3 even or odd\nAnswer: odd\n\nInput: is 5 even or odd\nAnswer: odd"
    )
    ids = tokenizer(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            if int(ids[0, -1]) == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()
    assert text == next(line.strip() for line in expected.splitlines() if line.strip())


def test_missing_descriptions_come_from_the_library_or_a_local_lm(library):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomix.recipes.data import load_examples, task_set

    test_all = library.test_all
    cfg = build_config(
        recipe_config(
            library.root, library.model_dir, test_all, test_all,
            router={"name": "glider"},
            library={"path": str(library.lib.path), "describe_with": str(library.model_dir), "describe_examples": 2},
        )
    )  # fmt: skip
    train, _ = load_examples(cfg.data)
    tasks = glider.resolve_descriptions(cfg, task_set(train, cfg.data), train, library.lib)
    assert tasks.descriptions["parity"] == DESCRIPTIONS["parity"]  # the library's own expert
    model = AutoModelForCausalLM.from_pretrained(library.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(library.model_dir)
    shown = glider.first_examples(train, "echo", 2, cfg.seed)
    assert tasks.descriptions["echo"] == glider.describe_task(shown, model, tokenizer)  # written by the LM


def test_lomix_library_add_from_the_command_line(library, tmp_path):
    result = lomix_cli("library", "add", tmp_path / "lib", library.runs["color"], "--gate-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "added color" in result.stdout
    index = json.loads((tmp_path / "lib" / "library.json").read_text())
    assert [(e["name"], e["gate_steps"], e["description"]) for e in index["experts"]] == [
        ("color", 2, DESCRIPTIONS["color"])
    ]
    with pytest.raises(lomix.ConfigError, match="already has an expert 'color'"):
        glider.add_run(Library.open(tmp_path / "lib"), library.runs["color"], LibraryConfig(gate_steps=0))


def test_task_descriptions_from_the_command_line():
    from lomix.recipes.data import TaskSet
    from lomix.recipes.evaluation import describe_tasks

    tasks = TaskSet(["a"], {"a": "old a"})
    both = describe_tasks(tasks, ["b=the b task", "x=y is a formula"], ["a", "b"])
    # "x=y ..." names no test task: the whole text describes every test task, after b's own
    assert both.names == ["a", "b"] and both.descriptions == {"a": "x=y is a formula", "b": "x=y is a formula"}
    only_b = describe_tasks(tasks, ["b=the b task"], ["a", "b"])
    assert only_b.descriptions == {"a": "old a", "b": "the b task"} and only_b.id("b") == 1
    assert describe_tasks(tasks, [], ["a"]) is tasks
    with pytest.raises(lomix.ConfigError, match="--task-description"):
        describe_tasks(tasks, ["b="], ["a", "b"])
