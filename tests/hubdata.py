"""What the hub tests publish: tiny PEFT LoRA adapters and lomix mixtures, saved by the real libraries."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from conftest import MODEL_CASES, build_pair, randomize_experts

import lomix

LLAMA = MODEL_CASES["llama"]


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def save_peft_adapter(base: torch.nn.Module, folder: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter for (a copy of) ``base`` with random non-zero factors, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(str(folder))
    return Path(folder)


def save_mixture(folder: Path, seed: int = 0, num_experts: int = 3, **config) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama mixture with random experts and routers, saved by `lomix.save`; returns (folder, model)."""
    model, _ = build_pair(LLAMA)
    config = {"target_modules": ["q_proj", "v_proj"], "num_experts": num_experts, "rank": 4, **config}
    lomix.inject(model, lomix.MixtureConfig(**config))
    randomize_experts(model, seed=seed)
    model.eval()
    lomix.save(model, folder)
    return Path(folder), model


def logits(model: torch.nn.Module, seed: int = 5) -> torch.Tensor:
    inputs = LLAMA.inputs(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return LLAMA.output(model, inputs)
