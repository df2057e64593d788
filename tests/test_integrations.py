"""transformers.Trainer and TRL's SFTTrainer on an injected model (lomix.integrations, lomix.pretrained):
saving writes a mixture, the optimised loss holds the balance losses, task ids reach the routers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODEL_CASES, build_pair
from torch.nn import functional as F

import lomix
from lomix.integrations import mixture_trainer

VOCAB = 97


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    values = {
        "output_dir": str(tmp_path / "trainer"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**{**values, **overrides})


def _rows(n: int = 8, length: int = 10, task_ids: list[int] | None = None):
    from datasets import Dataset

    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt of 4 tokens: no loss there
    data = {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels.tolist()}
    if task_ids is not None:
        data["task_ids"] = task_ids
    return Dataset.from_dict(data)


def _mixture(router: str = "topk", balance: dict | None = None, **router_fields):
    model, base = build_pair(MODEL_CASES["llama"])
    config = lomix.MixtureConfig(
        target_modules=["q_proj", "v_proj", "up_proj"],
        num_experts=4,
        rank=2,
        router=lomix.router_config(router, **router_fields),
        balance=balance,
    )
    return lomix.inject(model, config), base


def _trainer_class(name: str):
    from transformers import Trainer

    return Trainer if name == "Trainer" else mixture_trainer(Trainer)


@pytest.mark.parametrize("trainer", ["Trainer", "MixtureTrainer"])
def test_trainer_save_model_writes_a_mixture_that_reloads_exactly(trainer, tmp_path):
    """A plain transformers.Trainer too: its save_model calls the injected model's save_pretrained."""
    from transformers import AutoModelForCausalLM

    model, base = _mixture()
    fresh = copy.deepcopy(base)
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))}
    before = base(**inputs).logits
    _trainer_class(trainer)(model=model, args=_args(tmp_path), train_dataset=_rows()).train()
    model.eval()
    trained = model(**inputs).logits
    assert (trained - before).abs().max() > 1e-4, "two steps changed nothing"
    out = tmp_path / "saved"
    from transformers import Trainer

    Trainer(model=model, args=_args(tmp_path)).save_model(str(out))
    assert (out / lomix.CONFIG_NAME).is_file() and not (out / "model.safetensors").exists()
    reloaded = lomix.load(fresh, out)
    assert torch.equal(reloaded(**inputs).logits, trained)
    with pytest.raises((OSError, ValueError), match=r"config\.json"):
        AutoModelForCausalLM.from_pretrained(str(out))


