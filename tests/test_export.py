"""Export of fixed-route mixtures as one PEFT LoRA and as a merged transformers checkpoint.

The reference is the lomix mixture itself under the same route; the exported folders are loaded
by PEFT and transformers in a separate Python process where lomix is NOT importable (site-packages
on the path, but not the .pth file of lomix's editable install; asserted), as a user without lomix
would load them.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch
from conftest import MODEL_CASES, build_pair, randomize_experts
from safetensors.torch import load_file, save_file

import lomix
from lomix.export import NotFixedRouteError, export_merged, export_peft, fixed_loras
from lomix.merge import MergeOptions, merge_mixture

pytestmark = pytest.mark.slow


@dataclass
class TaskMixConfig(lomix.RouterConfig):
    num_tasks: int = 3
    heads: int = 2


@lomix.register_router("test_export_task_mix", TaskMixConfig)
class TaskMixRouter(lomix.Router):
    """A minimal Poly/MHR-like router: per task and head, softmax weights over the experts."""

    def __init__(self, config, d_in, num_experts):
        super().__init__(config, d_in, num_experts)
        self.logits = torch.nn.Parameter(torch.randn(config.num_tasks, config.heads, num_experts))

    def forward(self, x, context):
        context = context.for_batch(x.shape[0])
        if context.task_ids is None:
            raise lomix.RoutingError("test_export_task_mix needs task_ids")
        return lomix.ParameterMixing(weights=self.logits[context.task_ids].softmax(-1))


LOADER = textwrap.dedent(
    """
    import json, sys
    sys.path.extend(json.loads(sys.argv[1]))  # site-packages without processing its .pth files
    try:
        import lomix
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("lomix is importable here: " + lomix.__file__)
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    results = {}
    for job in json.loads(sys.argv[2]):
        if job["kind"] == "peft":
            base = AutoModelForCausalLM.from_pretrained(job["base"])
            model = PeftModel.from_pretrained(base, job["folder"])
        else:
            model = AutoModelForCausalLM.from_pretrained(job["folder"])
        model.eval()
        inputs = load_file(job["inputs"])
        with torch.no_grad():
            results[job["name"]] = model(**inputs).logits.contiguous()
    save_file(results, sys.argv[3])
    print("loaded", len(results), "exports without lomix")
    """
)


@dataclass
class Case:
    name: str
    model_case: str
    config: dict
    route: dict = field(default_factory=dict)
    merge: MergeOptions | None = None


CASES = [
    Case(
        "llama-fixed",
        "llama",
        dict(num_experts=4, rank=4, alpha=8, router={"name": "fixed", "experts": [0, 2], "weights": [0.7, 0.3]}),
    ),
    Case("gpt2-fixed", "gpt2", dict(num_experts=3, rank=2, alpha=4, router={"name": "fixed", "experts": [1, 2]})),
    Case(
        "llama-task-mix",
        "llama",
        dict(num_experts=3, rank=4, alpha=8, router={"name": "test_export_task_mix"}),
        route={"task_ids": [1]},
    ),
    # a merged mixture: router experts 0..3 share two bank experts, so gates of a group are summed
    Case(
        "llama-merged-fixed",
        "llama",
        dict(
            num_experts=4,
            rank=4,
            alpha=8,
            router={"name": "fixed", "experts": [0, 1, 2, 3], "weights": [0.4, 0.3, 0.2, 0.1]},
        ),
        merge=MergeOptions(experts=2, grouping="random", rank=6),
    ),
    Case(
        "llama-compressed-fixed",
        "llama",
        dict(num_experts=4, rank=4, alpha=8, router={"name": "fixed", "experts": [0, 3], "weights": [0.5, 0.5]}),
        merge=MergeOptions(experts=2, grouping="random", rank=2, residual_density=0.05),
    ),
]


def _build(case: Case):
    mc = MODEL_CASES[case.model_case]
    model, fresh = build_pair(mc)
    lomix.inject(model, lomix.MixtureConfig(target_modules=mc.targets, **case.config))
    randomize_experts(model, std=0.3)
    inputs = mc.inputs(torch.Generator().manual_seed(7))
    if case.merge is not None:
        with lomix.RoutingStats(model) as stats, torch.no_grad():
            model(**inputs)
        merge_mixture(model, stats, case.merge)
    with torch.no_grad():
        expected = model(**inputs, **case.route).logits
        base = fresh(**inputs).logits
    assert (expected - base).abs().max() > 1e-2  # the mixture changes the output
    return model, fresh, inputs, expected


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported as peft (when it can be) and merged, then loaded in ONE lomix-free process."""
    root = tmp_path_factory.mktemp("export")
    jobs, expected, infos = [], {}, {}
    for case in CASES:
        model, fresh, inputs, logits = _build(case)
        folder = root / case.name
        fresh.save_pretrained(folder / "base")
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
        route = {k: torch.tensor(v) for k, v in case.route.items()}
        if case.merge is None or case.merge.residual_density == 0:
            export_peft(model, folder / "peft", **route)
            jobs.append({"kind": "peft", "name": f"{case.name}/peft", "base": str(folder / "base"),
                         "folder": str(folder / "peft"), "inputs": str(folder / "inputs.safetensors")})  # fmt: skip
        infos[case.name] = export_merged(model, folder / "merged", **route)
        jobs.append({"kind": "merged", "name": f"{case.name}/merged", "folder": str(folder / "merged"),
                     "inputs": str(folder / "inputs.safetensors")})  # fmt: skip
        expected[case.name] = (logits, model)
    paths = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOADER, json.dumps(paths), json.dumps(jobs), str(root / "out.safetensors")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {len(jobs)} exports without lomix" in result.stdout
    return root, load_file(str(root / "out.safetensors")), expected, infos


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_exported_models_give_the_mixture_logits_without_lomix(exported, case):
    root, outputs, expected, _ = exported
    logits, _ = expected[case]
    kinds = [k for k in ("peft", "merged") if f"{case}/{k}" in outputs]
    assert kinds == (["merged"] if case == "llama-compressed-fixed" else ["peft", "merged"])
    for kind in kinds:
        torch.testing.assert_close(outputs[f"{case}/{kind}"], logits, rtol=1e-4, atol=2e-5, msg=f"{case}/{kind}")
    merged = root / case / "merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert not list(merged.glob("*.bin")) and "lomix" not in (merged / "config.json").read_text()


