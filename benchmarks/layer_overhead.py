"""Mixture layer overhead on the CPU: MixtureLinear / nn.Linear and a per-expert loop / nn.Linear.

    python benchmarks/layer_overhead.py [--rounds 20] [--threads 2] [--out benchmarks/results/layer_overhead_cpu.json]

Shapes from the foundation issue: T in {16, 1024}, d = 2048, r = 16, E = 8, k = 2, fp32, routing
included. Also prints the dense-masked vs sorted strategy ratios over E, which calibrate the
torch backend's automatic choice (`torch_backend.prefers_dense`).
"""

from __future__ import annotations

import argparse

import torch
from harness import fmt, machine, ratio_table, write_json
from torch import nn

import lomix
from lomix.kernels import torch_backend


class PerExpertLoop(nn.Module):
    """The MixLoRA / MoE-PEFT style layer: route, then one masked gather + LoRA per expert."""

    def __init__(self, mixture: lomix.MixtureLinear):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mixture
        out = m.base_layer(x)
        routing = m.router(x, lomix.RoutingContext())
        flat = x.reshape(-1, m.d_in)
        delta = torch.zeros_like(out).reshape(-1, m.d_out)
        for e in range(m.experts.num_experts):
            token, slot = torch.where(routing.indices == e)
            if token.numel():
                y = (flat[token] @ m.experts.A[e].T) @ m.experts.B[e].T
                delta = delta.index_add(0, token, y * (routing.gates[token, slot] * m.scale).unsqueeze(-1))
        return out + delta.reshape(out.shape)


def make_layers(d: int, rank: int, experts: int, k: int, kernel: str = "torch"):
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False).requires_grad_(False)
    config = lomix.MixtureConfig(
        target_modules=["x"],
        num_experts=experts,
        rank=rank,
        alpha=2 * rank,
        router=lomix.router_config("topk", k=k),
        balance=lomix.BalanceConfig(switch=0.0),
        kernel=kernel,
    )
    mixture = lomix.MixtureLinear(base, config)
    with torch.no_grad():
        mixture.experts.B.normal_(std=0.01)
    return base, mixture, PerExpertLoop(mixture)


def timed_pass(module, x: torch.Tensor, grad: torch.Tensor | None):
    """A closure running one forward (``grad`` None, no autograd) or forward+backward of ``module``."""

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        x.grad = None
        module(x).backward(grad)

    return forward if grad is None else forward_backward


def strategy_pass(strategy, base: nn.Module, mixture: lomix.MixtureLinear, x: torch.Tensor, grad: torch.Tensor):
    """Forward+backward of base + router + one torch-backend strategy, outside MixtureLinear."""

    def run():
        x.grad = None
        routing = mixture.router(x, lomix.RoutingContext())
        out = strategy(x, mixture.experts.A, mixture.experts.B, routing.indices, routing.gates, mixture.scale, base(x))
        out.backward(grad)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--out", default="benchmarks/results/layer_overhead_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d, rank, experts, k = args.d, 16, 8, 2
    results = {"machine": machine(), "shape": {"d": d, "r": rank, "E": experts, "k": k, "dtype": "fp32"}, "rows": []}

    print(
        f"## Mixture layer overhead, CPU, fp32, d={d}, r={rank}, E={experts}, k={k} "
        f"(median ratio over {args.rounds} alternating rounds, IQR in brackets)\n"
    )
    print("| T | pass | lomix / Linear | per-expert loop / Linear | loop overhead / lomix overhead |")
    print("|---|---|---|---|---|")
    base, mixture, loop = make_layers(d, rank, experts, k)
    for tokens in (16, 1024):
        x = torch.randn(tokens, d)
        for label in ("forward", "forward+backward"):
            xg = x.clone().requires_grad_(label != "forward")
            grad = torch.randn(tokens, d) if label != "forward" else None
            passes = {name: timed_pass(m, xg, grad) for name, m in (("base", base), ("lomix", mixture), ("loop", loop))}
            table = ratio_table(passes, "base", args.rounds)
            gain = (table["loop"]["median"] - 1) / max(table["lomix"]["median"] - 1, 1e-9)
            print(f"| {tokens} | {label} | {fmt(table['lomix'])} | {fmt(table['loop'])} | {gain:.2f}x |")
            results["rows"].append(
                {
                    "T": tokens,
                    "pass": label,
                    **{n: table[n] for n in ("lomix", "loop")},
                    "loop_overhead_over_lomix_overhead": gain,
                }
            )

    print("\n## Torch backend strategies, T=1024, forward+backward, ratio to nn.Linear\n")
    print("| E | r | dense extra FLOPs | dense-masked | sorted segments | auto picks |")
    print("|---|---|---|---|---|---|")
    results["strategies"] = []
    x = torch.randn(1024, d, requires_grad=True)
    grad = torch.randn(1024, d)
    for n_exp in (8, 16, 32, 64, 128):
        base, mixture, _ = make_layers(d, rank, n_exp, k)
        table = ratio_table(
            {
                "base": timed_pass(base, x, grad),
                "dense": strategy_pass(torch_backend.mixture_lora_dense, base, mixture, x, grad),
                "sorted": strategy_pass(torch_backend.mixture_lora_sorted, base, mixture, x, grad),
            },
            "base",
            max(args.rounds // 2, 8),
        )
        extra = torch_backend.dense_extra_flops(n_exp, rank, d, d)
        picks = "dense" if torch_backend.prefers_dense(n_exp, rank, d, d, k, 1024) else "sorted"
        print(f"| {n_exp} | {rank} | {extra:.3f} | {fmt(table['dense'])} | {fmt(table['sorted'])} | {picks} |")
        results["strategies"].append({"E": n_exp, "dense": table["dense"], "sorted": table["sorted"], "auto": picks})
    write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
