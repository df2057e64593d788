"""Whole-model training step on the CPU: ReMix (k=2 of 8, M selections) / softmax top-k (k=2 of 8).

    python benchmarks/remix_step.py [--model smollm2|llama-config] [--batch 2] [--length 96] [--samples 4] [--rounds 20]

Three steps on the same B examples of the same frozen model, experts of r=8 on the seven projections:
  - topk: softmax top-2 with the Switch loss, one forward of the B rows (the baseline);
  - remix: the RLOO step of the finetune recipe, one forward of the B rows replicated M times,
    per-row losses, log Q of every layer, the surrogate, backward;
  - topk_same_rows: top-2 on the same M x B rows, i.e. the work ReMix's M selections cost anyway;
    remix / topk_same_rows is the overhead of sampling, log Q and the surrogate themselves.
A step is zero_grad, forward, loss, backward and an AdamW step. benchmarks/harness.py's protocol: one process,
fixed threads, warm-up, A B C A B C ... alternation, median ratio to topk with its interquartile range.
"""

from __future__ import annotations

import argparse
import copy

import torch
from harness import fmt, machine, ratio_table, write_json
from model_step import TARGETS, load_base
from torch.nn import functional as F

import lomix
import lomix.rloo


def row_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").sum(1)


def topk_step(model, optimizer, ids):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = row_losses(model, ids).sum() / ids.numel() + lomix.aux_loss(model)
        loss.backward()
        optimizer.step()

    return step


def remix_step(model, optimizer, ids, samples):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        big = lomix.rloo.replicate({"ids": ids}, samples)["ids"]
        with lomix.rloo.recording(model):
            losses = row_losses(model, big)
            log_q = lomix.rloo.selection_log_prob(model, big.shape[0])
        loss = (losses.sum() / samples + lomix.rloo.rloo_surrogate(losses, log_q, samples)) / ids.numel()
        loss.backward()
        optimizer.step()

    return step


def mixture(base: torch.nn.Module, router: lomix.RouterConfig, switch: float) -> torch.nn.Module:
    model = lomix.inject(
        copy.deepcopy(base),
        lomix.MixtureConfig(
            target_modules=TARGETS, num_experts=8, rank=8, alpha=16, router=router, balance={"switch": switch}
        ),
    ).train()
    with torch.no_grad():  # B starts at zero; give it values so that no work can be skipped
        for _, layer in lomix.mixture_layers(model):
            layer.experts.B.normal_(std=0.01)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "llama-config"], default="smollm2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--samples", type=int, default=4, help="M selections per example")
    parser.add_argument("--granularity", choices=["sequence", "token"], default="sequence")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/remix_step_<model>_cpu.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base(args.model).train()
    ids = torch.randint(
        0, base.config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
    )
    topk = mixture(base, lomix.router_config("topk", k=2), switch=0.01)
    remix = mixture(base, lomix.router_config("remix", k=2, granularity=args.granularity, omega_alpha=16.0), switch=0.0)
    del base
    topk_opt = torch.optim.AdamW(lomix.parameter_groups(topk, lr=1e-3))
    remix_opt = torch.optim.AdamW(lomix.parameter_groups(remix, lr=1e-3))
    candidates = {
        "topk": topk_step(topk, topk_opt, ids),
        "remix": remix_step(remix, remix_opt, ids, args.samples),
        "topk_same_rows": topk_step(topk, topk_opt, ids.repeat(args.samples, 1)),
    }
    table = ratio_table(candidates, "topk", rounds=args.rounds, warmup=2)
    overhead = table["remix"]["median"] / table["topk_same_rows"]["median"]
    print(
        f"## Training step, CPU fp32, {args.model}, batch {args.batch} x {args.length}, M={args.samples}, "
        f"remix granularity {args.granularity}, {args.threads} threads (median ratio to top-k over "
        f"{args.rounds} alternating rounds, IQR)\n"
    )
    print("| step | rows per forward | step / top-k |")
    print("|---|---|---|")
    rows = {"topk": args.batch, "remix": args.batch * args.samples, "topk_same_rows": args.batch * args.samples}
    for name, entry in table.items():
        print(f"| {name} | {rows[name]} | {fmt(entry)} |")
    print(f"\nremix / topk_same_rows, ratio of the medians (ReMix's own overhead at equal rows): {overhead:.3f}")
    out = args.out or f"benchmarks/results/remix_step_{args.model}_cpu.json"
    write_json(
        out,
        {
            "args": vars(args),
            "machine": machine(),
            "ratios_to_topk": table,
            "remix_over_topk_same_rows": overhead,  # the ratio of the two medians
        },
    )


if __name__ == "__main__":
    main()
