"""--format moe: a block-routed mixture leaves lomix as a Mixtral checkpoint that transformers runs
in a process where lomix cannot be imported, with the same logits and greedy tokens; mixtures that
Mixtral cannot compute are refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_assets import make_model_dir

import lomix
from lomix.export_moe import MoeExportError, export_moe

FIXED = {"name": "fixed", "experts": [0], "weights": [1.0]}
FFN = ["gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 20

# Run by a fresh interpreter: lomix must not be importable there (a meta path finder refuses it,
# whatever sys.path holds), so the checkpoint is read by transformers alone.
MIXTRAL_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoLomix(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lomix" or name.startswith("lomix."):
                raise ImportError("lomix is not importable in this process")
            return None

    sys.meta_path.insert(0, NoLomix())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder, inputs, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = load_file(inputs)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        new = int(sys.argv[4])
        tokens = model.generate(ids[:1], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, out)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    try:
        import lomix  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    loaded = any(m.startswith("lomix") for m in sys.modules)
    kind = type(model).__name__
    print(json.dumps({"tied": tied, "lomix_blocked": blocked, "lomix_loaded": loaded, "class": kind}))
    """
)


def tiny_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def block_mixture(model, **overrides):
    fields = {
        "target_modules": ["q_proj", "v_proj", *FFN],
        "num_experts": 4,
        "rank": 4,
        "alpha": 8,
        "routing_scope": "block",
        "router": {"name": "topk", "k": 2},
        "layer_router": FIXED,
    }
    return lomix.inject(model, lomix.MixtureConfig(**{**fields, **overrides}))


def train_a_few_steps(model, steps: int = 4, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(lomix.mixture_parameters(model), lr=3e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss + lomix.aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def run_without_lomix(folder: Path, ids: torch.Tensor, tmp: Path) -> tuple[dict, dict]:
    script = tmp / "run_mixtral.py"
    script.write_text(MIXTRAL_SCRIPT)
    save_file({"input_ids": ids.contiguous()}, str(tmp / "inputs.safetensors"))
    out = tmp / "outputs.safetensors"
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(tmp / "inputs.safetensors"), str(out), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out)), json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_exported_mixtral_computes_the_mixture_without_lomix(tmp_path, tied):
    model = tiny_llama(tied)
    # untied: the first block's feed-forward carries no mixture, so it exports as E copies of itself
    excluded = [f"model.layers.0.mlp.{p}" for p in FFN] if not tied else []
    block_mixture(model, exclude_modules=excluded)
    train_a_few_steps(model)
    info = export_moe(model, tmp_path / "moe")
    assert (info["num_experts"], info["experts_per_token"]) == (4, 2)
    assert (tmp_path / "moe" / "config.json").is_file() and (tmp_path / "moe" / "model.safetensors").is_file()
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(5))
    outputs, facts = run_without_lomix(tmp_path / "moe", ids, tmp_path)
    assert facts == {"tied": tied, "lomix_blocked": True, "lomix_loaded": False, "class": "MixtralForCausalLM"}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert (outputs["logits"] - expected).abs().max().item() <= 1e-5
    assert outputs["tokens"].tolist() == tokens.tolist()
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["tie_word_embeddings"] is tied


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # not hidden / heads, as in the real Qwen3 models
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # q/k norms that are not the identity, so that losing them would show
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2], ids=["top1-raw-gates", "top2-renormalised"])
def test_a_qwen3_base_exports_as_qwen3_moe_without_lomix(tmp_path, k):
    model = tiny_qwen3()
    block_mixture(model, router={"name": "topk", "k": k})
    train_a_few_steps(model)
    info = export_moe(model, tmp_path / "moe")
    assert info["architecture"] == "Qwen3MoeForCausalLM" and info["renormalize"] is (k > 1)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(5))
    outputs, facts = run_without_lomix(tmp_path / "moe", ids, tmp_path)
    assert facts["class"] == "Qwen3MoeForCausalLM" and facts["lomix_blocked"] and facts["tied"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert (outputs["logits"] - expected).abs().max().item() <= 1e-5
    assert outputs["tokens"].tolist() == tokens.tolist()


def test_the_expert_weights_are_the_base_plus_each_lora(tmp_path):
    """w1_e = W_gate + s B_gate,e A_gate,e (and w3, w2 likewise), gate = the block's router weight,
    the fixed attention LoRA merged: read back from the written file."""
    model = tiny_llama(tied=False)
    block_mixture(model)
    train_a_few_steps(model, steps=2)
    export_moe(model, tmp_path / "moe")
    from transformers import MixtralForCausalLM

    exported = MixtralForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    mlp, moe = model.model.layers[1].mlp, exported.model.layers[1].mlp
    s = model.lomix_state.config.scale
    for e in range(4):
        w1 = mlp.gate_proj.weight + s * mlp.gate_proj.experts.B[e] @ mlp.gate_proj.experts.A[e]
        w3 = mlp.up_proj.weight + s * mlp.up_proj.experts.B[e] @ mlp.up_proj.experts.A[e]
        w2 = mlp.down_proj.weight + s * mlp.down_proj.experts.B[e] @ mlp.down_proj.experts.A[e]
        torch.testing.assert_close(moe.experts.gate_up_proj[e], torch.cat([w1, w3]), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(moe.experts.down_proj[e], w2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(moe.gate.weight, mlp.gate_proj.router.weight, rtol=0, atol=0)
    q = model.model.layers[1].self_attn.q_proj
    merged = q.weight + s * q.experts.B[0] @ q.experts.A[0]
    torch.testing.assert_close(exported.model.layers[1].self_attn.q_proj.weight, merged, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"routing_scope": "layer", "layer_router": None}, "routes per layer"),
        ({"router": {"name": "topk", "k": 2, "bias_update_rate": 1e-3}}, "bias_update_rate > 0"),
        ({"router": {"name": "topk", "k": 1}}, "raw top-k probabilities"),
        ({"router": {"name": "topp", "p": 0.5}}, "top-p"),
        ({"router": {"name": "expert_choice"}}, "expert-choice"),
        ({"router": {"name": "remix", "k": 2}, "balance": {"switch": 0.0}}, "equal constant weights"),
        ({"layer_router": {"name": "topk", "k": 2}}, "routes the attention projection per token"),
    ],
    ids=["per-layer", "selection-bias", "raw-gates", "top-p", "expert-choice", "equal-weights", "routed-attention"],
)
def test_what_mixtral_cannot_compute_is_refused_with_the_reason(tmp_path, overrides, message):
    model = tiny_llama(tied=False)
    block_mixture(model, **overrides)
    with pytest.raises(MoeExportError, match=message) as info:
        export_moe(model, tmp_path / "moe")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "moe").exists()


