"""The Python half of benchmarks/serve_llamacpp.sh: a --format moe export run by llama.cpp.

    python benchmarks/serve_llamacpp.py tiny OUT              # a tiny block-routed run, exported (offline)
    python benchmarks/serve_llamacpp.py check EXPORT GGUF     # llama.cpp == transformers (ids, logits)
    python benchmarks/serve_llamacpp.py speed EXPORT GGUF... [--run RUN_DIR | --lomix OUT/lomix]
        [--base BASE_DIR --base-gguf GGUF...] [--rounds R] [--json OUT.json]

``tiny`` trains a sentencepiece tokenizer (llama.cpp's converter accepts a ``tokenizer.model``; toy
byte-level BPE files are rejected), builds a config-built Llama with its vocabulary, trains a
block-routed mixture (top-2 of 4 on gate/up/down, a fixed LoRA on q/v) a few steps and exports it
with `lomix.export_moe.export_moe`; the lomix mixture is kept beside it for ``speed``.

``check`` runs the GGUF with ``llama_cpp.Llama`` (f32 KV cache: ``type_k=0, type_v=0``;
``logits_all=True``): greedy decoding token by token through llama.cpp's KV cache, then compares the
generated ids with transformers' greedy ids and every position's logits with transformers' forward
of the whole sequence. Exit status 1 when they differ beyond ``--tol``.

``speed`` prints greedy decode tokens/s (prompt of 16 tokens, --tokens new tokens, prefill
included) of each GGUF in llama.cpp, the export in transformers, the lomix mixture in lomix (a run
folder or the ``tiny`` output) and, with --base/--base-gguf, the base model in transformers and
llama.cpp, all on --threads threads, in alternating rounds in one process (median and IQR, and each
engine's per-round ratio to the first one); --json writes the table.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 16


def _prompt_ids(config, length: int = PROMPT_TOKENS, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    low = 3 if config.vocab_size > 16 else 0  # past <unk>, <s>, </s> of a sentencepiece vocabulary
    ids = torch.randint(low, config.vocab_size, (length,), generator=generator).tolist()
    bos = config.bos_token_id
    return ([bos] if isinstance(bos, int) else []) + ids


# ------------------------------------------------------------------------------------------------
# tiny: an offline run to serve


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = (
        "the a one two three red blue green date month year monday friday hotel room clean dirty game "
        "team player scored goal colour hex code answer question yes no maybe because therefore which"
    ).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(n)]


def train_sentencepiece(folder: Path, vocab_size: int = 400) -> int:
    """Write ``folder/tokenizer.model`` (BPE with byte fallback, so any text tokenizes, as in Llama's;
    <unk>=0 <s>=1 </s>=2); returns its vocabulary size."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()


def make_tiny(out: Path, steps: int = 3, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lomix
    from lomix.export_moe import export_moe

    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base"
    base_dir.mkdir(exist_ok=True)
    vocab = train_sentencepiece(base_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.25,  # a random model that does not repeat one token: greedy ids that discriminate
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(base_dir)
    mixture = lomix.MixtureConfig(
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        num_experts=4,
        rank=4,
        alpha=8,
        routing_scope="block",
        router={"name": "topk", "k": 2},
        layer_router={"name": "fixed", "experts": [0], "weights": [1.0]},
    )
    lomix.inject(model, mixture)
    optimizer = torch.optim.AdamW(lomix.mixture_parameters(model), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (4, 24), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss + lomix.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    lomix.save(model, out / "lomix")
    info = export_moe(model, out / "moe", tokenizer_dir=base_dir)
    print(json.dumps({"export": str(out / "moe"), "experts": info["num_experts"], "k": info["experts_per_token"]}))
    return out / "moe"


# ------------------------------------------------------------------------------------------------
# check: llama.cpp against transformers


def _llama(gguf: Path, threads: int, context: int = 256):
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf),
        n_ctx=context,
        n_threads=threads,
        n_batch=context,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32: an f32 KV cache (the default f16 one differs by ~5e-3)
        type_v=0,
        verbose=False,
    )


def llamacpp_greedy(llm, prompt: list[int], new_tokens: int):
    """(ids, logits (len(ids), vocab) numpy) of greedy decoding through llama.cpp's KV cache."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    ids = list(prompt)
    for _ in range(new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ids.append(nxt)
        llm.eval([nxt])
    return ids, np.array(llm.scores[: llm.n_tokens])


def _transformers(folder: Path, threads: int):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain greedy decoding through transformers' KV cache: the argmax of every step, with no
    logits processor (``generate``'s min_new_tokens would forbid end-of-sequence, llama.cpp does not)."""
    ids = list(prompt)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(new_tokens):
            ids.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[ids[-1]]]), cache=out.cache, use_cache=True)
    return ids


def check(export: Path, gguf: Path, new_tokens: int, tol: float, threads: int) -> int:
    model = _transformers(export, threads)
    prompt = _prompt_ids(model.config)
    hf_ids = _hf_greedy(model, prompt, new_tokens)
    llm = _llama(gguf, threads)
    cpp_ids, cpp_logits = llamacpp_greedy(llm, prompt, new_tokens)
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([cpp_ids])).logits[0, : len(cpp_ids)].numpy()
    # llama.cpp's last row is the logits after the last token; transformers' full forward has it too
    diff = float(abs(hf_logits - cpp_logits).max())
    same = hf_ids == cpp_ids
    report = {
        "export": str(export),
        "gguf": gguf.name,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "greedy_ids_equal": same,
        "max_abs_logit_diff": diff,
        "tolerance": tol,
        "llamacpp_new_ids": cpp_ids[len(prompt) :],
    }
    print(json.dumps(report))
    if not same:
        print(f"transformers ids: {hf_ids[len(prompt) :]}", file=sys.stderr)
    return 0 if same and diff <= tol else 1


