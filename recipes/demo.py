"""A one-minute demo: wrap a tiny Llama (built from a config, no download) with a top-2 of 8
mixture of LoRA experts, train it on a synthetic counting task and print the loss falling.

    python -m lomix.recipes.demo [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lomix


def counting_batch(generator: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Sequences that count up modulo the vocabulary from a random start: x[t+1] = x[t] + 1.

    The frozen random base cannot predict them; the experts learn the rule.
    """
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % vocab


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    mixture = lomix.MixtureConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        num_experts=8,
        rank=8,
        alpha=16,
        router=lomix.router_config("topk", k=2),
    )
    lomix.inject(model, mixture)
    print(f"lomix demo: tiny Llama, top-2 of 8 experts r=8 on 7 projections; {lomix.count_parameters(model)}")
    optimizer = torch.optim.AdamW(lomix.parameter_groups(model, lr=1e-2, router_lr=1e-2))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    first = last = float("nan")
    for step in range(1, args.steps + 1):
        ids = counting_batch(generator, batch=16, length=32, vocab=config.vocab_size)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + lomix.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last = out.loss.item()
        first = last if step == 1 else first
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {last:.4f}")
    print(f"loss {first:.4f} -> {last:.4f} in {args.steps} steps ({time.perf_counter() - start:.0f} s)")
    return last


if __name__ == "__main__":
    main()
