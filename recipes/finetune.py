"""Supervised fine-tuning of a mixture of LoRA experts on a frozen causal LM, on accelerate.

    lomix train recipes/configs/quickstart.yaml train.max_steps=20 router.k=3
    accelerate launch --multi_gpu --num_processes 2 -m lomix.cli train CONFIG.yaml   # DDP (gloo on CPU)
    python finetune.py CONFIG.yaml key=value ...   # a copy made with `lomix recipes cp finetune .`

The script reads top to bottom: `setup` (accelerator, base model, data, mixture, optimizer,
schedule), then `train` (the loop: micro-batches -> loss -> backward -> clip -> step, with logging,
periodic held-out loss and checkpoints), then the final save and evaluation.

Loss: cross-entropy on the answer tokens only (the prompt is masked), normalised by the number of
answer tokens in the whole global batch (all micro-batches of all processes), so one process with
batch B x accumulation A computes the same update as P processes with batch B x A / P.

Routers that sample their selection name the gradient estimator that trains them
(`RouterConfig.estimator`); the loss of a micro-batch then comes from it (`hooks.batch_loss_for`:
the experts get the answer loss, the router a surrogate). Log records carry each layer's routing
statistics (``train.routing_stats``).

Checkpoints (``output_dir/checkpoints/step-NNNNNN``) are written atomically: a folder appears only
once complete, so a run killed while saving leaves the previous checkpoint intact. A checkpoint
holds the mixture (lomix format, safetensors), accelerate's optimizer, scheduler and RNG states,
and ``trainer_state.json`` (step, epoch, batches taken). Resume regenerates the epoch's data order
from (seed, epoch) and skips the batches already taken, so it continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import lomix
from lomix.atomic import atomic_directory, atomic_file
from lomix.checkpoint import mixture_state_dict, read_weights
from lomix.errors import CheckpointError, ConfigError, LomixError
from lomix.inject import check_targets_run
from lomix.quant import prepare_kbit_training
from lomix.recipes import distributed, hooks, quantization, trackers
from lomix.recipes.assets import load_model_and_tokenizer
from lomix.recipes.config import FinetuneConfig, TrainConfig, recipe_main
from lomix.recipes.data import (
    Collator,
    EpochSampler,
    Formatter,
    ListDataset,
    TaskSet,
    Truncation,
    load_examples,
    task_set,
    tokenize,
)
from lomix.recipes.evaluation import BASE_RESULTS, RESULTS, evaluate_model, results_table, write_json
from lomix.recipes.hooks import batch_loss_for, build_mixture, resolve_tasks
from lomix.recipes.losses import answer_loss_sum, answer_tokens, forward
from lomix.recipes.portable import absolute_paths
from lomix.stats import RoutingStats

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"


@dataclass
class TrainerState:
    """Where the loop is: optimizer steps done, the epoch, and micro-batches (per process) taken in it."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


# ----------------------------------------------------------------------------------------------
# Pieces