# ------------------------------------------------------------------------------------------------
# speed: greedy decode tokens/s


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _lomix_model(args):
    import lomix

    if args.run:
        from lomix.recipes.runs import load_run

        return load_run(args.run).model.eval()
    if args.lomix:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(Path(args.lomix).parent / "base", dtype=torch.float32).eval()
        return lomix.load(base, args.lomix).eval()
    return None


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, median, q3


def speed(args) -> dict:
    """Greedy decode tokens/s of every engine, in alternating rounds in this one process.

    Each round decodes the same prompt once with every engine, in an order rotated from round to
    round (a slow phase of the machine hits every engine alike); the result per engine is the
    median and interquartile range of its rounds, and per round its ratio to the first engine
    (the base model in transformers when ``--base`` is given, else the export in transformers)."""
    torch.set_num_threads(args.threads)
    export = Path(args.export)
    model = _transformers(export, args.threads)
    prompt = _prompt_ids(model.config)
    n = args.tokens
    engines: dict[str, object] = {}
    if args.base and not args.llamacpp_only:
        base = _transformers(Path(args.base), args.threads)
        engines["transformers: base model"] = lambda: _hf_greedy(base, prompt, n)
    if not args.llamacpp_only:
        engines["transformers: the export"] = lambda: _hf_greedy(model, prompt, n)
    lomix_model = None if args.llamacpp_only else _lomix_model(args)
    if lomix_model is not None:
        engines["lomix: the mixture"] = lambda: _hf_greedy(lomix_model, prompt, n)
    for label, files in (("base model", args.base_gguf), ("the export", args.gguf)):
        for gguf in files:
            llm = _llama(Path(gguf), args.threads)
            kind = Path(gguf).stem.rsplit("-", 1)[-1]  # f32 / q8_0 (the script's file names)
            engines[f"llama.cpp {kind}: {label}"] = lambda llm=llm: llamacpp_greedy(llm, prompt, n)
    names = list(engines)
    for name in names:  # warm-up: first-call allocations, thread pools, caches
        engines[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(engines[name]))
    reference = names[0]
    rows = {}
    for name in names:
        rates = [n / t for t in times[name]]
        ratios = [times[reference][i] / times[name][i] for i in range(args.rounds)]
        q1, median, q3 = _quartiles(rates)
        r1, ratio, r3 = _quartiles(ratios)
        rows[name] = {
            "tokens_per_s": median,
            "tokens_per_s_iqr": [q1, q3],
            "ratio_to_reference": ratio,
            "ratio_iqr": [r1, r3],
        }
    import importlib.metadata as metadata
    import os

    result = {
        "versions": {name: metadata.version(name) for name in ("transformers", "llama-cpp-python")},
        "load_average": os.getloadavg(),
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "threads": args.threads,
        "rounds": args.rounds,
        "reference": reference,
        "engines": rows,
    }
    print(
        f"greedy decode, {len(prompt)}-token prompt + {n} new tokens (prefill included), {args.threads} threads, "
        f"{args.rounds} alternating rounds: median tokens/s (IQR), and tokens/s / {reference}'s per round"
    )
    for name, row in rows.items():
        low, high = row["tokens_per_s_iqr"]
        r1, r3 = row["ratio_iqr"]
        print(
            f"  {name:34s} {row['tokens_per_s']:8.1f} ({low:.1f}-{high:.1f})   "
            f"x{row['ratio_to_reference']:.3f} ({r1:.3f}-{r3:.3f})"
        )
    if args.json:
        from harness import machine, write_json

        write_json(Path(args.json), {"machine": machine(), "export": str(export), **result})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="train and export a tiny block-routed mixture (offline)")
    tiny.add_argument("out")
    one = sub.add_parser("check", help="llama.cpp's greedy ids and logits against transformers'")
    one.add_argument("export")
    one.add_argument("gguf")
    one.add_argument("--tokens", type=int, default=20)
    one.add_argument("--tol", type=float, default=1e-4)
    one.add_argument("--threads", type=int, default=2)
    bench = sub.add_parser("speed", help="greedy decode tokens/s")
    bench.add_argument("export")
    bench.add_argument("gguf", nargs="*")
    bench.add_argument("--run", default=None, help="a lomix run folder: time the mixture in lomix too")
    bench.add_argument("--lomix", default=None, help="the tiny command's OUT/lomix folder (base beside it)")
    bench.add_argument("--base", default=None, help="the base model's folder: time it in transformers too")
    bench.add_argument("--base-gguf", nargs="*", default=[], help="the base model's GGUF files")
    bench.add_argument("--tokens", type=int, default=32)
    bench.add_argument("--rounds", type=int, default=5, help="alternating rounds after one warm-up")
    bench.add_argument("--json", default=None, help="also write the result here")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--llamacpp-only", action="store_true", help="time the GGUF files only")
    args = parser.parse_args(argv)
    if args.command == "tiny":
        make_tiny(Path(args.out))
        return 0
    if args.command == "check":
        return check(Path(args.export), Path(args.gguf), args.tokens, args.tol, args.threads)
    speed(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
