"""Size of a `--format moe` export against the number of experts E.

    python benchmarks/moe_export_size.py FOLDER [--experts 2 4 8] [--dtype float32]

FOLDER is a Llama/Mistral-family transformers folder (e.g. the SmolLM2 copy the quickstart caches
under $LOMIX_CACHE/models). For each E it injects a block-routed top-2 mixture on gate/up/down
(rank 8; random B so that every expert differs, as after training), exports it and prints the
size of model.safetensors beside the base's: the feed-forward is stored E times, the rest once.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import lomix
from lomix.export_moe import export_moe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    base_bytes = sum(p.stat().st_size for p in Path(args.folder).glob("*.safetensors"))
    print(f"base {Path(args.folder).name}: {base_bytes / 2**20:.1f} MiB (as stored)")
    print(f"{'E':>3} {'parameters':>14} {'model.safetensors':>18} {'x base params':>14}")
    for experts in args.experts:
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
        base_params = sum(p.numel() for p in model.parameters())
        mixture = lomix.MixtureConfig(
            target_modules=["gate_proj", "up_proj", "down_proj"],
            num_experts=experts,
            rank=8,
            routing_scope="block",
            router={"name": "topk", "k": min(2, experts)},
        )
        lomix.inject(model, mixture)
        with torch.no_grad():
            for _, layer in lomix.mixture_layers(model):
                layer.experts.B.normal_(std=0.01)
        out = Path(tempfile.mkdtemp()) / "moe"
        try:
            export_moe(model, out, dtype=dtype)
            size = (out / "model.safetensors").stat().st_size
            element = torch.finfo(dtype).bits // 8
            params = size // element  # the header is a few KiB
            print(f"{experts:>3} {params:>14,} {size / 2**20:>15.1f} MiB {params / base_params:>14.2f}")
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
