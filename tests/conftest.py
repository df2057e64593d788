"""Shared fixtures: tiny transformers models built from configs (no download)."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run under the interpreter. Triton reads this variable when it is
# first imported, and some dependencies (bitsandbytes, peft) import it early: set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property-based tests (hypothesis): the same examples on every run (derandomize, no example
# database), a modest count so the suite stays fast, and no per-example deadline (a shared 2-core
# machine makes timings meaningless). Tests that build models lower max_examples further.
settings.register_profile(
    "lomix",
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("lomix")


@dataclass
class ModelCase:
    """A tiny model family: how to build it, which modules to target, and a sample input."""

    name: str
    build: Callable[[], torch.nn.Module]
    targets: list[str]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]

    def output(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**inputs)
        if getattr(out, "logits", None) is not None:
            return out.logits
        # An encoder: every output, the pooler's too, so that every wrapped module matters.
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )


def _ids(generator: torch.Generator, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=generator)


def _causal_inputs(generator):
    ids = _ids(generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


MODEL_CASES = {
    "llama": ModelCase(
        "llama", _llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], _causal_inputs
    ),
    "gpt2": ModelCase("gpt2", _gpt2, ["c_attn", "c_proj", "c_fc"], _causal_inputs),
    "bert": ModelCase("bert", _bert, ["query", "key", "value", "dense"], _causal_inputs),
    "t5": ModelCase(
        "t5",
        _t5,
        ["q", "k", "v", "o", "wi", "wo"],
        lambda g: {"input_ids": _ids(g), "decoder_input_ids": _ids(g, length=5)},
    ),
}


@pytest.fixture(params=sorted(MODEL_CASES))
def model_case(request) -> ModelCase:
    return MODEL_CASES[request.param]


@pytest.fixture
def llama_case() -> ModelCase:
    return MODEL_CASES["llama"]


def build_pair(case: ModelCase, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two copies of the same randomly initialised base model, in eval mode."""
    torch.manual_seed(seed)
    model = case.build().eval()
    return model, copy.deepcopy(model)


def randomize_experts(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give B non-zero values (B starts at zero) so that the mixture changes outputs."""
    import lomix

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lomix.mixture_layers(model):
            layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=generator) * std)
            for param in layer.router.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))


# bitsandbytes takes a CPU-specific path for 4-bit layers: on a CPU with AVX512-BF16 it repacks a
# weight in place at the first no-grad eval forward (`Linear4bit.support_avx512bf16_for_cpu`, read
# from this probe when the layer is built). Forcing the probe runs both paths on any CPU.
BNB_CPU_PATHS = ("standard", "avx512bf16")


@contextlib.contextmanager
def bnb_cpu_path(path: str):
    """Every bitsandbytes 4-bit layer built inside takes ``path``: ``avx512bf16`` as on a CPU with
    AVX512-BF16 (repacking on), ``standard`` as on the others (repacking off)."""
    import bitsandbytes.nn.modules as bnb_modules

    probe = bnb_modules.has_avx512bf16
    bnb_modules.has_avx512bf16 = lambda: path == "avx512bf16"
    try:
        yield path
    finally:
        bnb_modules.has_avx512bf16 = probe


@pytest.fixture(params=BNB_CPU_PATHS)
def cpu_path(request):
    """Parametrises a test over both bitsandbytes CPU paths (see `bnb_cpu_path`)."""
    pytest.importorskip("bitsandbytes")
    with bnb_cpu_path(request.param) as path:
        yield path


@pytest.fixture
def run_recipe():
    """Run the finetune recipe in this process; accelerate's process-wide state is reset after each run."""
    from accelerate.state import AcceleratorState

    from lomix.recipes import finetune

    def call(cfg):
        try:
            return finetune.run(cfg)
        finally:
            AcceleratorState._reset_state(True)

    return call
