"""The repository's structure, as DESIGN.md states it: the router contract is written down (no
optional hook is probed with getattr)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import lomix
from lomix.routers import Router, RouterConfig

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("lomix", "recipes", "cli", "adapters_hub")


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_router_hook_is_probed_with_getattr():
    probe = re.compile(r"getattr\(.*router")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _python_files(*CODE_FOLDERS)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []


def test_the_contract_hooks_have_no_op_defaults():
    """A router that overrides nothing but forward builds in a layer and changes nothing else."""

    class Plain(Router):
        def forward(self, x, context):  # pragma: no cover - never called here
            raise AssertionError

    config = RouterConfig()
    assert config.estimator is None and config.needs_whole_sequences is False
    assert config.mixture_defaults() == {}
    mixture = lomix.MixtureConfig(num_experts=2)
    assert config.validate_mixture(mixture) is None
    router = Plain(config, d_in=4, num_experts=2)
    assert router.default_lr is None
    bank = lomix.ExpertBank(2, 2, 4, 3)
    before = bank.A.detach().clone()
    router.check_layer("layer", 4, 3)
    router.init_experts(bank)
    router.bind_mixture(mixture)
    assert torch.equal(bank.A, before)