def lr_factor(cfg: TrainConfig):
    """Multiplier of the peak rate for optimizer step s (0-based): linear warm-up, then decay."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


def logged_rates(param_groups: list[dict[str, Any]]) -> tuple[float, float]:
    """(lr, router_lr) to log: the experts' and the routers' current rates (`lomix.parameter_groups`
    names the groups). A stage that freezes the experts has no experts group: ``lr`` is then the
    largest rate that trains something (the router's), not 0; ``router_lr`` falls back to ``lr``."""
    rates = {
        group.get("name", str(i)): float(group["lr"])
        for i, group in enumerate(param_groups)
        if any(p.requires_grad for p in group["params"])
    }
    lr = rates.get("experts", max(rates.values(), default=0.0))
    return lr, rates.get("routers", lr)


def routing_record(stats: RoutingStats) -> dict[str, Any]:
    """Mean experts per token, effective support, entropy and router-distribution support over layers,
    and per layer those plus the expert load and the histogram of experts per token, from the routing
    statistics gathered since the last record."""
    layers = {}
    for name, summary in stats.summary().items():
        keep = (
            "experts_per_token",
            "effective_support",
            "entropy",
            "prob_support",
            "load",
            "experts_per_token_histogram",
        )
        layers[name] = {k: summary[k] for k in keep if k in summary}
    record: dict[str, Any] = {}
    for key in ("experts_per_token", "effective_support", "entropy", "prob_support"):
        values = [v[key] for v in layers.values() if key in v]
        if values:
            record[f"routing_{key}"] = sum(values) / len(values)
    record["routing"] = layers
    return record


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    found = completed_checkpoints(path)
    if not found and (path / "config.yaml").is_file():
        raise ConfigError(
            "resume_from",
            f"{path} is a run stopped before its first checkpoint: there is nothing to resume; run the same "
            "command without resume_from to start it again from scratch in that folder",
        )
    if not found:
        raise ConfigError("resume_from", f"{path} is neither a checkpoint nor a run folder with checkpoints")
    return found[-1]


def load_mixture_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy a saved mixture's tensors into an already injected model (resume)."""
    tensors, _ = read_weights(directory)
    expected = mixture_state_dict(model)
    if set(tensors) != set(expected):
        raise CheckpointError(f"{directory}: the saved mixture does not match this config's mixture")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class Run:
    cfg: FinetuneConfig
    out: Path
    accelerator: Any
    model: Any
    tokenizer: Any
    formatter: Formatter
    tasks: TaskSet
    test: list | None
    optimizer: Any
    scheduler: Any
    loader: Any
    steps_per_epoch: int
    state: TrainerState

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def print(self, *args, **kwargs) -> None:
        if self.accelerator.is_main_process:
            print(*args, **kwargs, flush=True)


def check_output_dir(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.output_dir)
    resuming_here = cfg.resume_from is not None and out.resolve() in [
        Path(cfg.resume_from).resolve(),
        *Path(cfg.resume_from).resolve().parents,
    ]
    if (out / "config.yaml").exists() and not resuming_here:
        # a final save killed mid-swap leaves the mixture aside (.mixture.old-*): also something to lose
        if completed_checkpoints(out) or (out / "mixture").exists() or list(out.glob(".mixture.old-*")):
            raise ConfigError(
                "output_dir",
                f"{out} already holds a run; pass resume_from={out} to continue it, or choose another output_dir",
            )
        # Killed before its first checkpoint: nothing in it can be resumed, so nothing is lost.
        if os.environ.get("RANK", "0") == "0":  # the accelerator (and its main-process test) comes later
            print(f"lomix: {out} holds a run stopped before its first checkpoint; starting it again from scratch")
    return out


def completed_checkpoints(run_dir: Path) -> list[Path]:
    """The run folder's complete checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return [p for p in found if (p / STATE_NAME).is_file()]


def setup(cfg: FinetuneConfig, build=build_mixture) -> Run:
    """``build(model, cfg, tasks, data_tasks)`` puts the mixture into the model (a method's stages pass their own)."""
    from accelerate.utils import set_seed

    cfg = copy.deepcopy(cfg)  # the build resolves the mixture (task names, few-shot start) in the run's copy
    absolute_paths(cfg)  # the saved config.yaml works from any working directory
    quantization.check(cfg.model, cfg.train)  # a missing bitsandbytes is named before anything loads
    trackers.prepare(cfg.train)  # so is a missing tracker (accelerate would only warn)
    out = check_output_dir(cfg)
    checkpoint = find_checkpoint(cfg.resume_from) if cfg.resume_from else None
    accelerator = distributed.make_accelerator(  # DDP, FSDP (also on CPU processes) or DeepSpeed
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=cfg.train.trackers or None,
        project_dir=str(out / "logs"),
        step_scheduler_with_optimizer=False,
    )
    distributed.check_deepspeed(accelerator, cfg.train.grad_accum, cfg.train.max_grad_norm)

    # Assets are prepared once (the first process converts and caches, the others then read).
    with accelerator.main_process_first():
        train_examples, test = load_examples(cfg.data)  # bad data fails before the model loads
        model, tokenizer = load_model_and_tokenizer(cfg.model)
    # Seeded after loading: a first run that converts a GGUF file (and so draws random numbers to
    # build the model it copies into) initialises the mixture exactly like a later cached run.
    set_seed(cfg.seed)
    tasks = task_set(train_examples, cfg.data)
    data_tasks, tasks = tasks.names, resolve_tasks(cfg, tasks)  # task routers: ids follow their rows
    formatter = Formatter(tokenizer, cfg.data)
    truncation = Truncation()
    features = tokenize(train_examples, formatter, tasks, truncation)
    cut = truncation.report(cfg.data)  # raises above data.max_truncated
    if cut and accelerator.is_main_process:
        print(cut, flush=True)

    if cfg.model.quantized:  # QLoRA-style: fp32 norms, no CPU repacking of 4-bit weights while training
        prepare_kbit_training(model)
    build(model, cfg, tasks, data_tasks)  # lomix.inject, or a method's own start (hooks.build_mixture)
    if cfg.train.gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # the frozen embeddings need no requires_grad trick this way
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()

    # Every epoch uses whole optimizer steps: the sampler keeps a multiple of the global batch.
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    steps_per_epoch = len(features) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            "train.batch_size",
            f"the training data has {len(features)} examples, fewer than one global batch "
            f"(batch_size x grad_accum x processes = {global_batch})",
        )
    sampler = EpochSampler(
        len(features),
        cfg.seed,
        keep=steps_per_epoch * global_batch,
        lengths=[len(f["input_ids"]) for f in features],
        group=cfg.train.group_by_length,
        batch=global_batch,
    )
    loader = torch.utils.data.DataLoader(
        ListDataset(features),
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=Collator(tokenizer.pad_token_id),
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG out of data loading
    )
    groups = lomix.parameter_groups(
        model, cfg.train.lr, router_lr=cfg.train.router_lr, weight_decay=cfg.train.weight_decay
    )
    optimizer = quantization.build_optimizer(groups, cfg.train)  # torch AdamW or a bitsandbytes 8-bit one
    lomix.attach_optimizer(model, optimizer)  # the routers' own optimizer rules (Router.attach_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.train))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    probe = Collator(tokenizer.pad_token_id)(features[: cfg.train.batch_size])
    probe = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in probe.items()}
    check_targets_run(model, lambda: forward(model, probe), "mixture.target_modules")

    # accelerate would save and load the whole model, frozen base included: swap in the mixture.
    # (Under FSDP accelerate passes no models to these hooks: they use the prepared model.)
    def save_mixture(models, weights, output_dir):
        with distributed.full_parameters(accelerator, model, rank0_only=True):
            if accelerator.is_main_process:
                lomix.save(accelerator.unwrap_model(model), Path(output_dir) / "mixture")
        weights.clear()

    def load_mixture(models, input_dir):
        with distributed.full_parameters(accelerator, model, writeback=True):
            load_mixture_weights(accelerator.unwrap_model(model), Path(input_dir) / "mixture")
        models.clear()

    accelerator.register_save_state_pre_hook(save_mixture)
    accelerator.register_load_state_pre_hook(load_mixture)

    state = TrainerState()
    if checkpoint is not None:
        state = restore_checkpoint(accelerator, checkpoint)
    run = Run(
        cfg, out, accelerator, model, tokenizer, formatter, tasks, test, optimizer, scheduler, loader,
        steps_per_epoch, state,
    )  # fmt: skip
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        write_text(out / "config.yaml", cfg.to_yaml())
        write_text(out / "tasks.json", json.dumps(tasks.to_dict(), indent=2) + "\n")
        trim_log(out / "log.jsonl", state.step)
    if cfg.train.trackers:
        accelerator.init_trackers("lomix", config=flat_config(cfg))
    with distributed.full_parameters(accelerator, model, rank0_only=True):  # FSDP: whole sizes, not shards
        count = lomix.count_parameters(run.unwrapped)
    run.print(
        f"lomix: {len(list(lomix.mixture_layers(run.unwrapped)))} mixture layers of {cfg.mixture.num_experts} experts "
        f"r={cfg.mixture.rank}, router {cfg.mixture.router.name}; {count}\n"
        f"lomix: {len(features)} training examples in {len(tasks.names)} tasks, {steps_per_epoch} steps per epoch, "
        f"global batch {global_batch}, {accelerator.num_processes} process(es)"
        + hooks.describe(cfg)
        + (f"; resuming from {checkpoint} at step {state.step}" if checkpoint else "")
    )
    return run


