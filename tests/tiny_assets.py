"""Tiny, offline assets for recipe tests: a config-built Llama with a trained BPE tokenizer and a
chat template, saved as a model folder, and a small multi-task data file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
COLORS = ["red", "green", "blue"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "storm"]


def tiny_rows(seed: int = 0, per_task: int = 24) -> list[dict]:
    """Three tasks: parity (2 choices), color lookup (3 choices), echo (generative)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(per_task):
        n = rng.randrange(100)
        rows.append({"task": "parity", "input": f"is {n} even or odd", "choices": ["even", "odd"], "label": n % 2})
        k = rng.randrange(3)
        rows.append({"task": "color", "input": f"color number {k} {rng.randrange(9)}", "choices": COLORS, "label": k})
        word = rng.choice(WORDS)
        rows.append({"task": "echo", "input": f"repeat {word}", "target": word})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and a byte-level BPE tokenizer (ChatML template), saved like a hub folder."""
    if (path / "config.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [r["input"] + " " + (r.get("target") or " ".join(r["choices"])) for r in tiny_rows(seed, 40)]
    corpus += ["user assistant system"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=160, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(fast),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=fast.pad_token_id,
            eos_token_id=fast.eos_token_id,
            bos_token_id=fast.bos_token_id,
        )
    )
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def run_assets(root: Path) -> tuple[Path, Path, Path, Path]:
    """(root, model folder, 8-rows-per-task train file, 2-rows-per-task test file) under ``root``."""
    model = make_model_dir(root / "model")
    train = write_jsonl(root / "train.jsonl", tiny_rows(0, 8))
    return root, model, train, write_jsonl(root / "test.jsonl", tiny_rows(1, 2))


def tiny_config(tmp: Path, model_dir: Path, train_file: Path, test_file: Path | None, **sections) -> dict:
    """A complete recipe config dict for the tiny model; ``sections`` update it per section."""
    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train_file), "test": str(test_file) if test_file else None, "max_length": 48},
        "mixture": {
            "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
            "num_experts": 4,
            "rank": 4,
            "alpha": 8,
            "dropout": 0.1,
            "balance": {"switch": 0.01},
        },
        "router": {"name": "topk", "k": 2, "jitter": 0.05},
        "train": {
            "max_steps": 6,
            "batch_size": 4,
            "lr": 5e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "progress": False,
        },
        "eval": {"max_examples_per_task": 4},
        "seed": 0,
        "output_dir": str(tmp / "run"),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
