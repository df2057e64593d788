"""Property: any YAML file and any ``key=value`` overrides give a valid config or a LomixError.

Keys are drawn from the real dotted keys of the recipe config (every router's fields included),
near misses of them and arbitrary (unicode) text; values from YAML edge cases (YAML 1.1 booleans,
sexagesimal numbers, timestamps, tags, anchors, flow collections, NaN, unterminated quotes) and
arbitrary text. Whatever comes back must be a config whose every field has its declared type, and
whose resolved YAML (what ``lomix train`` writes as the run's config.yaml and reads again on
resume) reads back as the same config. Examples per property: the conftest profile.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lomix.cli.app import app
from lomix.errors import LomixError
from lomix.recipes.config import FinetuneConfig, build_config, load_config, parse_yaml
from lomix.routers import RouterConfig, available_routers, router_class

REQUIRED = ["model.name_or_path=m", "data.train=train.jsonl"]


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and not issubclass(tp, RouterConfig):
            keys += dotted_keys(tp, f"{prefix}{f.name}.")
        elif not (cls.__name__ == "MixtureConfig" and f.name == "router"):
            keys.append(prefix + f.name)
    return keys


ROUTER_FIELDS = {f.name for name in available_routers() for f in dataclasses.fields(router_class(name).config_class)}
ROUTER_KEYS = ["router.name", *sorted(f"router.{name}" for name in ROUTER_FIELDS)]
KEYS = sorted(set(dotted_keys(FinetuneConfig)) - {"router"}) + ROUTER_KEYS

YAML_EDGES = [
    "", "null", "~", "Null", "yes", "no", "on", "off", "y", "n", "true", "False", "0", "-1", "3", "1_000",
    "0x1f", "0o17", "017", "1:30", "190:20:30", "1e3", "2e-4", "-.5", "1.", ".inf", "-.inf", ".nan", "nan", "1e400",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "[]", "{}", "[1, 2", "[a, [b, {c: d}]]", "{a: 1, a: 2}",
    "{1: 2, b: c}", "{? [a]: 1}", "{null: 1}", "!!python/object/apply:os.system ['echo']", "!!binary aGVsbG8=",
    "!!set {a, b}", "!!omap [a: 1]", "!!str 3", "!!int '3'", "!!float x", "&a [*a]", "*undefined", "'unterminated",
    '"\\u00e9\\t"', "é", "名前", "\U0001f600", "a: b: c", "- a\n- b", "| \n  text", "%YAML 1.1\n--- a", "--- a\n--- b",
    "\t", "\x00", "\ufeffa", "k: v\n  bad indent", "1e5", "'1e5'", "'2e-4'", "'.5'", "'+1.'", "'.inf'", "'1_000'",
    "'0x1f'", "'yes'", "'null'", "'1:30'", "'2001-12-14'", "[1]", "[a]", "{a: 1}", "{1: a}", "{a: [b]}",
    *available_routers(),
]  # fmt: skip

identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.builds(lambda k, extra: f"{k}.{extra}", st.sampled_from(KEYS), identifier),
    st.lists(identifier, min_size=1, max_size=4).map(".".join),
    st.text(max_size=12),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
)
values = st.one_of(
    st.sampled_from(YAML_EDGES),
    st.text(max_size=20),
    scalars.map(str),
    structures.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()),
)
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, values), st.text(max_size=15)), max_size=5)


def mistyped(tp: Any, value: Any, path: str = "") -> str | None:
    """The first path where ``value`` does not have type ``tp`` (dataclasses field by field), or
    None. Independent of lomix.typed."""
    origin = get_origin(tp)
    if tp is Any:
        return None
    if origin in (Union, types.UnionType):
        return None if any(mistyped(arg, value) is None for arg in get_args(tp)) else path
    if origin is Literal:
        return None if value in get_args(tp) else path
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        if not isinstance(value, origin):
            return path
        return next((p for i, v in enumerate(value) if (p := mistyped(item, v, f"{path}[{i}]"))), None)
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, dict):
            return path
        bad = (
            mistyped(key_tp, k, f"{path}.{k!r}") or mistyped(value_tp, v, f"{path}[{k!r}]") for k, v in value.items()
        )
        return next((p for p in bad if p), None)
    if tp is type(None):
        return None if value is None else path
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            return path
        hints = get_type_hints(type(value))
        fields = dataclasses.fields(value)
        bad = (mistyped(hints[f.name], getattr(value, f.name), f"{path}.{f.name}".lstrip(".")) for f in fields)
        return next((p for p in bad if p), None)
    if tp is float:
        return None if isinstance(value, float) else path
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else path
    return None if isinstance(value, tp) else path


def same(a: Any, b: Any) -> bool:
    """Equality of plain config data where NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def check_valid(cfg: Any) -> None:
    assert isinstance(cfg, FinetuneConfig)
    wrong = mistyped(FinetuneConfig, cfg)
    assert wrong is None, f"{wrong} does not have its declared type: {cfg.to_dict()}"
    assert cfg.router is cfg.mixture.router
    again = build_config(parse_yaml(cfg.to_yaml()))
    assert same(again.to_dict(), cfg.to_dict()), (cfg.to_yaml(), again.to_yaml())


