"""Training step of each token router, relative to top-2 (E=8, r=8) on the same model and batch.

    python benchmarks/router_step.py [--model smollm2|llama-config] [--batch 4] [--length 64] [--rounds 20]

The routers of benchmarks/router_quickstart.py, timed side by side in one process (alternating rounds,
median ratio to topk with its interquartile range; absolute times are never reported): top-p pays for
max_k kernel slots per token whatever p selects, loss-free balancing adds a bias update after each
optimizer step, expert-choice sorts every expert's scores over the batch. A step is zero_grad,
forward, loss plus the router's auxiliary losses, backward, AdamW and `lomix.after_optimizer_step`.
"""

from __future__ import annotations

import argparse
import copy

import model_step
import torch
from harness import fmt, machine, ratio_table, write_json
from model_step import TARGETS, load_base

import lomix

ROUTERS: dict[str, dict] = {
    "topk": {"name": "topk", "k": 2},
    "topp-0.5 (max_k 4)": {"name": "topp", "p": 0.5, "max_k": 4},
    "topp-0.8 (max_k 4)": {"name": "topp", "p": 0.8, "max_k": 4},
    "topk+bias": {"name": "topk", "k": 2, "bias_update_rate": 1e-3},
    "expert-choice (c=2)": {"name": "expert_choice", "capacity_factor": 2.0, "eval_k": 2},
}


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor):
    """model_step's step (with the auxiliary losses), then the routers' post-step update (loss-free bias)."""
    step = model_step.training_step(model, optimizer, ids, aux=True)

    def step_and_update() -> None:
        step()
        lomix.after_optimizer_step(model)

    return step_and_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "llama-config"], default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/router_step_<model>_cpu.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.model).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length), generator=generator)
    candidates = {}
    for label, router in ROUTERS.items():
        options = dict(router)
        model = lomix.inject(
            copy.deepcopy(base),
            lomix.MixtureConfig(
                target_modules=TARGETS,
                num_experts=8,
                rank=8,
                alpha=16,
                router=lomix.router_config(options.pop("name"), **options),
            ),
        ).train()
        with torch.no_grad():  # B starts at zero; give it values so that no work can be skipped
            for _, layer in lomix.mixture_layers(model):
                layer.experts.B.normal_(std=0.01)
        candidates[label] = training_step(model, torch.optim.AdamW(lomix.parameter_groups(model, lr=1e-3)), ids)
    del base
    table = ratio_table(candidates, "topk", rounds=args.rounds, warmup=2)
    print(
        f"## Training step per router, CPU fp32, {args.model}, batch {args.batch} x {args.length}, "
        f"{args.threads} threads (median ratio to topk over {args.rounds} alternating rounds, IQR)\n"
    )
    print("| router | step / topk |")
    print("|---|---|")
    for name, entry in table.items():
        print(f"| {name} | {fmt(entry)} |")
    out = args.out or f"benchmarks/results/router_step_{args.model}_cpu.json"
    write_json(
        out,
        {
            "machine": machine(),
            "model": args.model,
            "batch": [args.batch, args.length],
            "rounds": args.rounds,
            "routers": ROUTERS,
            "ratios_to_topk": table,
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
