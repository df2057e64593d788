"""GPU benchmark of the mixture layer: the fused Triton layer (router + shrink in one launch, expand
inside the base GEMM), the Triton and torch mixture kernels, a per-expert loop, PEFT's LoRA and
X-LoRA layers, as ratios to the frozen base F.linear (cuBLAS) of the same shape.

    python benchmarks/kernel_bench.py [--quick] [--skip-masked-sweep] [--out-dir benchmarks/results]

The fused rows time the whole layer (base GEMM, router, experts) with the router's own selection:
their work does not depend on which experts are selected (every expert's shrink and expand runs,
masked), so the skew column does not change what they compute. "Triton GEMM base" is the fused
kernel's GEMM without the mixture, to compare the Triton GEMM itself with cuBLAS. Tiles come from
the tuning file of the GPU (lomix/kernels/tuning/, or LOMIX_KERNEL_TUNING; defaults otherwise).

Protocol (as docs/performance.md reports it): triton.testing.do_bench medians (warm-up 25 ms, 100 ms of repeats),
do_bench_cudagraph for the forward at T <= 64, the base F.linear timed in the same run, routing
included in every timed region (router GEMM, softmax, top-k), router skew swept: the experts each
token uses are drawn from a uniform, a Zipf(1.5) or a "one expert takes 50%" distribution, and the
gates are the router probabilities of those experts, renormalised. Shapes: T in {1, 16, 64, 1024,
8192}, d = 4096, r = 16, E = 8, k = 2, bf16. Also checks the Triton output against an fp32
reference at every shape and reports the activation bytes each implementation saves for backward.
Writes kernels_gpu.json and kernels_gpu.md to --out-dir.

``--smoke`` runs the whole script on tiny shapes under the Triton interpreter on the CPU (no GPU):
it checks that the script works and writes nothing; its "timings" mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from lomix.kernels import fused_backend, torch_backend, triton_backend  # noqa: E402
from lomix.kernels.fused_tuning import tuning_for  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"


def skewed_indices(tokens: int, experts: int, k: int, skew: str, generator: torch.Generator) -> torch.Tensor:
    """(T, k) distinct experts per token, drawn without replacement from the skew's distribution."""
    if skew == "uniform":
        weights = torch.ones(experts)
    elif skew == "zipf1.5":
        weights = 1.0 / torch.arange(1, experts + 1).double() ** 1.5
    elif skew == "hot50":  # expert 0 gets about half of all (token, slot) assignments
        weights = torch.full((experts,), 1.0)
        weights[0] = 1e6  # always first choice: with k=2 it holds 50% of the slots
    else:
        raise ValueError(skew)
    return torch.multinomial(weights.float().expand(tokens, -1), k, replacement=False, generator=generator)