@settings(max_examples=300)  # ~10 ms each
@given(overrides)
@example(["router.name=[a]"])  # an unhashable router name (a TypeError once)
@example(["data.task='1e5'"])  # a string the resolved config.yaml wrote unquoted, read back as a float
def test_overrides_give_a_valid_config_or_a_lomix_error(items):
    try:
        cfg = load_config(None, REQUIRED + items)
    except LomixError:
        return
    check_valid(cfg)


@settings(max_examples=100)
@given(st.one_of(st.text(max_size=80), st.sampled_from(YAML_EDGES), st.dictionaries(keys, structures, max_size=4)))
@example("{0: a, ~: b, model: {}}")  # found by this property: keys that are not strings (a TypeError once)
@example("train: {lr: !!float x}")  # found by this property: PyYAML's constructor raised ValueError
@example("!!float")  # ... and IndexError
def test_config_files_give_a_valid_config_or_a_lomix_error(content):
    if isinstance(content, dict):  # a mapping written as YAML, the dotted keys as nested sections
        nested: dict = {}
        for key, value in content.items():
            *parents, last = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[last] = value
        content = yaml.safe_dump(nested, allow_unicode=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(content, encoding="utf-8")
        try:
            cfg = load_config(path, REQUIRED)
        except LomixError:
            return
    check_valid(cfg)


@settings(max_examples=15)
@given(overrides)
def test_train_dry_run_prints_the_config_or_an_error_never_a_traceback(items):
    """The CLI front: exit 0 with the resolved YAML, or exit 2 with an 'error:' message; no traceback."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text("model: {name_or_path: m}\ndata: {train: train.jsonl}\n")
        result = CliRunner().invoke(app, ["train", str(path), *items, "--dry-run"])
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    if result.exit_code == 0:
        check_valid(build_config(parse_yaml(result.stdout)))
    else:
        assert result.stderr.startswith("error: ") and "Traceback" not in result.output, result.stderr


def representative_keys() -> list[tuple[str | None, str]]:
    """(router name or None, dotted key): one key per distinct declared type, router fields included."""
    from lomix.typed import _type_name

    def hints(cls: type, prefix: str) -> list[tuple[str, Any]]:
        found = []
        for f in dataclasses.fields(cls):
            tp = get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp) and not issubclass(tp, RouterConfig):
                found += hints(tp, f"{prefix}{f.name}.")
            elif not (cls.__name__ == "MixtureConfig" and f.name == "router") and f.name != "router":
                found.append((prefix + f.name, tp))
        return found

    chosen: dict[str, tuple[str | None, str]] = {"router.name": (None, "router.name")}
    for key, tp in hints(FinetuneConfig, ""):
        chosen.setdefault(_type_name(tp), (None, key))
    for name in available_routers():
        for key, tp in hints(router_class(name).config_class, "router."):
            chosen.setdefault(_type_name(tp), (name, key))
    return sorted(chosen.values(), key=str)


VALUE_SHAPES = [
    "null", "true", "0", "-3", "2.5", "1e5", ".nan", "-.inf", "'1e5'", "'.5'", "x", "'yes'", "2001-12-14", "''",
    "[]", "[1]", "[a]", "[a, 1]", "[[a]]", "[null]", "{}", "{a: 1}", "{1: a}", "{a: b}", "{a: [b]}", "{name: topk}",
    "{name: [a]}", "é", "!!binary aGVsbG8=",
]  # fmt: skip


def test_every_declared_type_against_every_value_shape():
    """Exhaustive companion of the fuzzers: one field of each declared type (str, int, float, bool,
    literals, optionals, lists, mappings, router names) set to each YAML value shape."""
    keys = representative_keys()
    assert len(keys) >= 10
    for router, key in keys:
        for value in VALUE_SHAPES:
            items = [*REQUIRED, *([f"router.name={router}"] if router else []), f"{key}={value}"]
            try:
                cfg = load_config(None, items)
            except LomixError:
                continue
            except Exception as exc:
                raise AssertionError(f"{items}: {type(exc).__name__}: {exc}") from exc
            check_valid(cfg)
