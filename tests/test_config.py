"""MixtureConfig: JSON round trip and field validation with errors that name the field."""

from __future__ import annotations

import json

import pytest

import lomix
from lomix.errors import ConfigError


def test_json_round_trip_preserves_every_field(tmp_path):
    config = lomix.MixtureConfig(
        target_modules=".*\\.(q|v)_proj",
        exclude_modules=["layers.0.self_attn.q_proj"],
        num_experts=6,
        rank=4,
        alpha=8.0,
        use_rslora=True,
        dropout=0.1,
        router=lomix.router_config("topk", k=3, jitter=0.01),
        balance=lomix.BalanceConfig(switch=0.02, z_loss=0.001),
        kernel="torch",
    )
    again = lomix.MixtureConfig.from_json(config.to_json())
    assert again == config
    path = tmp_path / "c.json"
    config.save(path)
    assert lomix.MixtureConfig.load(path) == config
    assert json.loads(path.read_text())["router"] == {
        "name": "topk",
        "k": 3,
        "jitter": 0.01,
        "renormalize": None,
        "init_std": 0.02,
        "bias_update_rate": 0.0,
    }


@pytest.mark.parametrize("name", lomix.available_routers())
def test_every_registered_router_config_round_trips(name):
    # no balance loss: remix refuses one (its router trains by RLOO alone)
    config = lomix.MixtureConfig(num_experts=4, balance={"switch": 0.0}, router=lomix.router_config(name))
    assert lomix.MixtureConfig.from_dict(config.to_dict()) == config


def test_scale_follows_lora_and_rslora():
    assert lomix.MixtureConfig(rank=8, alpha=16).scale == 2.0
    assert lomix.MixtureConfig(rank=16, alpha=8, use_rslora=True).scale == 2.0


@pytest.mark.parametrize(
    "kwargs,field,fragment",
    [
        ({"rank": 0}, "rank", "positive"),
        ({"rank": -2}, "rank", "positive"),
        ({"num_experts": 0}, "num_experts", ">= 1"),
        ({"num_experts": 2, "router": {"name": "topk", "k": 3}}, "router.k", "num_experts=2"),
        ({"dropout": 1.0}, "dropout", "[0, 1)"),
        ({"kernel": "cuda"}, "kernel", "auto, torch, triton"),
        ({"target_modules": []}, "target_modules", "at least one"),
        ({"target_modules": "("}, "target_modules", "regular expression"),
        ({"router": {"name": "nope"}}, "router.name", "available"),
        ({"router": {"name": "fixed", "experts": [9]}}, "router.experts", "[0, 8)"),
        ({"router": {"name": "fixed", "experts": [0, 1], "weights": [1.0]}}, "router.weights", "one weight per"),
    ],
)
def test_impossible_values_name_the_field(kwargs, field, fragment):
    with pytest.raises(ConfigError) as info:
        lomix.MixtureConfig.from_dict(kwargs)
    assert info.value.field == field
    assert fragment in str(info.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        lomix.MixtureConfig.from_dict({"num_expert": 4})
    assert info.value.field == "num_expert"
    assert "num_experts" in str(info.value) and "rank" in str(info.value)
    valid = "bias_update_rate, init_std, jitter, k"
    with pytest.raises(ConfigError, match=rf"router.kk: unknown key; did you mean 'k'\? valid keys here are: {valid}"):
        lomix.MixtureConfig.from_dict({"router": {"name": "topk", "kk": 1}})


def test_wrong_types_are_rejected_with_the_expected_type():
    with pytest.raises(ConfigError, match=r"rank: expected an integer, got '8'"):
        lomix.MixtureConfig.from_dict({"rank": "8"})
    with pytest.raises(ConfigError, match=r"use_rslora: expected true or false"):
        lomix.MixtureConfig.from_dict({"use_rslora": 1})
    with pytest.raises(ConfigError, match=r"target_modules: expected a list of str or str"):
        lomix.MixtureConfig.from_dict({"target_modules": 3})
    # ints are accepted where floats are expected (YAML writes 16 for 16.0)
    assert lomix.MixtureConfig.from_dict({"alpha": 16}).alpha == 16.0


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 0, 0.0, -2.0])
def test_alpha_must_be_finite_and_positive(alpha):
    """Issue 25, item 6: a NaN alpha trained to loss nan and saved a NaN mixture."""
    with pytest.raises(ConfigError, match=r"^alpha: must be a finite number > 0, got"):
        lomix.MixtureConfig(alpha=alpha)
    assert lomix.MixtureConfig(alpha=1e-3).scale == pytest.approx(1e-3 / 8)


@pytest.mark.parametrize("text", [".nan", ".inf", "0", "-1"])
def test_a_recipe_alpha_override_is_validated_naming_mixture_alpha(text):
    from lomix.recipes.config import apply_overrides, build_config

    data = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError, match=r"^mixture.alpha: must be a finite number > 0"):
        build_config(apply_overrides(data, [f"mixture.alpha={text}"]))