def restore_checkpoint(accelerator, checkpoint: Path) -> TrainerState:
    """Load a checkpoint's mixture, optimizer, scheduler and RNG states; the trainer state it holds.

    accelerate skips an unreadable RNG file with an INFO log line and carries on, which makes the
    resumed run silently differ from the uninterrupted one: every part is checked, and a part that
    cannot be restored is an error naming it (resume is exact or refused).
    """
    from accelerate.utils import RNG_STATE_NAME, load

    inexact = "resuming without it would not continue the run exactly; resume from another of its checkpoints"
    rng_file = checkpoint / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    try:
        rng = load(rng_file)
        saved_rng = rng["torch_manual_seed"]
        _ = rng["random_state"], rng["numpy_random_seed"]
    except Exception as exc:  # missing, cut, or not an RNG state: accelerate would skip it silently
        raise CheckpointError(
            f"{rng_file}: the random-number state cannot be read ({_one_line(exc)}); {inexact}"
        ) from None
    try:
        state = TrainerState(**json.loads((checkpoint / STATE_NAME).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint / STATE_NAME}: cannot be read ({_one_line(exc)}); {inexact}") from None
    try:
        distributed.load_state(accelerator, str(checkpoint))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{checkpoint}: the optimizer or scheduler state cannot be read ({_one_line(exc)}); {inexact}"
        ) from None
    if not torch.equal(torch.get_rng_state(), saved_rng):
        raise CheckpointError(f"{rng_file}: the random-number state was not restored; {inexact}")
    return state


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def flat_config(cfg: FinetuneConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", cfg.to_dict())
    return flat


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files and folders (``.NAME.tmp-*``) a killed run left in its folder and
    its checkpoints folder: no other writer uses a run folder while its run starts."""
    stale = [*out.glob(".*.tmp-*"), *(out / CHECKPOINTS).glob(".step-*.tmp-*")]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        print(
            f"lomix: removed {len(stale)} temporary file(s) or folder(s) an interrupted run left in {out}", flush=True
        )


def trim_log(path: Path, step: int) -> None:
    """On resume, keep only the log lines of steps already done (the rest will be redone).

    The log is appended line by line, so a run killed while appending leaves its last line cut: that
    line is dropped with a notice. A broken line anywhere else is damage lomix did not cause: an error.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
            done = record["step"] <= step
        except (json.JSONDecodeError, TypeError, KeyError):
            if number < len(lines):
                raise CheckpointError(f"{path}: line {number} is not a log record; fix or remove it") from None
            print(f"lomix: dropped the cut last line of {path} (the run was killed while logging)", flush=True)
            continue
        if done:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run: Run) -> Path:
    """All processes write into one temporary folder; the main process renames it into place."""
    from accelerate.utils import broadcast_object_list

    accelerator = run.accelerator
    target = run.out / CHECKPOINTS / f"step-{run.state.step:06d}"
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(target)) if accelerator.is_main_process else None
        tmp = Path(broadcast_object_list([str(tmp) if tmp else None])[0])
        distributed.save_state(accelerator, str(tmp))
        if accelerator.is_main_process:
            write_text(tmp / STATE_NAME, json.dumps(asdict(run.state), indent=2) + "\n")
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        done = sorted(p for p in (run.out / CHECKPOINTS).glob("step-*") if (p / STATE_NAME).is_file())
        for old in done[: -run.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


# ----------------------------------------------------------------------------------------------
# Training


def micro_batches(run: Run):
    """Yield micro-batches forever, epoch after epoch, starting where ``run.state`` says."""
    loader = run.loader
    while True:
        loader.set_epoch(run.state.epoch)
        skip = run.state.batches_in_epoch
        source = run.accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in source:
            run.state.batches_in_epoch += 1
            yield batch
        run.state.epoch += 1
        run.state.batches_in_epoch = 0


@torch.no_grad()
def held_out_loss(run: Run) -> float:
    """Token-mean answer loss on the test set (all processes share the work)."""
    model = run.unwrapped
    features = tokenize(run.test, run.formatter, run.tasks)
    collate = Collator(run.tokenizer.pad_token_id)
    size = run.cfg.eval.batch_size
    model.eval()
    totals = torch.zeros(2, device=run.accelerator.device)
    shared = distributed.evaluation_accelerator(run.accelerator) is not None  # FSDP: all on every process
    indices = list(range(len(features)))
    with (
        distributed.evaluation_parameters(run.accelerator, run.model),
        run.accelerator.split_between_processes(indices) if shared else contextlib.nullcontext(indices) as mine,
    ):
        for start in range(0, len(mine), size):
            batch = collate([features[i] for i in mine[start : start + size]])
            batch = {k: v.to(run.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            totals[0] += answer_loss_sum(*forward(model, batch))
            totals[1] += answer_tokens(batch)
    model.train()
    if shared:
        totals = run.accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


def train(run: Run) -> list[dict[str, Any]]:
    """The loop. Returns the logged records."""
    from tqdm.auto import tqdm

    cfg, accelerator, model, state = run.cfg.train, run.accelerator, run.model, run.state
    world = accelerator.num_processes
    batches = micro_batches(run)
    records: list[dict[str, Any]] = []
    bar = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        desc="train",
        disable=not (cfg.progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    window = {"loss": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
    batch_loss = batch_loss_for(run.cfg)  # the router's gradient estimator, or plain backpropagation
    # Hooks on the layers; closed after the loop (gradient checkpointing records each routing twice,
    # identically, which leaves the logged means unchanged).
    stats = RoutingStats(run.unwrapped, training_only=True).__enter__() if cfg.routing_stats else None
    while state.step < cfg.max_steps:
        start = time.perf_counter()
        lr, router_lr = logged_rates(run.optimizer.param_groups)  # this step's
        group = [next(batches) for _ in range(cfg.grad_accum)]
        counts = torch.tensor(
            [sum(answer_tokens(b) for b in group), sum(int(b["attention_mask"].sum()) for b in group)],
            device=accelerator.device,
        )
        counts = accelerator.reduce(counts, reduction="sum")  # answer tokens and all tokens, global
        total_answer = max(int(counts[0]), 1)
        loss_sum = torch.zeros((), device=accelerator.device)
        aux_sum = torch.zeros((), device=accelerator.device)
        grad_norm = None
        finite = torch.ones((), device=accelerator.device)  # 0 once a micro-batch's loss is NaN or infinite
        skipped = False
        for batch in group:
            with accelerator.accumulate(model):
                token_sum, surrogate = batch_loss(model, batch)
                aux = lomix.aux_loss(model)
                # accelerate divides by grad_accum, DDP averages over processes: undo both so that the
                # update is d(sum of answer-token losses of the global batch) / (its answer tokens).
                loss = (token_sum + surrogate) * (world * cfg.grad_accum / total_answer) + aux
                finite = finite * torch.isfinite(loss.detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # max_norm=inf measures the norm without clipping (needed for the non-finite check)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                    skipped = nonfinite_step(run, finite, grad_norm)
                    if not skipped:
                        run.optimizer.step()
                        lomix.after_optimizer_step(run.unwrapped)  # state the optimizer does not train
                    run.scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                    if cfg.max_grad_norm == 0:
                        grad_norm = None  # not clipped: logged as before
            loss_sum += token_sum.detach()
            aux_sum += aux.detach()
        state.step += 1
        totals = accelerator.reduce(torch.stack([loss_sum, aux_sum / cfg.grad_accum]), reduction="sum")
        step_loss = float(totals[0]) / total_answer
        seconds = time.perf_counter() - start
        if skipped:
            run.print(f"lomix: step {state.step} skipped: its loss or gradient norm is not finite (train.on_nonfinite)")
            step_loss = 0.0
            window["skipped"] = window.get("skipped", 0) + 1
        else:
            window["steps"] += 1
        window["loss"] += step_loss
        window["tokens"] += int(counts[1])
        window["seconds"] += seconds
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{int(counts[1]) / seconds:.0f}")
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": window["loss"] / window["steps"] if window["steps"] else math.nan,
                "aux_loss": float(totals[1]) / world,
                "lr": lr,
                "router_lr": router_lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": window["tokens"] / max(window["seconds"], 1e-9),
            }
            if window.get("skipped"):
                record["skipped_steps"] = window["skipped"]
            if stats is not None:
                record.update(routing_record(stats))
                stats.reset()
            log(run, record, bar)
            records.append(record)
            window = {"loss": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
        if run.test and cfg.eval_every and state.step % cfg.eval_every == 0:
            record = {"step": state.step, "eval_loss": held_out_loss(run)}
            log(run, record, bar)
            records.append(record)
        if cfg.save_every and state.step % cfg.save_every == 0:
            save_checkpoint(run)
    bar.close()
    if stats is not None:
        stats.__exit__(None, None, None)
    return records


class NonFiniteError(LomixError, FloatingPointError):
    """A training step's loss or gradient became NaN or infinite (train.on_nonfinite=stop)."""


def nonfinite_step(run: Run, finite: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """True when this step must not update the weights (train.on_nonfinite=skip_step); raises
    `NonFiniteError` under ``stop``. Every process takes the same decision (the flags are summed).

    Under fp16 the gradient scaler skips overflowing steps by design: only the loss counts there.
    """
    norm_bad = grad_norm is not None and not math.isfinite(float(grad_norm)) and run.accelerator.scaler is None
    flags = torch.tensor([float(1 - finite), float(norm_bad)], device=run.accelerator.device)
    flags = run.accelerator.reduce(flags, reduction="sum")
    if not bool(flags.any()):
        return False
    if run.cfg.train.on_nonfinite == "skip_step":
        return True
    what = "loss" if float(flags[0]) else f"gradient norm ({float(grad_norm)})"
    done = completed_checkpoints(run.out)
    keep = (
        f"the last good checkpoint is {done[-1]} (resume_from={done[-1]}, with a lower train.lr say)"
        if done
        else "no checkpoint was saved before it"
    )
    raise NonFiniteError(
        f"train: the {what} is not finite at step {run.state.step + 1}; stopped before updating the weights "
        f"and saving the mixture; {keep}; train.on_nonfinite=skip_step skips such steps instead"
    )


def log(run: Run, record: dict[str, Any], bar=None) -> None:
    if run.cfg.train.trackers:
        scalars = flat_scalars({k: v for k, v in record.items() if k != "step"})
        run.accelerator.log(scalars, step=record["step"])
    if not run.accelerator.is_main_process:
        return
    with open(run.out / "log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    shown = {k: v for k, v in record.items() if v is not None and not isinstance(v, (dict, list))}
    text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
    (bar.write if bar is not None and not bar.disable else print)(text, file=sys.stdout)


def flat_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts and lists as ``a/b/0`` keys (trackers take scalars only); None is left out."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_scalars(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            flat.update(flat_scalars({str(i): v for i, v in enumerate(value)}, name + "/"))
        elif value is not None:
            flat[name] = value
    return flat


# ----------------------------------------------------------------------------------------------
# The recipe


def run(cfg: FinetuneConfig, build=build_mixture) -> dict[str, Any]:
    """Fine-tune, save, evaluate. Returns {"records", "before", "after"} (evaluations may be None)."""
    run = setup(cfg, build)
    accelerator, out = run.accelerator, run.out
    scored = [e for e in run.test or [] if not e.is_text]  # raw text has no answer to score
    evaluate = bool(scored)
    before = after = None
    if evaluate and cfg.eval.before_training:
        saved = next((out / n for n in BASE_RESULTS if (out / n).is_file()), None)  # a resumed run has it
        if saved is not None and run.state.step > 0:
            before = json.loads(saved.read_text())
        else:
            with distributed.evaluation_parameters(accelerator, run.model), lomix.disabled(run.unwrapped):
                before = evaluate_model(
                    run.unwrapped, run.formatter, scored, run.tasks, cfg.eval,
                    distributed.evaluation_accelerator(accelerator), cfg.train.progress and accelerator.is_main_process,
                    "eval (base model)",
                )  # fmt: skip
            if accelerator.is_main_process:
                write_json(out / BASE_RESULTS[0], before)
                run.print(results_table({"base": before}))

    start = time.perf_counter()
    records = train(run)
    minutes = (time.perf_counter() - start) / 60

    accelerator.wait_for_everyone()
    with distributed.full_parameters(accelerator, run.model, rank0_only=True):
        if accelerator.is_main_process:
            lomix.save(run.unwrapped, out / "mixture", metadata={"steps": str(run.state.step)})
            run.tokenizer.save_pretrained(out / "mixture")  # the mixture folder is usable on its own
    losses = [r["loss"] for r in records if "loss" in r]
    if losses:
        head, tail = losses[: max(1, len(losses) // 5)], losses[-max(1, len(losses) // 5) :]
        run.print(
            f"lomix: training loss {sum(head) / len(head):.4f} (first steps) -> {sum(tail) / len(tail):.4f} "
            f"(last steps), {len(records)} log records, {minutes:.1f} min; mixture saved to {out / 'mixture'}"
        )
    if evaluate and cfg.eval.after_training:
        with distributed.evaluation_parameters(accelerator, run.model):
            after = evaluate_model(
                run.unwrapped, run.formatter, scored, run.tasks, cfg.eval,
                distributed.evaluation_accelerator(accelerator), cfg.train.progress and accelerator.is_main_process,
                "eval (mixture)",
            )  # fmt: skip
        if accelerator.is_main_process:
            write_json(out / RESULTS, after)
            columns = {"base": before, "mixture": after} if before else {"mixture": after}
            run.print("\n" + results_table(columns))
    if cfg.train.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return {"records": records, "before": before, "after": after}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return recipe_main(
        run, argv, doc=__doc__, config="a YAML config (see `lomix recipes ls`)", example="train.lr=2e-4 router.k=3"
    )


if __name__ == "__main__":
    main()
