"""Measure the fused mixture kernels' launch tiles and E*r threshold on this GPU; write its tuning file.

    python benchmarks/autotune_fused.py [--quick] [--d 4096] [--out lomix/kernels/tuning/<gpu>.json]

Sweeps (bf16, d x d base, r=16, k=2, medians of triton.testing.do_bench):
- ``gemm``: `extended_gemm` tiles for the base GEMM with the expand inside it, at T=8192;
- ``decode_gemm``: the same for T in {16, 64} (small BLOCK_M, CUDA-graph sized work);
- ``shrink`` / ``decode_shrink``: `router_shrink` tiles at T=8192 and T=16;
- ``max_columns``: the largest E*r (E = E*r / 16) at which the fused layer's forward+backward is
  still no slower than today's path (cuBLAS base + torch router + Triton mixture, sorted for wide
  mixtures) at T=8192; wider mixtures keep today's path.
The chosen values go to the tuning file (the layer reads it at the next start, see
lomix/kernels/fused_tuning.py); every timing is printed as one JSON line for the record.

``--smoke`` runs every sweep on tiny shapes under the Triton interpreter on the CPU, two
candidates each: it checks the script and the file it writes, and its "timings" mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from lomix.kernels import fused_backend, triton_backend  # noqa: E402
from lomix.kernels.fused_tuning import (  # noqa: E402
    TUNING_DIR,
    FusedTuning,
    GemmTiles,
    ShrinkTiles,
    gpu_slug,
    tuning_from_dict,
)

DEVICE = "cpu" if SMOKE else "cuda"


def timer(fn) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return do_bench(fn, warmup=25, rep=60)


class Problem:
    """One layer's tensors: x (T, d), W (d, d), router (E, d), A (E, r, d), B (E, d, r)."""

    def __init__(self, tokens, d, experts, rank, dtype):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(tokens, d, generator=g).to(DEVICE, dtype)
        self.W = (torch.randn(d, d, generator=g) / d**0.5).to(DEVICE, dtype)
        self.router = (torch.randn(experts, d, generator=g) * 0.02).to(DEVICE)
        self.A = (torch.randn(experts, rank, d, generator=g) / d**0.5).to(DEVICE)
        self.B = (torch.randn(experts, d, rank, generator=g) / rank**0.5).to(DEVICE)
        self.grad = torch.randn(tokens, d, generator=g).to(DEVICE, dtype)
        self.k, self.scale = 2, 2.0

    def gemm(self, tuning):
        z = torch.zeros(self.x.shape[0], self.A.shape[0] * self.A.shape[1], device=DEVICE, dtype=self.x.dtype)
        b_cat = triton_backend._cat_b(self.B, self.x.dtype)
        w = self.W
        segment = [(z, b_cat, z.shape[1], 1, (b_cat.stride(0), 0, b_cat.stride(1)))]
        return lambda: fused_backend.extended_gemm(
            self.x, w, (w.stride(1), w.stride(0)), w.shape[0], segment, None, tuning
        )

    def shrink(self, tuning):
        return lambda: fused_backend.router_shrink(self.x, self.router, self.A, self.k, True, self.scale, True, tuning)

    def fused_step(self, tuning):
        leaves = [t.detach().clone().requires_grad_() for t in (self.x, self.router, self.A, self.B)]

        def step():
            x, router, A, B = leaves
            y, _, _, _ = fused_backend.fused_mixture_linear(
                x, self.W, None, router, A, B, self.scale, self.k, True, tuning
            )
            torch.autograd.grad(y, leaves, self.grad)

        return step

    def todays_step(self):
        leaves = [t.detach().clone().requires_grad_() for t in (self.x, self.router, self.A, self.B)]

        def step():
            x, router, A, B = leaves
            probs = F.linear(x, router.to(x.dtype)).float().softmax(-1)
            gates, indices = probs.topk(self.k, dim=-1)
            gates = gates / gates.sum(-1, keepdim=True)
            y = triton_backend.mixture_lora_triton(x, A, B, indices, gates.to(x.dtype), self.scale, F.linear(x, self.W))
            torch.autograd.grad(y, leaves, self.grad)

        return step


