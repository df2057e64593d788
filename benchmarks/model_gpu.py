"""Model-level GPU benchmark: a Llama-shaped ~1.1B model (random weights, built from a config, no
download) with a lomix mixture (top-2 of 8 experts, r=16, on every linear projection), with the
same mixture on today's (unfused) kernels, with PEFT LoRA r=16 on the same projections, and bare.

    python benchmarks/model_gpu.py [--out-dir benchmarks/results] [--steps 10] [--new-tokens 128]

Per variant, in one process: the median training-step time (forward, loss plus the mixture's
balance loss, backward, AdamW step over the trainable parameters; batch 4 x 512 tokens, bf16
base, adapters in fp32) and greedy decode tokens/s (batch 1, 64-token prompt, ``generate`` with the
KV cache, eager: Python overhead included, as users run it). The bare model's "training step" is
forward + backward to its input embeddings (no weights train), the floor every adapter pays.
Writes model_gpu.json and model_gpu.md to --out-dir.

``--smoke`` runs the same code on a tiny config on the CPU under the Triton interpreter: it checks
the script and writes nothing; its "timings" mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lomix  # noqa: E402
from lomix.kernels.fused_tuning import tuning_for  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(smoke: bool) -> LlamaConfig:
    if smoke:
        return LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
    # TinyLlama-1.1B's shape
    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    )  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_variant(base: torch.nn.Module, name: str) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if name.startswith("lomix"):
        config = lomix.MixtureConfig(
            target_modules=TARGETS, num_experts=8, rank=16, router=lomix.router_config("topk", k=2), kernel="triton"
        )
        lomix.inject(model, config)
    elif name == "peft_lora_r16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        model.requires_grad_(False)
        model.enable_input_require_grads()
    return model


def train_step_ms(model, name: str, batch: torch.Tensor, steps: int, device: str) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()
    times = []
    for step in range(steps + 2):  # two warm-up steps (compilation, allocator)
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        loss = out.loss + lomix.aux_loss(model) if name.startswith("lomix") else out.loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, device: str) -> float:
    model.eval()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    sync(device)
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    sync(device)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per variant")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU interpreter; writes nothing")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (or --smoke)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    batch_shape, prompt_len = ((1, 8), 4) if args.smoke else ((4, 512), 64)
    steps, new_tokens = (1, 2) if args.smoke else (args.steps, args.new_tokens)
    torch.manual_seed(0)
    config = llama_config(args.smoke)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config.vocab_size, batch_shape, generator=g).to(device)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=g).to(device)
    info = {
        "gpu": "cpu-smoke" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "params": sum(p.numel() for p in base.parameters()),
        "batch": list(batch_shape),
        "new_tokens": new_tokens,
        # E*r = 8 * 16: whether this GPU's tuning lets the lomix_fused variant take the fused path
        "fused_path_active": 8 * 16 <= tuning_for(torch.device(device)).max_columns,
    }
    print(json.dumps(info), flush=True)
    rows = []
    variants = ("base", "lomix_fused", "lomix_unfused", "peft_lora_r16")
    for name in variants:
        os.environ["LOMIX_FUSED"] = "0" if name == "lomix_unfused" else "1"
        model = make_variant(base, name)
        row = {
            "variant": name,
            "train_step_ms": train_step_ms(model, name, batch, steps, device),
            "decode_tokens_per_s": decode_tokens_per_s(model, prompt, new_tokens, device),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        lines = render(info, rows, batch_shape, steps, prompt_len, new_tokens, len(variants))
        if not args.smoke:  # after every variant: a run stopped by its time limit keeps what it measured
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "model_gpu.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
            (out / "model_gpu.md").write_text("\n".join(lines) + "\n")
    os.environ.pop("LOMIX_FUSED")
    print("\n".join(lines))
    if args.smoke:
        print(f"smoke run finished: {len(rows)} variants")


def render(info, rows, batch_shape, steps, prompt_len, new_tokens, n_variants) -> list[str]:
    from lomix.kernels import fused

    info["fused_broken"] = fused._fused_broken  # None unless the fused kernels failed on this machine
    floor = rows[0]
    lines = [
        f"# Llama-shaped {info['params'] / 1e9:.2f}B model (random weights) on {info['gpu']} (torch {info['torch']})",
        "",
        f"Training step: batch {batch_shape[0]} x {batch_shape[1]} tokens, median of {steps} steps. Greedy decode: "
        f"batch 1, {prompt_len}-token prompt, {new_tokens} new tokens, eager generate with the KV cache. "
        "lomix: top-2 of 8 experts, r=16, on all 7 projections of every block; PEFT LoRA r=16 on the same. "
        f"lomix_fused takes the fused kernels: {info['fused_path_active'] and not info['fused_broken']} "
        f"(per the GPU's tuning file; fused kernel failure: {info['fused_broken']}); "
        "lomix_unfused runs the same mixture with LOMIX_FUSED=0.",
        "",
        "| variant | train step (ms) | vs base | decode tokens/s | vs base |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['train_step_ms']:.1f} | {row['train_step_ms'] / floor['train_step_ms']:.3f} "
            f"| {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / floor['decode_tokens_per_s']:.3f} |"
        )
    if len(rows) < n_variants:
        lines += ["", f"PARTIAL: {len(rows)} of {n_variants} variants so far."]
    return lines


if __name__ == "__main__":
    main()
