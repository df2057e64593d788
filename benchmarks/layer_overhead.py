"""Mixture layer overhead on the CPU: MixtureLinear / nn.Linear and a per-expert loop / nn.Linear.

    python benchmarks/layer_overhead.py [--rounds 20] [--threads 2] [--out benchmarks/results/layer_overhead_cpu.json]
    python benchmarks/layer_overhead.py --strategies-only --shapes smollm2 --tokens 256 1536 --experts 8 16 32 64

Shapes from the foundation issue: T in {16, 1024}, d = 2048, r = 16, E = 8, k = 2, fp32, routing
included. Also prints the torch backend's strategies (dense-masked, sorted grid, bags) over E, which
calibrate its automatic choice (`torch_backend.prefers_dense`, then bags on the CPU): at d = 2048
square layers, or with ``--shapes smollm2`` at SmolLM2-135M's projection shapes (r = 8, the sum
over one block's seven projections).
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
    base, mixture = make_rect(d, d, rank, experts, k, kernel)
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
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/layer_overhead_cpu.json)")
    parser.add_argument("--strategies-only", action="store_true", help="only the strategy table")
    parser.add_argument("--shapes", choices=["square", "smollm2"], default="square")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024], help="token counts of the strategy table")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d, rank, experts, k = args.d, 16, 8, 2
    results = {"machine": machine(), "shape": {"d": d, "r": rank, "E": experts, "k": k, "dtype": "fp32"}, "rows": []}
    if args.strategies_only:
        results = {"machine": machine(), "strategies": strategy_table(args, k)}
        out = args.out or f"benchmarks/results/layer_strategies_{args.shapes}_cpu.json"
        write_json(out, results)
        print(f"\nwrote {out}")
        return

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

    results["strategies"] = strategy_table(args, k)
    out = args.out or "benchmarks/results/layer_overhead_cpu.json"
    write_json(out, results)
    print(f"\nwrote {out}")


# SmolLM2-135M's seven projections (d_in, d_out): q, k, v, o, gate, up, down
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def strategy_table(args, k: int) -> list[dict]:
    """The torch backend's strategies side by side (forward+backward with routing, ratio to the base)."""
    rank = 8 if args.shapes == "smollm2" else 16
    shapes = SMOLLM2_SHAPES if args.shapes == "smollm2" else [(args.d, args.d)]
    label = "one SmolLM2 block (7 projections)" if args.shapes == "smollm2" else f"d={args.d} square"
    strategies = {
        "dense": torch_backend.mixture_lora_dense,
        "sorted": torch_backend.mixture_lora_sorted,
        "bags": torch_backend.mixture_lora_bags,
    }
    rows = []
    for tokens in args.tokens:
        print(f"\n## Torch backend strategies, {label}, T={tokens}, r={rank}, k={k}, forward+backward / base\n")
        print("| E | dense extra FLOPs | dense-masked | sorted grid | bags | auto picks |")
        print("|---|---|---|---|---|---|")
        for n_exp in args.experts:
            candidates: dict[str, list] = {"base": [], **{name: [] for name in strategies}}
            for d_in, d_out in shapes:
                base, mixture = make_rect(d_in, d_out, rank, n_exp, k)
                x = torch.randn(tokens, d_in, requires_grad=True)
                grad = torch.randn(tokens, d_out)
                candidates["base"].append(timed_pass(base, x, grad))
                for name, strategy in strategies.items():
                    candidates[name].append(strategy_pass(strategy, base, mixture, x, grad))
            table = ratio_table(
                {name: _chain(passes) for name, passes in candidates.items()}, "base", max(args.rounds // 2, 8)
            )
            extra = sum(torch_backend.dense_extra_flops(n_exp, rank, i, o) * i * o for i, o in shapes) / sum(
                i * o for i, o in shapes
            )
            dense = sum(torch_backend.prefers_dense(n_exp, rank, i, o, k, tokens) for i, o in shapes)
            # the rule is per layer: a block's projections of different widths may split
            picks = "dense" if dense == len(shapes) else "bags" if not dense else f"{dense} of {len(shapes)} dense"
            print(
                f"| {n_exp} | {extra:.3f} | {fmt(table['dense'])} | {fmt(table['sorted'])} | {fmt(table['bags'])} "
                f"| {picks} |"
            )
            rows.append({"T": tokens, "E": n_exp, "r": rank, "auto": picks, **{n: table[n] for n in strategies}})
    return rows


def _chain(passes):
    def run():
        for one in passes:
            one()

    return run


def make_rect(d_in: int, d_out: int, rank: int, experts: int, k: int, kernel: str = "torch"):
    """(frozen nn.Linear d_in -> d_out, its top-k mixture layer with non-zero B)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
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
    return base, mixture


if __name__ == "__main__":
    main()
