"""Memory of the quickstart model with an fp32, a 4-bit (nf4) and an 8-bit base, alone and in a training step.

    python benchmarks/quant_memory.py [--bases fp32 nf4 int8] [--steps 3] [--batch 8] [key=value ...]

Each base runs in its own fresh process, built exactly as the recipes build it (`lomix train
recipes/configs/quickstart.yaml` / `quickstart_4bit.yaml`; int8 is the quickstart with
model.load_in_8bit=true): the quickstart's data and tokenizer are prepared first, then the base
loads, then the mixture is injected (after `prepare_kbit_training` for a quantized base) and trains
``--steps`` steps on the first ``--batch`` training examples with the recipe's loss and optimizer.
Extra ``key=value`` arguments override both configs (e.g. ``model.name_or_path=FOLDER
model.gguf_file=null`` to load an already converted copy).

Memory is read from /proc/self/status (Linux): resident set size (VmRSS, split into anonymous and
file-backed pages) and its peak (VmHWM, reset through /proc/self/clear_refs before each phase), as
MiB above the process's resident size once imports, tokenizer and data were ready. "base" is after
loading and one no-grad forward of the batch (every weight page touched); an fp32 base is a view
of the memory-mapped safetensors file, so its weights are file-backed pages. "weights" is the bytes of the
model's parameters and buffers plus bitsandbytes' quantization statistics, computed from tensor
sizes. Step times are printed as the ratio to the fp32 base, from the median of the steps after the
first, measured in separate processes one after the other: report them with the machine's load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"
BASES = {
    "fp32": ("quickstart.yaml", []),
    "nf4": ("quickstart_4bit.yaml", []),
    "int8": ("quickstart.yaml", ["model.load_in_8bit=true"]),
}


def status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def weight_bytes(model) -> int:
    """Parameters and buffers, plus the 4-bit block scales and code tables and the 8-bit row scales."""
    from lomix.quant import quant_kind, quantized_linears

    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for _, layer in quantized_linears(model):
        state = getattr(layer.weight, "quant_state", None)
        if state is not None:
            extra = [state.absmax, state.code]
            if state.nested:
                extra += [state.state2.absmax, state.state2.code]
            tensors.update({id(t): t for t in extra})
        if quant_kind(layer) == "8bit":
            for scale in (layer.state.SCB, getattr(layer.weight, "SCB", None)):
                if scale is not None:
                    tensors[id(scale)] = scale
    return sum(t.numel() * t.element_size() for t in tensors.values())


def child(base: str, steps: int, batch_size: int, overrides: list[str]) -> dict:
    import torch
    from transformers import AutoTokenizer

    import lomix
    from lomix.quant import prepare_kbit_training
    from lomix.recipes import finetune
    from lomix.recipes.assets import load_model_and_tokenizer, model_folder
    from lomix.recipes.config import load_config
    from lomix.recipes.data import Collator, Formatter, load_examples, task_set, tokenize
    from lomix.recipes.quantization import build_optimizer

    config, extra = BASES[base]
    cfg = load_config(CONFIGS / config, [*extra, *overrides])
    train_examples, _ = load_examples(cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(model_folder(cfg.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tasks = task_set(train_examples, cfg.data)
    features = tokenize(train_examples[:batch_size], Formatter(tokenizer, cfg.data), tasks)
    batch = Collator(tokenizer.pad_token_id)(features)
    gc.collect()
    ready = status()

    reset_peak()
    model, _ = load_model_and_tokenizer(cfg.model)
    with torch.no_grad():  # the base alone, serving one batch: every weight page is resident now
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    gc.collect()
    loaded = status()
    weights = weight_bytes(model)

    torch.manual_seed(cfg.seed)
    if cfg.model.quantized:
        prepare_kbit_training(model)
    lomix.inject(model, cfg.mixture)
    model.train()
    optimizer = build_optimizer(lomix.parameter_groups(model, cfg.train.lr, router_lr=cfg.train.router_lr), cfg.train)
    gc.collect()
    before_step = status()
    reset_peak()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        logits, labels = finetune.forward(model, batch)
        loss = finetune.answer_loss_sum(logits, labels) / finetune.answer_tokens(batch) + lomix.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    trained = status()
    return {
        "base": base,
        "config": config,
        "overrides": [*extra, *overrides],
        "weights_mib": weights / 2**20,
        "base_resident_mib": loaded["VmRSS"] - ready["VmRSS"],
        "base_peak_mib": loaded["VmHWM"] - ready["VmRSS"],
        "base_anon_mib": loaded["RssAnon"] - ready["RssAnon"],
        "base_file_mib": loaded["RssFile"] - ready["RssFile"],
        "step_peak_mib": trained["VmHWM"] - ready["VmRSS"],
        "step_peak_above_model_mib": trained["VmHWM"] - before_step["VmRSS"],
        "step_seconds": times,
        "losses": losses,
        "tokens": int(batch["attention_mask"].sum()),
        "shape": list(batch["input_ids"].shape),
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=["fp32", "nf4"], choices=sorted(BASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_memory_cpu.json"))
    parser.add_argument("--child", choices=sorted(BASES), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of both quickstart configs")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.overrides)))
        return
    results = []
    for base in args.bases:
        command = [sys.executable, __file__, "--child", base, "--steps", str(args.steps), "--batch", str(args.batch)]
        done = subprocess.run([*command, *args.overrides], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{base} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{base}: done, load average {results[-1]['loadavg'][0]:.1f}", file=sys.stderr, flush=True)
    reference = next((r for r in results if r["base"] == "fp32"), None)

    def median_step(r: dict) -> float:
        return statistics.median(r["step_seconds"][1:] or r["step_seconds"])

    lines = [
        "| base | weights MiB | base resident MiB (anon + file) | base peak MiB | train step peak MiB "
        "(above the injected model) | step time / fp32 | first loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{median_step(r) / median_step(reference):.2f}" if reference else "-"
        lines.append(
            f"| {r['base']} | {r['weights_mib']:.0f} | {r['base_resident_mib']:.0f} ({r['base_anon_mib']:.0f} + "
            f"{r['base_file_mib']:.0f}) | {r['base_peak_mib']:.0f} | {r['step_peak_mib']:.0f} "
            f"({r['step_peak_above_model_mib']:.0f}) | {ratio} | {r['losses'][0]:.4f} |"
        )
    shape = results[0]["shape"]
    print(f"batch {shape[0]} x {shape[1]} tokens, {args.steps} steps; load averages "
          + ", ".join(f"{r['base']} {r['loadavg'][0]:.1f}" for r in results))  # fmt: skip
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "table": lines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