def test_peft_folder_is_one_standard_lora_of_rank_k_times_r(exported):
    root, _, expected, _ = exported
    config = json.loads((root / "llama-fixed" / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8  # k=2 experts x r=4
    tensors = load_file(str(root / "llama-fixed" / "peft" / "adapter_model.safetensors"))
    _, model = expected["llama-fixed"]
    layers = dict(lomix.mixture_layers(model))
    assert len(tensors) == 2 * len(layers)
    name = next(iter(layers))
    layer = layers[name]
    A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    # selected A's concatenated; gate-weighted (and scaled) B's concatenated
    torch.testing.assert_close(A, torch.cat([layer.experts.A[0], layer.experts.A[2]]).detach())
    expected_b = torch.cat([0.7 * 2.0 * layer.experts.B[0], 0.3 * 2.0 * layer.experts.B[2]], dim=1).detach()
    torch.testing.assert_close(B, expected_b)
    gpt2 = json.loads((root / "gpt2-fixed" / "peft" / "adapter_config.json").read_text())
    assert gpt2["fan_in_fan_out"] is True  # GPT-2's Conv1D
    merged = json.loads((root / "llama-merged-fixed" / "peft" / "lomix_export.json").read_text())
    route = merged["routes"][name]
    assert len(route["experts"]) == 2 and sum(route["gates"]) == pytest.approx(1.0)  # 4 router experts, 2 bank


def test_token_routed_mixtures_and_residuals_are_refused_with_the_options(tmp_path):
    mc = MODEL_CASES["llama"]
    model, _ = build_pair(mc)
    lomix.inject(model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=4, router={"name": "topk", "k": 2}))
    randomize_experts(model)
    with pytest.raises(NotFixedRouteError, match=r"routes each token on its own.*--task T.*--format lomix"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    task, _ = build_pair(mc)
    lomix.inject(
        task, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=3, router={"name": "test_export_task_mix"})
    )
    with pytest.raises(NotFixedRouteError, match=r"needs task_ids.*--task T"):
        fixed_loras(task)
    assert set(fixed_loras(task, task_ids=[2])) == {n for n, _ in lomix.mixture_layers(task)}


@pytest.mark.parametrize("bits", [4, 8])
def test_merged_export_dequantizes_a_bitsandbytes_base_and_says_so(tmp_path, bits, cpu_path):
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base, _ = build_pair(MODEL_CASES["llama"])
    base.save_pretrained(tmp_path / "base")
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    config = dict(num_experts=2, rank=2, router={"name": "fixed", "experts": [0, 1], "weights": [0.5, 0.5]})
    lomix.inject(model.eval(), lomix.MixtureConfig(target_modules=["q_proj", "down_proj"], **config))
    randomize_experts(model, std=0.3)
    info = export_merged(model, tmp_path / "merged")
    assert info["notes"] == [
        f"the base was quantized with bitsandbytes ({bits}bit): it was dequantized, merged and saved in full "
        "precision (float32)"
    ]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    name = "model.layers.1.self_attn.q_proj"
    layer = model.get_submodule(name)
    weight = layer.base_layer.weight
    if bits == 4:
        dequantized = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    else:  # LLM.int8: row-wise absmax scaling, W = CB * SCB / 127
        dequantized = weight.data.float() * weight.SCB.float()[:, None] / 127
    delta = layer.scale * 0.5 * sum(layer.experts.B[e] @ layer.experts.A[e] for e in (0, 1))
    expected = dequantized.float() + delta.detach()
    torch.testing.assert_close(merged.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-5)
    inputs = MODEL_CASES["llama"].inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, got = model(**inputs).logits, merged(**inputs).logits
    # 4-bit layers compute with the dequantized weight: equal; LLM.int8 also quantizes activations
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5 if bits == 4 else 2e-2)


