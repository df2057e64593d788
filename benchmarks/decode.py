"""Greedy decoding with a KV cache at batch 1 on the CPU: tokens/s of lomix, PEFT LoRA and the base.

    python benchmarks/decode.py [--model llama-config|smollm2] [--prompt 32] [--new 64] [--rounds 20]

lomix top-2 of 8 experts r=8 and PEFT LoRA r=16 adapt the same seven projections of the same frozen
model (equal active rank per token); the base model runs unadapted. Each round generates ``--new``
tokens greedily (``generate``, KV cache, every run forced to the same length) from the same random
prompt. The protocol of benchmarks/harness.py: one process, fixed threads, warm-up, then alternating rounds; the
table gives each model's tokens/s as a ratio to PEFT LoRA's and to the base's (median, IQR), never
an absolute rate.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from harness import machine, ratio_table, write_json
from model_step import build_lomix, build_peft, load_base


def generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int):
    """A closure generating ``new_tokens`` greedily from ``prompt`` (batch 1)."""
    attention_mask = torch.ones_like(prompt)

    def run() -> None:
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == prompt.shape[1] + new_tokens

    return run


def ungrouped(run):
    """``run`` with sibling groups off: each layer computes its own router and shrink (what groups save)."""
    from lomix.kernels import inference_plan

    def without_groups() -> None:
        inference_plan.SIBLING_GROUPS = False
        try:
            run()
        finally:
            inference_plan.SIBLING_GROUPS = True

    return without_groups


def rate_ratio(table: dict[str, dict[str, float]], name: str) -> dict[str, float]:
    """Tokens/s ratio (the inverse of the time ratio) with its interquartile range."""
    entry = table[name]
    return {"median": 1 / entry["median"], "p25": 1 / entry["p75"], "p75": 1 / entry["p25"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "llama-config"], default="llama-config")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<model>_cpu.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.model).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, base.config.vocab_size, (1, args.prompt), generator=generator)
    lora, _ = build_peft(base)
    mixture, _ = build_lomix(base, 8)
    separate = copy.deepcopy(mixture)  # the same weights in layers of its own, run with groups off
    models = {
        "peft_lora_r16": lora.eval(),
        "lomix_top2_of_8_r8": mixture.eval(),
        "lomix_top2_of_8_r8_ungrouped": separate.eval(),
        "base": base,
    }
    candidates = {name: generation(model, prompt, args.new) for name, model in models.items()}
    candidates["lomix_top2_of_8_r8_ungrouped"] = ungrouped(candidates["lomix_top2_of_8_r8_ungrouped"])
    grouping = {"grouped / ungrouped": ("lomix_top2_of_8_r8", "lomix_top2_of_8_r8_ungrouped")}
    over_peft = ratio_table(candidates, "peft_lora_r16", rounds=args.rounds, warmup=2, pairs=grouping)
    to_peft = {name: rate_ratio(over_peft, name) for name in models}
    to_base = {name: to_peft[name]["median"] / to_peft["base"]["median"] for name in models}
    print(
        f"## Greedy decode, batch 1, KV cache, CPU fp32, {args.model}, prompt {args.prompt}, {args.new} new tokens, "
        f"{args.threads} threads (tokens/s ratios, median over {args.rounds} alternating rounds, IQR)\n"
    )
    print("| model | tokens/s / PEFT LoRA r=16 | tokens/s / base |")
    print("|---|---|---|")
    for name in models:
        entry = to_peft[name]
        print(f"| {name} | {entry['median']:.3f} ({entry['p25']:.2f}-{entry['p75']:.2f}) | {to_base[name]:.3f} |")
    groups = rate_ratio(over_peft, "grouped / ungrouped")
    print(
        f"\nsibling groups (q/k/v, gate/up share one router+shrink GEMM): grouped / ungrouped tokens/s "
        f"{groups['median']:.3f} ({groups['p25']:.2f}-{groups['p75']:.2f})"
    )
    out = args.out or f"benchmarks/results/decode_{args.model}_cpu.json"
    write_json(
        out,
        {
            "machine": machine(),
            "load_average": os.getloadavg(),
            "model": args.model,
            "prompt": args.prompt,
            "new_tokens": args.new,
            "rounds": args.rounds,
            "tokens_per_s_over_peft_lora_r16": to_peft,
            "tokens_per_s_over_base_median": to_base,
            "tokens_per_s_grouped_over_ungrouped": groups,
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