def _hand_loss(model, batch, switch: float, z_loss: float) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens plus, per mixture layer, the Switch loss
    E * sum_i f_i P_i and the z-loss mean(logsumexp(logits)^2), weighted and averaged over layers."""
    layers = [layer for _, layer in lomix.mixture_layers(model)]
    for layer in layers:
        layer.record_routing = True
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    balance = []
    for layer in layers:
        routing = layer.last_routing
        experts = routing.probs.shape[-1]
        counts = torch.zeros(experts)
        for index in routing.indices.reshape(-1).tolist():
            counts[index] += 1
        fraction = counts / counts.sum()
        switch_loss = experts * (fraction * routing.probs.mean(0)).sum()
        z = torch.logsumexp(routing.logits, dim=-1).pow(2).mean()
        balance.append(switch * switch_loss + z_loss * z)
    return ce + sum(balance) / len(balance), ce


def test_the_optimised_loss_includes_the_balance_losses(tmp_path):
    """One SGD step of the trainer moves the routers by -lr * grad(CE + balance), computed by hand."""
    from transformers import Trainer

    switch, z_loss, lr = 1.0, 0.1, 0.5
    model, _ = _mixture(jitter=0.0, balance={"switch": switch, "z_loss": z_loss})
    reference, _ = _mixture(jitter=0.0, balance={"switch": switch, "z_loss": z_loss})  # the same, seeded
    reference.train()
    data = _rows(4)
    batch = {key: torch.tensor(data[key]) for key in ("input_ids", "attention_mask", "labels")}
    total, ce = _hand_loss(reference, batch, switch, z_loss)
    routers = [layer.router.weight for _, layer in lomix.mixture_layers(reference)]
    with_balance = torch.autograd.grad(total, routers, retain_graph=True)
    without = torch.autograd.grad(ce, routers)
    args = _args(tmp_path, max_steps=1, optim="sgd", learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0)
    mixture_trainer(Trainer)(model=model, args=args, train_dataset=data).train()
    stepped = [layer.router.weight.detach() for _, layer in lomix.mixture_layers(model)]
    for after, start, grad, grad_ce in zip(stepped, routers, with_balance, without, strict=True):
        torch.testing.assert_close(after, start.detach() - lr * grad, atol=1e-6, rtol=1e-5)
        assert (after - (start.detach() - lr * grad_ce)).abs().max() > 1e-4  # the balance term mattered


def test_the_balance_losses_are_averaged_over_gradient_accumulation(tmp_path):
    """Two micro-batches of the same 2 rows: the step's gradient is grad(CE) + grad(one micro-batch's
    balance losses), not twice the balance term (the Trainer leaves a token-normalised loss undivided)."""
    from datasets import Dataset
    from transformers import Trainer

    switch, lr = 1.0, 0.5
    model, _ = _mixture(jitter=0.0, balance={"switch": switch})
    reference, _ = _mixture(jitter=0.0, balance={"switch": switch})
    reference.train()
    row = _rows(1)[0]
    data = Dataset.from_list([row] * 4)
    batch = {key: torch.tensor([row[key]] * 2) for key in ("input_ids", "attention_mask", "labels")}
    total, _ = _hand_loss(reference, batch, switch, 0.0)
    routers = [layer.router.weight for _, layer in lomix.mixture_layers(reference)]
    grads = torch.autograd.grad(total, routers)
    args = _args(
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0,
    )
    mixture_trainer(Trainer)(model=model, args=args, train_dataset=data).train()
    for (_, layer), start, grad in zip(lomix.mixture_layers(model), routers, grads, strict=True):
        torch.testing.assert_close(layer.router.weight.detach(), start.detach() - lr * grad, atol=1e-6, rtol=1e-5)


def test_task_ids_reach_the_router_through_the_trainer(tmp_path):
    """Poly routes by task id: a plain Trainer drops the column (the router then refuses the batch);
    the mixture trainer keeps it, and only the trained task's routing row moves."""
    from transformers import Trainer

    data = _rows(8, task_ids=[1] * 8)
    model, _ = _mixture("poly", n_tasks=3)
    start = [layer.router.logits.detach().clone() for _, layer in lomix.mixture_layers(model)]
    with pytest.raises(lomix.RoutingError, match="task_ids"):
        Trainer(model=model, args=_args(tmp_path), train_dataset=data).train()
    model, _ = _mixture("poly", n_tasks=3)
    mixture_trainer(Trainer)(model=model, args=_args(tmp_path, learning_rate=0.1), train_dataset=data).train()
    for (_, layer), before in zip(lomix.mixture_layers(model), start, strict=True):
        moved = (layer.router.logits.detach() - before).abs().amax(dim=(1, 2))
        assert moved[1] > 1e-4 and moved[0] == 0 and moved[2] == 0


def test_routers_trained_by_sampling_are_refused(tmp_path):
    from transformers import Trainer

    model, _ = build_pair(MODEL_CASES["llama"])
    lomix.inject(
        model, lomix.MixtureConfig(target_modules=["q_proj"], num_experts=4, router=lomix.router_config("remix", k=2))
    )
    with pytest.raises(lomix.ConfigError, match=r"'rloo' gradient estimator .* `lomix train`"):
        mixture_trainer(Trainer)(model=model, args=_args(tmp_path), train_dataset=_rows())
    with pytest.raises(lomix.LomixError, match="holds no lomix mixture"):
        mixture_trainer(Trainer)(model=build_pair(MODEL_CASES["llama"])[0], args=_args(tmp_path))


@pytest.mark.slow
def test_resume_from_a_mixture_checkpoint_is_exact(tmp_path):
    from transformers import Trainer

    trainer_class = mixture_trainer(Trainer)
    whole, _ = _mixture()
    trainer_class(model=whole, args=_args(tmp_path / "a"), train_dataset=_rows()).train()
    first, _ = _mixture()
    trainer_class(
        model=first, args=_args(tmp_path / "b", save_strategy="steps", save_steps=1), train_dataset=_rows()
    ).train()
    resumed, _ = _mixture()
    args = _args(tmp_path / "b")
    trainer_class(model=resumed, args=args, train_dataset=_rows()).train(
        resume_from_checkpoint=str(tmp_path / "b" / "trainer" / "checkpoint-1")
    )
    for (_, a), (_, b) in zip(lomix.mixture_layers(whole), lomix.mixture_layers(resumed), strict=True):
        torch.testing.assert_close(b.experts.B, a.experts.B, rtol=0, atol=1e-7)
        torch.testing.assert_close(b.router.weight, a.router.weight, rtol=0, atol=1e-7)