def test_a_merged_bank_that_dropped_an_expert_is_refused(tmp_path):
    model = tiny_llama(tied=False)
    block_mixture(model)
    up = model.model.layers[0].mlp.up_proj
    up.expert_map = torch.tensor([0, 1, 2, -1])  # what MC-SMoE's merge leaves when it drops expert 3
    with pytest.raises(MoeExportError, match="dropped router expert 3"):
        export_moe(model, tmp_path / "moe")


def test_bases_without_a_mixtral_form_are_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2,
        )
    )  # fmt: skip
    block_mixture(qwen)
    with pytest.raises(MoeExportError, match="shared expert"):
        export_moe(qwen, tmp_path / "moe")
    biased = tiny_llama(tied=False)
    biased.config.attention_bias = True
    block_mixture(biased)
    with pytest.raises(MoeExportError, match="attention_bias"):
        export_moe(biased, tmp_path / "moe")


@pytest.mark.slow
def test_the_recipe_exports_a_block_routed_run_with_the_base_tokenizer_files(tmp_path, run_recipe):
    from tiny_assets import run_assets, tiny_config

    from lomix.recipes import export as export_recipe
    from lomix.recipes.config import build_config

    root, model_dir, train, _ = run_assets(tmp_path)
    assert make_model_dir(model_dir) == model_dir
    cfg = tiny_config(
        root,
        model_dir,
        train,
        None,
        mixture={
            "target_modules": FFN,
            "routing_scope": "block",
            "dropout": 0.0,
            "num_experts": 4,
            "rank": 4,
            "alpha": 8,
            "balance": {"switch": 0.01},
        },
        router={"name": "topk", "k": 2},
        train={"max_steps": 3, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "log_every": 1, "progress": False},
        eval={"after_training": False},
    )
    run_recipe(build_config(cfg))
    run_dir = Path(cfg["output_dir"])
    info = export_recipe.run(run_dir, "moe", tmp_path / "moe")
    assert info["format"] == "moe" and info["notes"] == []
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "moe" / name).read_bytes() == (model_dir / name).read_bytes()
    from transformers import AutoModelForCausalLM

    loaded = export_recipe.load_run(run_dir)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids).logits, loaded.model(input_ids=ids).logits, rtol=0, atol=1e-5
        )
