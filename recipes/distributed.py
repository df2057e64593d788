"""The accelerator of a recipe run, and the few places where a sharded model needs care.

`accelerate launch` with an FSDP config starts the processes with ``ACCELERATE_USE_FSDP=true``;
accelerate 1.15 then builds FSDP on GPUs only: on a machine without one it either fails in
``FullyShardedDataParallelPlugin`` (``sync_module_states`` looks for a GPU) or, with
``Accelerator(cpu=True)``, silently trains plain data-parallel (MULTI_CPU). PyTorch's FSDP itself
runs on CPU processes over gloo, so `make_accelerator` builds accelerate's FSDP there:

- the processes join one gloo group first (accelerate's CPU set-up), then accelerate is told the
  group is a multi-device one so that it takes the FSDP plugin;
- ``sync_module_states`` is off: every process loads the same base from disk and draws the same
  seeded mixture, so there is nothing to broadcast;
- full state dicts are gathered without ``offload_to_cpu``: with CPU tensors that option crashes
  PyTorch 2.13's FSDP (segmentation fault), and the tensors are on the CPU already.

Under FSDP every parameter of a wrapped block is a shard, so anything that reads or writes whole
tensors outside the training forward (saving or loading the mixture, evaluation) runs inside
`full_parameters`, which gathers them on every process. A forward of a sharded model is a
collective: evaluation then runs the same examples on every process (not shared out) so that the
processes stay in step. lomix checkpoints hold the mixture only, never the frozen base, so
accelerate's own FSDP model files are not written (`save_state`).

DeepSpeed (ZeRO-2) runs on CPU processes too: accelerate starts it there once gloo is named.
ZeRO-3 is refused with the reason (`check_deepspeed`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from lomix.errors import ConfigError
from lomix.recipes.assets import cpu_processes


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (``accelerate launch`` with an FSDP config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """True when the launcher asked for DeepSpeed (``accelerate launch`` with a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(**kwargs: Any):
    """accelerate's ``Accelerator(**kwargs)`` for the launcher's set-up, FSDP on CPU processes included."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if not cpu_processes():
        return Accelerator(**kwargs)
    if deepspeed_requested():
        # accelerate starts DeepSpeed only when not told cpu=True; DeepSpeed's CPU accelerator then
        # needs gloo named (accelerate finds no backend without a GPU and would train alone).
        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    if fsdp_requested():
        return Accelerator(cpu=True, fsdp_plugin=cpu_fsdp_plugin(), **kwargs)
    return Accelerator(cpu=True, **kwargs)


def cpu_fsdp_plugin():
    """accelerate's FSDP plugin (read from the launcher's environment) for gloo processes on the CPU."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig

    plugin = FullyShardedDataParallelPlugin(
        sync_module_states=False,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
    )
    if plugin.fsdp_version != 1:
        raise ConfigError("accelerate config", "fsdp_version: lomix runs FSDP on the CPU with fsdp_version 1 only")
    if not plugin.use_orig_params:
        raise ConfigError(
            "accelerate config",
            "fsdp_use_orig_params must be true: a wrapped block mixes frozen base weights and trainable experts",
        )
    PartialState(cpu=True)  # joins the gloo group (accelerate's MULTI_CPU set-up)
    # accelerate takes the FSDP plugin only for a multi-device group; the device stays the CPU.
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    # FSDP compares its device_id with the CPU's current device, "cpu" (accelerate's CPU device is "cpu:0")
    PartialState._shared_state["device"] = torch.device("cpu")
    return plugin


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def full_parameters(accelerator, model: torch.nn.Module, writeback: bool = False, rank0_only: bool = False):
    """Whole parameters inside under FSDP (gathered on every process, or on the main one with
    ``rank0_only``), written back to the shards on exit with ``writeback``. Elsewhere (DDP,
    DeepSpeed ZeRO-2) the parameters are whole already. Every process must enter it."""
    if not is_fsdp(accelerator):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=writeback, rank0_only=rank0_only):
        yield


def evaluation_parameters(accelerator, model: torch.nn.Module):
    """Around an evaluation: FSDP's root parameters are whole only inside `full_parameters` (the
    evaluation calls the unwrapped model, not FSDP's wrapper)."""
    return full_parameters(accelerator, model)


def evaluation_accelerator(accelerator):
    """The accelerator to share evaluation out with, or None to run every example on every process
    (a sharded forward is a collective: the processes must run the same number of forwards)."""
    return None if is_fsdp(accelerator) else accelerator


def save_state(accelerator, folder: str) -> None:
    """``accelerator.save_state(folder)``, with lomix's hooks writing the mixture instead of the model.

    Under FSDP accelerate would write the whole model, frozen base included, gathered with
    ``offload_to_cpu`` (a crash on CPU processes): its model writer is skipped. Under DeepSpeed the
    engine's checkpoint leaves the frozen parameters out.
    """
    if is_fsdp(accelerator):
        with _fsdp_model_files_skipped():
            accelerator.save_state(folder)
    elif is_deepspeed(accelerator):
        accelerator.save_state(folder, exclude_frozen_parameters=True)
    else:
        accelerator.save_state(folder)


def load_state(accelerator, folder: str) -> None:
    """The inverse of `save_state` (the frozen base is the one already loaded)."""
    if is_fsdp(accelerator):
        with _fsdp_model_files_skipped():
            accelerator.load_state(folder)
    elif is_deepspeed(accelerator):
        accelerator.load_state(folder, load_module_strict=False)
    else:
        accelerator.load_state(folder)


@contextlib.contextmanager
def _fsdp_model_files_skipped():
    import accelerate.accelerator as module

    saved = module.save_fsdp_model, module.load_fsdp_model
    module.save_fsdp_model = module.load_fsdp_model = _skip
    try:
        yield
    finally:
        module.save_fsdp_model, module.load_fsdp_model = saved


def _skip(*args: Any, **kwargs: Any) -> None:
    return None


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


ZERO3_REFUSAL = (
    "zero_stage: DeepSpeed ZeRO-3 does not run lomix: it partitions every parameter and gathers a module's "
    "parameters only around that module's own forward, while a mixture layer reads its experts' factors "
    "itself (the second step's backward fails on a partitioned parameter); use deepspeed_zero2.yaml, "
    "or fsdp.yaml to shard the frozen base"
)


def check_deepspeed(accelerator, grad_accum: int, max_grad_norm: float) -> None:
    """DeepSpeed owns accumulation and clipping once it wraps the optimizer: its config must say
    what lomix's does (accelerate would silently take DeepSpeed's accumulation). ZeRO-3 is refused
    (`ZERO3_REFUSAL`), before the base model loads."""
    if not is_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage == 3:
        raise ConfigError("accelerate config", ZERO3_REFUSAL)
    config = plugin.deepspeed_config
    steps = config.get("gradient_accumulation_steps", "auto")
    if steps != "auto" and int(steps) != grad_accum:
        raise ConfigError(
            "train.grad_accum",
            f"is {grad_accum} but the DeepSpeed config's gradient_accumulation_steps is {steps}: make them equal",
        )
    clipping = config.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != float(max_grad_norm):
        raise ConfigError(
            "train.max_grad_norm",
            f"is {max_grad_norm} but the DeepSpeed config's gradient_clipping is {clipping}: make them equal",
        )
