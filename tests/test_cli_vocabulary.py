"""One vocabulary across the `lomix` verbs: --out/-o for what a verb writes, --max-examples-per-task
for a per-task budget (old names still work, with a warning), key=value overrides wherever a run's
config is read, and RUN or RUN/mixture wherever a run is named."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import MODEL_CASES, build_pair
from typer.testing import CliRunner

import lomix
from lomix.cli.app import app
from lomix.errors import ConfigError

WRITERS = ("train", "eval", "inspect", "merge", "export", "glider", "loramixer")  # verbs that write files
NEW = "--max-examples-per-task"
RUN_VERBS = ("eval", "inspect", "merge", "export")  # verbs that read a run folder and its config


def commands() -> dict:
    group = typer.main.get_command(app)
    found = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            found.update({f"{name} {sub}": c for sub, c in command.commands.items()})
        else:
            found[name] = command
    return found


def visible_flags(command) -> set[str]:
    return {o for p in command.params if p.param_type_name == "option" and not p.hidden for o in p.opts}


def test_every_writer_takes_out_and_no_verb_spells_it_otherwise():
    found = commands()
    for name in WRITERS:
        assert {"--out", "-o"} <= visible_flags(found[name]), name
    for name, command in found.items():
        assert not visible_flags(command) & {"--output", "--output-dir", "--out-dir", "--output_dir"}, name


def test_one_name_for_examples_per_task():
    for name, command in commands().items():
        budget = {f for f in visible_flags(command) if "per-task" in f or f == "--calibration"}
        assert budget <= {"--max-examples-per-task"}, (name, budget)
    assert "--max-examples-per-task" in visible_flags(commands()["inspect"])
    assert "--max-examples-per-task" in visible_flags(commands()["merge"])
    assert "--max-examples-per-task" in visible_flags(commands()["eval"])


def test_train_out_is_output_dir(tmp_path):
    from tiny_assets import tiny_config, write_config

    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tmp_path / "model", tmp_path / "t.jsonl", None))
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(tmp_path / "here"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"output_dir: {tmp_path / 'here'}" in result.output


@pytest.mark.parametrize("verb", RUN_VERBS)
def test_run_verbs_pass_overrides_to_the_runs_config(verb, tmp_path, monkeypatch):
    from lomix.recipes import evaluation, export, merge, routing_report

    seen = []

    def load_run(run_dir, overrides=()):
        seen.append((str(run_dir), list(overrides)))
        raise ConfigError(str(run_dir), "stop here")

    def load_config(path, overrides=None):  # evaluation reads the config itself
        seen.append((str(path.parent), list(overrides or [])))
        raise ConfigError(str(path), "stop here")

    for module in (export, merge, routing_report):
        monkeypatch.setattr(module, "load_run", load_run)
    monkeypatch.setattr(evaluation, "load_config", load_config)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    extra = {"eval": [], "inspect": ["--out", "o"], "merge": ["--experts", "2", "--out", "o"],
             "export": ["--format", "lomix", "--out", "o"]}[verb]  # fmt: skip
    result = CliRunner().invoke(app, [verb, str(run), "eval.batch_size=3", "router.k=1", *extra])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    assert seen == [(str(run), ["eval.batch_size=3", "router.k=1"])]


@pytest.mark.parametrize(
    ("args", "old", "new"),
    [
        (["inspect", "RUN", "--out", "o", "--per-task", "3"], "--per-task", NEW),
        (["merge", "RUN", "--experts", "2", "--out", "o", "--calibration", "3"], "--calibration", NEW),
        (["merge", "RUN", "--experts", "2", "--out", "o", "--eval-per-task", "3"], "--eval-per-task", "eval.max_exa"),
    ],
)
def test_old_flag_names_still_work_with_a_warning(args, old, new, tmp_path, monkeypatch):
    from lomix.recipes import merge, routing_report

    seen = {}

    def fake_inspect(run_dir, out, data, per_task, batch_size, overrides=()):
        seen["per_task"] = per_task
        return {"layers": {}, "data": {"examples": 0}}

    def fake_merge(run_dir, out, options, *, calibration_per_task, eval_per_task, **kwargs):
        seen["per_task"] = calibration_per_task if old == "--calibration" else eval_per_task

    monkeypatch.setattr(routing_report, "run", fake_inspect)
    monkeypatch.setattr(merge, "run", fake_merge)
    result = CliRunner().invoke(app, [a.replace("RUN", str(tmp_path)) for a in args])
    assert result.exit_code == 0, result.output
    assert f"lomix: warning: {old} is deprecated; use {new}" in result.output
    assert seen["per_task"] == 3


def test_a_run_or_its_mixture_folder(tmp_path):
    from lomix.recipes.runs import resolve_run_dir

    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=3))
    run = tmp_path / "run"
    lomix.save(model, run / "mixture")
    assert resolve_run_dir(run / "mixture") == run / "mixture"  # no run files around it: a bare mixture
    (run / "config.yaml").write_text("{}\n")
    (run / "tasks.json").write_text("{}\n")
    assert resolve_run_dir(run / "mixture") == run and resolve_run_dir(run) == run
    shown = [CliRunner().invoke(app, ["show", str(path)]) for path in (run, run / "mixture")]
    assert all(r.exit_code == 0 for r in shown), shown[0].output
    assert json.loads(shown[0].output) == json.loads(shown[1].output)
    assert json.loads(shown[0].output)["config"]["num_experts"] == 3


def test_eval_takes_the_mixture_folder_for_its_run(tmp_path, monkeypatch):
    from lomix.recipes import evaluation

    seen = []

    def load_config(path, overrides=None):
        seen.append(path)
        raise ConfigError(str(path), "stop here")

    monkeypatch.setattr(evaluation, "load_config", load_config)
    run = tmp_path / "run"
    (run / "mixture").mkdir(parents=True)
    for name in ("config.yaml", "tasks.json", f"mixture/{lomix.CONFIG_NAME}"):
        (run / name).write_text("{}\n")
    result = CliRunner().invoke(app, ["eval", str(run / "mixture")])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    assert seen == [run / "config.yaml"]