class Layer:
    """The tensors of one mixture layer and the timed implementations over them."""

    def __init__(self, tokens, d, rank, experts, k, skew, dtype, device=DEVICE):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(tokens, d, generator=g).to(device, dtype).requires_grad_()
        self.W = (torch.randn(d, d, generator=g) / d**0.5).to(device, dtype)
        self.A = (torch.randn(experts, rank, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
        self.B = (torch.randn(experts, d, rank, generator=g) / rank**0.5).to(device, dtype).requires_grad_()
        self.router = (torch.randn(experts, d, generator=g) * 0.02).to(device, dtype).requires_grad_()
        self.indices = skewed_indices(tokens, experts, k, skew, g).to(device)
        self.grad = torch.randn(tokens, d, generator=g).to(device, dtype)
        self.k, self.scale, self.experts, self.rank = k, 2.0, experts, rank
        self.xlora = self.peft_layer = None
        self.tuning = tuning_for(torch.device(device))

    def route(self, x):
        probs = F.linear(x, self.router).float().softmax(-1)
        probs.topk(self.k, dim=-1)  # a real router's selection cost, kept in the timed region
        gates = probs.gather(1, self.indices)
        return self.indices, gates / gates.sum(-1, keepdim=True)

    def base(self, x):
        return F.linear(x, self.W)

    def _triton(self, x, strategy):
        idx, gates = self.route(x)
        return triton_backend.mixture_lora_triton(
            x, self.A, self.B, idx, gates.to(x.dtype), self.scale, self.base(x), strategy=strategy
        )

    def triton_masked(self, x):
        return self._triton(x, "masked")

    def triton_sorted(self, x):
        return self._triton(x, "sorted")

    def fused(self, x):
        """The fused layer: base GEMM + softmax top-2 router + every expert, two launches."""
        y, _, _, _ = fused_backend.fused_mixture_linear(
            x, self.W, None, self.router, self.A, self.B, self.scale, self.k, True, self.tuning
        )
        return y

    def triton_gemm_base(self, x):
        """The fused kernel's GEMM with no mixture segment: the base GEMM alone, on Triton."""
        w = self.W
        return fused_backend.extended_gemm(x, w, (w.stride(1), w.stride(0)), w.shape[0], [], None, self.tuning)

    def build_peft_lora(self):
        """PEFT's own LoRA layer, one adapter of rank 16, over the same base weight."""
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear

        d = self.W.shape[0]
        base = torch.nn.Linear(d, d, bias=False, device=DEVICE, dtype=self.W.dtype)
        base.weight.data.copy_(self.W)
        base.requires_grad_(False)
        config = LoraConfig(r=16, lora_alpha=32)
        self.peft_layer = LoraLinear(base, adapter_name="default", config=config, r=16, lora_alpha=32)
        self.peft_layer.to(device=DEVICE, dtype=self.W.dtype)

    def peft_lora(self, x):
        return self.peft_layer(x)

    def lora_r16(self, x):
        """One plain LoRA of rank 16 (PEFT's unfused computation), the cost lomix aims to match."""
        return self.base(x) + (x @ self.A[0].T) @ self.B[0].T * self.scale

    def torch_dense(self, x):
        idx, gates = self.route(x)
        return torch_backend.mixture_lora_dense(x, self.A, self.B, idx, gates, self.scale, self.base(x))

    def torch_sorted(self, x):
        idx, gates = self.route(x)
        return torch_backend.mixture_lora_sorted(x, self.A, self.B, idx, gates, self.scale, self.base(x))

    def loop(self, x):
        idx, gates = self.route(x)
        out = self.base(x)
        for e in range(self.experts):
            token, slot = torch.where(idx == e)
            y = (x[token] @ self.A[e].T) @ self.B[e].T
            out = out.index_add(0, token, y * (gates[token, slot] * self.scale).unsqueeze(-1).to(y.dtype))
        return out

    def build_xlora(self):
        """PEFT's own X-LoRA layer over a LoRA layer holding the same E experts (named "0".."E-1")."""
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.xlora.config import XLoraConfig
        from peft.tuners.xlora.layer import XLoraLinearLayer

        d = self.W.shape[0]
        base = torch.nn.Linear(d, d, bias=False, device=DEVICE, dtype=self.W.dtype)
        base.weight.data.copy_(self.W)
        base.requires_grad_(False)
        config = LoraConfig(r=self.rank, lora_alpha=2 * self.rank)
        target = LoraLinear(base, adapter_name="0", config=config, r=self.rank, lora_alpha=2 * self.rank)
        for e in range(1, self.experts):
            target.update_layer(str(e), r=self.rank, lora_alpha=2 * self.rank, config=config)
        target.to(device=DEVICE, dtype=self.W.dtype)
        target.set_adapter([str(e) for e in range(self.experts)])
        xconfig = XLoraConfig(hidden_size=d, adapters={str(e): "-" for e in range(self.experts)}, top_k_lora=self.k)
        self.xlora = XLoraLinearLayer(types.SimpleNamespace(disabled=False), target, target.forward, 0, xconfig)

    def peft_xlora(self, x):
        probs = F.linear(x, self.router).float().softmax(-1)
        scalings = probs.to(x.dtype).view(1, x.shape[0], 1, -1)  # (batch, seq, layers, experts)
        return self.xlora.forward(x.unsqueeze(0), scalings=scalings).squeeze(0)


def _smoke_timer(fn, **_) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if SMOKE:
    do_bench = do_bench_cudagraph = _smoke_timer


# These synchronise with the host (.tolist(), boolean indexing): no CUDA-graph capture.
NOT_GRAPHABLE = {"torch_sorted", "loop"}
# Has no backward of its own (the fused layer's backward is timed in "fused").
FORWARD_ONLY = {"triton_gemm_base"}


def bench(fn, backward: bool, layer: Layer, graph: bool) -> float:
    if backward:

        def run():
            layer.x.grad = layer.A.grad = layer.B.grad = layer.router.grad = None
            fn(layer.x).backward(layer.grad)

        return do_bench(run, warmup=25, rep=100)
    x = layer.x.detach()

    def forward():
        with torch.no_grad():
            fn(x)

    if graph:
        return do_bench_cudagraph(forward, rep=100)
    return do_bench(forward, warmup=25, rep=100)


def saved_bytes(fn, layer: Layer) -> int:
    """Bytes of activations autograd keeps for backward (parameters and the input x excluded)."""
    params = {p.data_ptr() for p in (layer.A, layer.B, layer.router, layer.W, layer.x)}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(layer.x)
    return sum(seen.values())


def graph_replay_error(layer: Layer) -> float:
    """Capture the fused forward in a CUDA graph, replay it on new inputs copied into the captured
    buffer, and return its max abs difference from an eager call (0 when graph-safe)."""
    static_x = layer.x.detach().clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer.fused(static_x)  # warm-up (compilation) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer.fused(static_x)
        fresh = torch.randn_like(static_x)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        return (static_y.float() - layer.fused(fresh).float()).abs().max().item()


def check(layer: Layer) -> float:
    """Max abs error of the Triton forwards vs an fp32 reference, relative to the delta's max."""
    x = layer.x.detach()
    with torch.no_grad():
        idx, gates = layer.route(x)
        ref = torch_backend.mixture_lora_dense(x.float(), layer.A.float(), layer.B.float(), idx, gates, layer.scale)
        errors = []
        for strategy in ("masked", "sorted"):
            ours = triton_backend.mixture_lora_triton(
                x, layer.A, layer.B, idx, gates.to(x.dtype), layer.scale, strategy=strategy
            ).float()
            errors.append(((ours - ref).abs().max() / ref.abs().max()).item())
        # the fused layer, against base + its own routing in fp32 (where its selection agrees)
        y, _, f_idx, f_gates = fused_backend.fused_mixture_linear(
            x, layer.W, None, layer.router, layer.A, layer.B, layer.scale, layer.k, True, layer.tuning
        )
        delta = torch_backend.mixture_lora_dense(
            x.float(), layer.A.float(), layer.B.float(), f_idx, f_gates, layer.scale
        )
        errors.append(((y.float() - (x.float() @ layer.W.float().t() + delta)).abs().max() / delta.abs().max()).item())
    return max(errors)


def breakdown(layer: Layer) -> dict[str, float]:
    """Milliseconds of the pieces of each Triton strategy's forward, and of the base, for reading."""
    x = layer.x.detach()
    idx, gates = layer.route(x)
    gates = gates.to(x.dtype)
    a, b = layer.A.detach(), layer.B.detach()
    num_experts = a.shape[0]
    block_m = triton_backend._block_m(idx.numel())
    return {
        "base_fwd": do_bench(lambda: layer.base(x)),
        "router": do_bench(lambda: layer.route(x)),
        "sorted_plan": do_bench(lambda: triton_backend.make_plan(idx, num_experts, block_m)),
        "sorted_delta": do_bench(
            lambda: triton_backend.mixture_lora_triton(x, a, b, idx, gates, 2.0, strategy="sorted")
        ),
        "masked_shrink_gemm": do_bench(lambda: x @ triton_backend._cat_a(a, x.dtype).t()),
        "masked_delta": do_bench(
            lambda: triton_backend.mixture_lora_triton(x, a, b, idx, gates, 2.0, strategy="masked")
        ),
    }


def sweep_masked_tiles(layer: Layer) -> dict:
    """Time the masked strategy's forward (with the fused add) and backward prep over launch
    settings, set the fastest as MASKED_TILES for the rest of the run, and return the table."""
    import itertools

    x = layer.x.detach()
    idx, gates = layer.route(x)
    gates = gates.to(x.dtype).contiguous()
    a, b = layer.A.detach(), layer.B.detach()
    base = layer.base(x)
    tiles = triton_backend.MASKED_TILES
    results = {"forward": {}, "prep": {}}
    for block_m, block_n, warps in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)):
        tiles.block_m, tiles.block_n, tiles.num_warps = block_m, block_n, warps
        fn = lambda: triton_backend.mixture_lora_triton(x, a, b, idx, gates, 2.0, base, strategy="masked")  # noqa: E731
        try:
            results["forward"][f"{block_m}x{block_n}w{warps}"] = do_bench(fn)
        except Exception as exc:  # a config that does not compile (shared memory, registers)
            results["forward"][f"{block_m}x{block_n}w{warps}"] = f"{type(exc).__name__}"
    timed = {k: v for k, v in results["forward"].items() if isinstance(v, float)}
    best = min(timed, key=timed.get)
    tiles.block_m, tiles.block_n, tiles.num_warps = (int(v) for v in best.replace("x", " ").replace("w", " ").split())
    xg, ag, bg, gg = (t.clone().requires_grad_() for t in (x, a, b, gates))

    def forward_backward():
        y = triton_backend.mixture_lora_triton(xg, ag, bg, idx, gg, 2.0, strategy="masked")
        torch.autograd.grad(y, (xg, ag, bg, gg), layer.grad)

    for block_m, warps in itertools.product((32, 64, 128), (4, 8)):
        tiles.prep_block_m, tiles.prep_num_warps = block_m, warps
        try:
            results["prep"][f"{block_m}w{warps}"] = do_bench(forward_backward)
        except Exception as exc:
            results["prep"][f"{block_m}w{warps}"] = f"{type(exc).__name__}"
    timed = {k: v for k, v in results["prep"].items() if isinstance(v, float)}
    best_prep = min(timed, key=timed.get)
    tiles.prep_block_m, tiles.prep_num_warps = (int(v) for v in best_prep.split("w"))
    results["chosen"] = {"forward": best, "prep": best_prep}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T in {16, 8192}, uniform skew only")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter; writes nothing")
    parser.add_argument(
        "--skip-masked-sweep", action="store_true", help="keep the masked kernel's default tiles (saves ~1 minute)"
    )
    args = parser.parse_args()
    d, rank, experts, k, dtype = 4096, 16, 8, 2, torch.bfloat16
    token_counts = (16, 8192) if args.quick else (1, 16, 64, 1024, 8192)
    skews = ("uniform",) if args.quick else ("uniform", "zipf1.5", "hot50")
    if args.smoke:
        d, dtype, token_counts, skews = 32, torch.float32, (3, 40), ("uniform", "hot50")
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    impls = [
        "fused", "triton_gemm_base", "triton_masked", "triton_sorted", "torch_dense", "torch_sorted", "loop",
        "peft_xlora", "peft_lora", "lora_r16",
    ]  # fmt: skip
    info = {
        "gpu": "cpu-smoke" if args.smoke else torch.cuda.get_device_name(),
        "capability": "-" if args.smoke else ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"d": d, "r": rank, "E": experts, "k": k, "dtype": str(dtype).removeprefix("torch.")},
    }
    print(json.dumps(info))
    rows, notes = [], {}
    if args.skip_masked_sweep:
        tiles = triton_backend.MASKED_TILES
        tile_sweep = {
            "chosen": f"defaults {tiles.block_m}x{tiles.block_n}w{tiles.num_warps}, "
            f"prep {tiles.prep_block_m}w{tiles.prep_num_warps}"
        }
    else:
        tile_sweep = sweep_masked_tiles(Layer(token_counts[-1], d, rank, experts, k, "uniform", dtype))
    print(json.dumps({"masked_tile_sweep": tile_sweep}), flush=True)
    info["fused_tuning"] = tuning_for(torch.device(DEVICE)).to_dict()
    info["masked_tiles"] = tile_sweep["chosen"]
    for tokens in token_counts:
        for skew in skews:
            layer = Layer(tokens, d, rank, experts, k, skew, dtype)
            try:
                layer.build_xlora()
            except Exception as exc:  # "where it installs": record why not
                notes["peft_xlora"] = f"{type(exc).__name__}: {exc}"
            try:
                layer.build_peft_lora()
            except Exception as exc:
                notes["peft_lora"] = f"{type(exc).__name__}: {exc}"
            row = {"T": tokens, "skew": skew, "max_rel_err": check(layer)}
            if tokens <= 64 and not args.smoke:
                try:
                    row["fused_graph_replay_err"] = graph_replay_error(layer)
                except Exception as exc:
                    notes[f"fused CUDA graph T={tokens}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            for backward in (False, True):
                graph = not backward and tokens <= 64
                label = "fwd+bwd" if backward else "fwd"
                base_ms = bench(layer.base, backward=False, layer=layer, graph=graph)
                if backward:  # base fwd+bwd: dx only (the base weight is frozen)
                    base_ms = bench(layer.base, backward=True, layer=layer, graph=False)
                row[f"{label}_base_ms"] = base_ms
                for name in impls:
                    missing = (name == "peft_xlora" and layer.xlora is None) or (
                        name == "peft_lora" and layer.peft_layer is None
                    )
                    if missing or (backward and name in FORWARD_ONLY):
                        continue
                    try:
                        ms = bench(getattr(layer, name), backward, layer, graph and name not in NOT_GRAPHABLE)
                        row[f"{label}_{name}"] = ms / base_ms
                    except Exception as exc:
                        notes[f"{name} {label} T={tokens}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if tokens == token_counts[-1] and skew == "uniform":
                for name in ("fused", "triton_masked", "triton_sorted", "torch_dense", "loop"):
                    row[f"saved_MiB_{name}"] = saved_bytes(getattr(layer, name), layer) / 2**20
                row["triton_breakdown_ms"] = breakdown(layer)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del layer
            if not args.smoke:
                torch.cuda.empty_cache()
                # after every row: a run stopped by its time limit still leaves what it measured
                write_results(Path(args.out_dir), info, rows, notes, tile_sweep, impls, d, token_counts, len(skews))
    if args.smoke:  # the writer runs too, into a folder deleted afterwards
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            lines = write_results(Path(scratch), info, rows, notes, tile_sweep, impls, d, token_counts, len(skews))
        print("\n".join(lines))
        print(f"smoke run finished: {len(rows)} rows, notes: {notes}")
        return
    print(
        "\n".join(write_results(Path(args.out_dir), info, rows, notes, tile_sweep, impls, d, token_counts, len(skews)))
    )


def write_results(out: Path, info, rows, notes, tile_sweep, impls, d, token_counts, n_skews) -> list[str]:
    from lomix.kernels import fused

    info["fused_broken"] = fused._fused_broken  # None unless the fused kernels failed here
    lines = render(info, rows, notes, tile_sweep, impls, d, token_counts[-1])
    if len(rows) < len(token_counts) * n_skews:
        lines += ["", f"PARTIAL: {len(rows)} rows written so far (the run stopped or is still going)."]
    out.mkdir(parents=True, exist_ok=True)
    payload = {"info": info, "rows": rows, "notes": notes, "masked_tile_sweep": tile_sweep}
    (out / "kernels_gpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "kernels_gpu.md").write_text("\n".join(lines) + "\n")
    return lines


# Issue 20's targets for the fused layer / base ratio: (T range, pass) -> (must reach, aim).
TARGETS = {((8192, 8192), "fwd"): (1.10, 1.06), ((8192, 8192), "fwd+bwd"): (1.20, 1.08), ((1, 64), "fwd"): (1.5, 1.15)}

COLUMN_TITLES = {
    "fused": "fused layer (Triton)",
    "triton_gemm_base": "Triton GEMM base alone",
    "triton_masked": "Triton masked",
    "triton_sorted": "Triton sorted",
    "torch_dense": "torch dense-masked",
    "torch_sorted": "torch sorted",
    "loop": "per-expert loop",
    "peft_xlora": "PEFT X-LoRA layer",
    "peft_lora": "PEFT LoRA r=16 layer",
    "lora_r16": "one LoRA r=16 (torch, no routing)",
}


def target_lines(rows: list[dict]) -> list[str]:
    """Which of the issue's targets the fused layer met in this run (uniform skew rows)."""
    lines = ["| T | pass | fused | must reach | aim | met | faster than torch LoRA r=16 | than PEFT LoRA |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["skew"] != "uniform":
            continue
        for label in ("fwd", "fwd+bwd"):
            fused = row.get(f"{label}_fused")
            if fused is None:
                continue
            goal = next(
                (v for (lo_hi, p), v in TARGETS.items() if p == label and lo_hi[0] <= row["T"] <= lo_hi[1]), None
            )
            must, aim = goal if goal else (None, None)
            met = "-" if must is None else ("aim" if fused <= aim else "yes" if fused <= must else "no")
            lora, peft = row.get(f"{label}_lora_r16"), row.get(f"{label}_peft_lora")
            cells = [
                f"{fused:.3f}",
                "-" if must is None else f"{must}",
                "-" if aim is None else f"{aim}",
                met,
                "-" if lora is None else ("yes" if fused < lora else "no"),
                "-" if peft is None else ("yes" if fused < peft else "no"),
            ]
            lines.append(f"| {row['T']} | {label} | " + " | ".join(cells) + " |")
    return lines


def render(info, rows, notes, tile_sweep, impls, d, big_t) -> list[str]:
    lines = [
        f"# Mixture layer / base F.linear on {info['gpu']} (torch {info['torch']}, triton {info['triton']})",
        "",
        f"d={d}, r=16, E=8, k=2, {info['shape']['dtype']}; routing included; medians of triton.testing.do_bench "
        "(forward at T<=64 with CUDA graphs). Ratios to the base F.linear (cuBLAS) of the same shape. "
        f"Masked-kernel tiles: {tile_sweep['chosen']}. Fused-layer tuning: {info.get('fused_tuning', {}).get('gpu')}. "
        "The fused layer routes with its own router (its work does not depend on the selection).",
        "",
        "| T | skew | pass | " + " | ".join(COLUMN_TITLES[n] for n in impls) + " |",
        "|---|---|---|" + "---|" * len(impls),
    ]
    for row in rows:
        for label in ("fwd", "fwd+bwd"):
            cells = [f"{row[f'{label}_{n}']:.3f}" if f"{label}_{n}" in row else "-" for n in impls]
            lines.append(f"| {row['T']} | {row['skew']} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Fused layer against the targets of issue 20 (uniform skew):", "", *target_lines(rows)]
    errors = ", ".join(f"T={r['T']} {r['skew']}: {r['max_rel_err']:.1e}" for r in rows)
    lines += ["", f"Triton forwards vs fp32 reference, max abs error / max |delta|: {errors}"]
    replays = ", ".join(
        f"T={r['T']} {r['skew']}: {r['fused_graph_replay_err']:.1e}" for r in rows if "fused_graph_replay_err" in r
    )
    if replays:
        lines += [
            "",
            f"Fused forward captured in a CUDA graph and replayed on new inputs, max abs diff from eager: {replays}",
        ]
    saved = [r for r in rows if "saved_MiB_triton_masked" in r]
    if saved:
        r = saved[0]
        lines += [
            "",
            f"Activations saved for backward at T={r['T']} (excluding x and parameters): fused "
            f"{r['saved_MiB_fused']:.1f} MiB, Triton masked "
            f"{r['saved_MiB_triton_masked']:.1f} MiB, Triton sorted {r['saved_MiB_triton_sorted']:.1f} MiB, "
            f"torch dense {r['saved_MiB_torch_dense']:.1f} MiB, "
            f"loop {r['saved_MiB_loop']:.1f} MiB (x itself is {r['T'] * d * 2 / 2**20:.0f} MiB).",
        ]
    for r in rows:
        if "triton_breakdown_ms" in r:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["triton_breakdown_ms"].items())
            lines += ["", f"Triton pieces at T={r['T']} (ms, for reading only, not a result): {parts}"]
    if notes:
        lines += ["", "Notes:"] + [f"- {k}: {v}" for k, v in notes.items()]
    return lines


if __name__ == "__main__":
    main()