def test_load_best_model_at_end_loads_the_best_checkpoints_mixture(tmp_path):
    from transformers import Trainer

    model, _ = _mixture()
    args = _args(
        tmp_path,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worse checkpoint, so that "best" is not simply the last one
    )
    trainer = mixture_trainer(Trainer)(model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-1")
    saved, _ = lomix.checkpoint.read_weights(best)
    final, _ = lomix.checkpoint.read_weights(tmp_path / "trainer" / "checkpoint-2")
    current = lomix.checkpoint.mixture_state_dict(model)
    assert all(torch.equal(current[key], saved[key]) for key in saved)
    assert any(not torch.equal(saved[key], final[key]) for key in saved)


def test_trl_sft_trainer_trains_a_task_routed_mixture_that_reloads_exactly(tmp_path):
    """TRL's SFTTrainer (prompt/completion rows, its own tokenisation and collator) with the mixture
    trainer: task ids reach Poly's rows, and the saved folder (mixture + tokenizer) reloads exactly."""
    from datasets import Dataset
    from tiny_assets import make_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base_dir = make_model_dir(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = lomix.MixtureConfig(
        target_modules=["q_proj", "v_proj"], num_experts=4, rank=2, router=lomix.router_config("poly", n_tasks=3)
    )
    lomix.inject(model, config)
    start = [layer.router.logits.detach().clone() for _, layer in lomix.mixture_layers(model)]
    data = Dataset.from_dict(
        {"prompt": ["repeat apple", "repeat river"] * 4, "completion": [" apple", " river"] * 4, "task_ids": [1] * 8}
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        bf16=False,  # TRL's default is bf16 autocast, which stays on the trained model's forward
    )
    trainer = mixture_trainer(SFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    for (_, layer), before in zip(lomix.mixture_layers(model), start, strict=True):
        moved = (layer.router.logits.detach() - before).abs().amax(dim=(1, 2))
        assert moved[1] > 1e-4 and moved[0] == 0 and moved[2] == 0
    trainer.save_model(str(tmp_path / "out"))
    reloaded = lomix.from_pretrained(tmp_path / "out")  # the base named in the metadata: base_dir
    ids = torch.tensor([tokenizer.encode("repeat apple")])
    model.eval()
    with lomix.routing_context(model, task_ids=[1]), lomix.routing_context(reloaded, task_ids=[1]):
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert reloaded.lomix_state.tokenizer.encode("repeat apple") == ids[0].tolist()


def test_the_routing_collator_batches_the_routing_fields_and_passes_the_rest():
    from lomix.integrations import RoutingCollator

    seen = []

    def inner(rows):
        seen.append(rows)
        return {"input_ids": torch.tensor([row["input_ids"] for row in rows])}

    collate = RoutingCollator(inner)
    rows = [
        {"input_ids": [1, 2], "task_ids": 2, "task_descriptions": "add", "task_embeddings": [0.5, 1.0]},
        {"input_ids": [3, 4], "task_ids": 0, "task_descriptions": "echo", "task_embeddings": [2.0, 0.0]},
    ]
    batch = collate(rows)
    assert seen[-1] == [{"input_ids": [1, 2]}, {"input_ids": [3, 4]}]
    assert torch.equal(batch["task_ids"], torch.tensor([2, 0])) and batch["task_ids"].dtype == torch.long
    assert torch.equal(batch["task_embeddings"], torch.tensor([[0.5, 1.0], [2.0, 0.0]]))
    assert batch["task_descriptions"] == ["add", "echo"]
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(lomix.ConfigError, match="task_ids: 1 of the batch's 2 rows lack this column"):
        collate([rows[0], {"input_ids": [5, 6]}])
    assert RoutingCollator(list)([[7, 8]]) == [[7, 8]]  # rows that are not mappings pass through


def test_a_mixture_over_a_4bit_base_trains_with_the_trainer(tmp_path):
    """transformers refuses to fine-tune a "purely quantized" model; a 4-bit base with a mixture is not one."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer

    torch.manual_seed(0)
    # every quantized dimension a multiple of the 4-bit block size (64)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")

    def quantized_base():
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, quantization_config=quant)

    mixture = lomix.MixtureConfig(target_modules=["q_proj", "v_proj"], num_experts=2, rank=2)
    model = lomix.inject(quantized_base(), mixture)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=_args(tmp_path), train_dataset=_rows())
    trainer = mixture_trainer(Trainer)(model=model, args=_args(tmp_path), train_dataset=_rows())
    assert "_hf_peft_config_loaded" not in model.__dict__  # transformers' flag only while the trainer is built
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))}
    model.eval()
    reloaded = lomix.load(quantized_base(), tmp_path / "out").eval()
    assert any(float(layer.experts.B.abs().max()) > 0 for _, layer in lomix.mixture_layers(reloaded))
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