def best(name: str, candidates: list, measure) -> object:
    """The candidate with the smallest time; failures (no compile: registers, shared memory) skipped."""
    timed = []
    for candidate in candidates:
        try:
            ms = measure(candidate)
        except Exception as exc:
            print(json.dumps({"sweep": name, "config": dataclasses.asdict(candidate), "error": type(exc).__name__}))
            continue
        print(json.dumps({"sweep": name, "config": dataclasses.asdict(candidate), "ms": ms}), flush=True)
        timed.append((ms, candidate))
    if not timed:
        raise SystemExit(f"autotune: no {name} candidate ran")
    return min(timed, key=lambda pair: pair[0])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=4096, help="the base layer's width (d x d)")
    parser.add_argument("--quick", action="store_true", help="fewer candidates (the GPU check's budget)")
    parser.add_argument("--out", default=None, help="tuning file to write (default: the GPU's file in lomix)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    args = parser.parse_args()
    if args.smoke:
        if args.out is None:
            parser.error("--smoke needs --out (it must not replace a GPU's tuning file)")
        d, big, decode_ts, dtype, widths = 32, 40, (3,), torch.float32, (32, 64)
        gpu = "cpu-smoke"
    else:
        if not torch.cuda.is_available():
            parser.error("this script needs a CUDA GPU (or --smoke)")
        d, big, decode_ts, dtype, widths = args.d, 8192, (16, 64), torch.bfloat16, (64, 128, 256, 512)
        gpu = torch.cuda.get_device_name()
    out = Path(args.out) if args.out else TUNING_DIR / f"{gpu_slug(gpu)}.json"
    quick = args.quick or args.smoke
    limit = 2 if args.smoke else None
    tuning = FusedTuning(gpu=gpu)

    big_problem = Problem(big, d, 8, 16, dtype)
    gemm_candidates = [
        GemmTiles(block_m=m, block_n=n, block_k=k, group_m=8, num_warps=w, num_stages=s)
        for m, n, k, w, s in itertools.product(
            (128,) if quick else (64, 128), (128, 256), (64,) if quick else (32, 64), (4, 8), (3, 4)
        )
    ][:limit]
    tuning.gemm = best("gemm", gemm_candidates, lambda c: timer(big_problem.gemm(dataclasses.replace(tuning, gemm=c))))

    decode_problems = [Problem(t, d, 8, 16, dtype) for t in decode_ts]
    decode_candidates = [
        GemmTiles(block_m=16, block_n=n, block_k=k, group_m=1, num_warps=w, num_stages=4)
        for n, k, w in itertools.product(
            (32, 64, 128), (64, 128) if quick else (64, 128, 256), (4,) if quick else (2, 4)
        )
    ][:limit]
    tuning.decode_gemm = best(
        "decode_gemm",
        decode_candidates,
        lambda c: sum(timer(p.gemm(dataclasses.replace(tuning, decode_gemm=c))) for p in decode_problems),
    )

    shrink_candidates = [
        ShrinkTiles(block_m=m, block_k=k, num_warps=w, num_stages=3)
        for m, k, w in itertools.product((32, 64, 128), (32, 64) if quick else (32, 64, 128), (4, 8))
    ][:limit]
    tuning.shrink = best(
        "shrink", shrink_candidates, lambda c: timer(big_problem.shrink(dataclasses.replace(tuning, shrink=c)))
    )
    decode_shrink_candidates = [
        ShrinkTiles(block_m=16, block_k=k, num_warps=w, num_stages=3)
        for k, w in itertools.product((64, 128, 256), (2, 4))
    ][:limit]
    tuning.decode_shrink = best(
        "decode_shrink",
        decode_shrink_candidates,
        lambda c: sum(timer(p.shrink(dataclasses.replace(tuning, decode_shrink=c))) for p in decode_problems),
    )
    big_problem = decode_problems = None  # free their memory before the width sweep

    max_columns = 0
    for columns in widths:
        problem = Problem(big, d, columns // 16, 16, dtype)
        try:
            fused_ms = timer(problem.fused_step(tuning))
        except Exception as exc:  # too wide for the fused kernel's registers on this GPU
            print(json.dumps({"sweep": "max_columns", "E*r": columns, "error": type(exc).__name__}))
            break
        todays_ms = timer(problem.todays_step())
        print(json.dumps({"sweep": "max_columns", "E*r": columns, "fused_ms": fused_ms, "todays_ms": todays_ms}))
        if fused_ms > todays_ms:
            break
        max_columns = columns
        del problem
    tuning.max_columns = max_columns  # 0 when even the narrowest mixture ran faster on today's path

    data = tuning.to_dict()
    tuning_from_dict(data, out)  # what the layer will read back
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}: {json.dumps(data)}")


if __name__ == "__main__":
    main()
