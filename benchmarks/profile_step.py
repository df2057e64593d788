"""Where a training step's time goes: lomix top-2 of 8 r=8 vs PEFT LoRA r=16, torch profiler, CPU.

    python benchmarks/profile_step.py [--model smollm2|llama-config] [--steps 3] [--experts 8]

The same models and step as benchmarks/model_step.py. Each step runs under `torch.profiler` with
labelled regions (the step's forward, loss, balance losses, backward and optimizer; inside every
adapted layer its base layer, router, mixture kernel and balance-loss bookkeeping). Each profiled
op's self time goes to its innermost region; inside the mixture kernel the ops are split further
by what they do (GEMMs, masking, the copy of the experts' factors into one matrix). The table
gives every part as a share of that implementation's step and as a fraction of PEFT LoRA's whole
step, so that absolute CPU times never appear as results (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections import defaultdict

import torch
from harness import machine, write_json
from model_step import TARGETS, build_lomix, build_peft, load_base
from torch.profiler import ProfilerActivity, profile, record_function

import lomix
import lomix.layer
import lomix.losses

# Ops inside the mixture kernel region, by what they do.
KERNEL_PARTS = {
    "aten::mm": "kernel GEMMs",
    "aten::addmm": "kernel GEMMs",
    "aten::matmul": "kernel GEMMs",
    "aten::scatter_add": "masking (gate matrix)",
    "aten::new_zeros": "masking (gate matrix)",
    "aten::zeros": "masking (gate matrix)",
    "aten::zero_": "masking (gate matrix)",
    "aten::mul": "masking (gate matrix)",
    "aten::clone": "gather of expert factors",
    "aten::copy_": "gather of expert factors",
    "aten::reshape": "gather of expert factors",
    "aten::index_select": "gather of expert factors",
    "aten::index_add": "scatter of outputs",
    "aten::cat": "gather of expert factors",
    "aten::bmm": "kernel GEMMs",
    "aten::softmax": "router rule (softmax, top-k, renormalise)",
    "aten::_softmax": "router rule (softmax, top-k, renormalise)",
    "aten::topk": "router rule (softmax, top-k, renormalise)",
    "aten::div": "router rule (softmax, top-k, renormalise)",
    "aten::sum": "router rule (softmax, top-k, renormalise)",
    "aten::scatter": "masking (gate matrix)",
}


def _wrap(owner, attribute: str, label: str) -> None:
    """Run ``owner.attribute`` inside ``record_function(label)`` (class attribute or module function)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def _label_base_layers(model: torch.nn.Module, is_adapted) -> None:
    for module in model.modules():
        if is_adapted(module):
            module.base_layer.register_forward_pre_hook(lambda m, a: _enter(m, "base layer"))
            module.base_layer.register_forward_hook(lambda m, a, o: _exit(m))


_open: dict[int, contextlib.AbstractContextManager] = {}


def _enter(module, label: str) -> None:
    ctx = record_function(label)
    ctx.__enter__()
    _open[id(module)] = ctx


def _exit(module) -> None:
    _open.pop(id(module)).__exit__(None, None, None)