def test_the_same_experts_with_per_token_gates_is_not_a_fixed_route(tmp_path):
    """`dense` sends every token to ALL experts (identical indices) with its own softmax gates: the
    indices alone would call that a fixed route and export a wrong LoRA; the gates must decide."""
    mc = MODEL_CASES["llama"]
    model, _ = build_pair(mc)
    config = lomix.MixtureConfig(
        target_modules=["q_proj", "down_proj"], num_experts=3, rank=2, router={"name": "dense"}
    )
    lomix.inject(model, config)
    randomize_experts(model)  # random router weights: every token gets other gates
    with pytest.raises(NotFixedRouteError, match=r"router 'dense' routes each token on its own.*--format lomix"):
        export_peft(model, tmp_path / "peft")
    with pytest.raises(NotFixedRouteError, match=r"router 'dense' routes each token on its own"):
        export_merged(model, tmp_path / "merged")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "merged").exists()
    # The same router with a zero weight gives every token the gates 1/E: now it IS one LoRA, the
    # experts' mean (so the refusal above came from the gates, not from the router's name).
    with torch.no_grad():
        for _, layer in lomix.mixture_layers(model):
            layer.router.weight.zero_()
    for name, lora in fixed_loras(model).items():
        layer = model.get_submodule(name)
        A, B = layer.experts.A.detach().double(), layer.experts.B.detach().double()
        expected = layer.scale * sum(B[e] @ A[e] for e in range(3)) / 3
        torch.testing.assert_close(lora.delta(), expected, rtol=1e-6, atol=1e-7)