def instrument() -> None:
    """Label lomix's and PEFT's layer parts (class-level, so both models of a run are covered)."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    _wrap(lomix.layer.MixtureLinear, "forward", "adapted layer")
    _wrap(PeftLinear, "forward", "adapted layer")
    _wrap(lomix.layer.MixtureLinear, "_token_routed", "mixture kernel")
    if hasattr(lomix.layer, "softmax_topk_dense_forward"):  # router + shrink in one GEMM (after issue 23)
        _wrap(lomix.layer, "softmax_topk_dense_forward", "mixture kernel")
    _wrap(lomix.layer.MixtureLinear, "_record", "balance losses + routing record")
    _wrap(lomix.layer, "fused_layer_forward", "fused-path check")
    from lomix.routers.base import Router

    for cls in _subclasses(Router):
        if "forward" in cls.__dict__:
            _wrap(cls, "forward", "router")


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def labelled_step(model, optimizer, ids, aux: bool):
    from torch.nn import functional as F

    def step() -> None:
        with record_function("optimizer zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        with record_function("model forward"):
            logits = model(input_ids=ids, use_cache=False).logits
        with record_function("task loss"):
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if aux:
            with record_function("aux_loss (collect over layers)"):
                loss = loss + lomix.aux_loss(model)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer step"):
            optimizer.step()

    return step


def breakdown(prof) -> dict[str, float]:
    """{part: summed self time} with each op charged to its innermost labelled region."""
    labels = {
        "optimizer zero_grad",
        "model forward",
        "task loss",
        "aux_loss (collect over layers)",
        "backward",
        "optimizer step",
        "adapted layer",
        "base layer",
        "router",
        "mixture kernel",
        "balance losses + routing record",
        "fused-path check",
    }
    parts: dict[str, float] = defaultdict(float)
    for event in prof.events():
        region, node = None, event
        while node is not None:
            if node.name in labels:
                region = node.name
                break
            node = node.cpu_parent
        if region is None:
            continue
        self_time = event.self_cpu_time_total
        if region == "mixture kernel" and event.name not in labels:
            region = "mixture kernel: " + KERNEL_PARTS.get(event.name, "other ops")
        elif region == "adapted layer" and event.name not in labels:
            region = "adapted layer: other (adapter ops, Python)"
        elif region == "model forward" and event.name not in labels:
            region = "model forward: frozen model outside the adapted layers"
        parts[region] += self_time
    return dict(parts)


def top_level_ops(prof) -> int:
    """Number of aten ops the step dispatched from Python or autograd (not counting nested ops)."""
    count = 0
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "llama-config"], default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/profile_step_<model>_cpu.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.model).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length), generator=generator)
    mixture, mixture_optimizer = build_lomix(base, args.experts)
    lora, lora_optimizer = build_peft(base)
    del base
    instrument()
    from peft.tuners.lora.layer import Linear as PeftLinear

    _label_base_layers(mixture, lambda m: isinstance(m, lomix.MixtureLinear))
    _label_base_layers(lora, lambda m: isinstance(m, PeftLinear))
    steps = {
        "peft_lora_r16": labelled_step(lora, lora_optimizer, ids, False),
        f"lomix_top2_of_{args.experts}_r8": labelled_step(mixture, mixture_optimizer, ids, True),
    }
    for fn in steps.values():  # warm-up (allocations, optimizer state)
        fn()
    totals: dict[str, dict[str, float]] = {name: defaultdict(float) for name in steps}
    ops: dict[str, int] = {}
    for _ in range(args.steps):
        for name, fn in steps.items():  # alternate, like the timing harness
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for part, value in breakdown(prof).items():
                totals[name][part] += value
            ops[name] = top_level_ops(prof)
    reference = sum(totals["peft_lora_r16"].values())
    parts = sorted({p for t in totals.values() for p in t})
    names = list(steps)
    print(
        f"## Training step breakdown, CPU fp32, {args.model}, batch {args.batch} x {args.length}, "
        f"{args.threads} threads, {args.steps} profiled steps each (share of the implementation's step; "
        "in brackets: fraction of PEFT LoRA's step)\n"
    )
    print("| part | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    table = {}
    for part in parts:
        row = {}
        cells = []
        for name in names:
            own = sum(totals[name].values())
            value = totals[name].get(part, 0.0)
            row[name] = {"share_of_step": value / own, "fraction_of_peft_step": value / reference}
            cells.append(f"{100 * value / own:.1f}% ({value / reference:.3f})" if value else "-")
        table[part] = row
        print(f"| {part} | " + " | ".join(cells) + " |")
    whole = {name: sum(totals[name].values()) / reference for name in names}
    print("| **whole step (profiled)** | " + " | ".join(f"100% ({whole[n]:.3f})" for n in names) + " |")
    print("| aten ops dispatched per step | " + " | ".join(f"{ops[n]:,}" for n in names) + " |")
    out = args.out or f"benchmarks/results/profile_step_{args.model}_cpu.json"
    write_json(
        out,
        {
            "machine": machine(),
            "model": args.model,
            "batch": [args.batch, args.length],
            "steps": args.steps,
            "targets": TARGETS,
            "parts": table,
            "whole_step_over_peft": whole,
            "aten_ops_per_step": ops,
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
