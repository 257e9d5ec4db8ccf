"""Training on many processes: the few things sharded engines (FSDP1, FSDP2, DeepSpeed ZeRO) need from a training loop.

Data parallelism (DDP) needs none of this; under FSDP and DeepSpeed ZeRO-3 parameters live sharded across processes,
so a loop must

* **generate through the sharded root** (`generate`): ``accelerator.unwrap_model(model).generate`` goes around the
  FSDP root, whose own parameters (embeddings, output head) then stay sharded;
* **gather before saving** (`gather_state_dict`, `save_adapter`): rank 0 alone holds a shard of each parameter (under
  ZeRO-3 an empty tensor), so every process must take part in gathering before rank 0 writes; `save_adapter` then
  reads the file back and raises if any tensor is missing, empty or different (`verify_saved_adapter`);
* **load through the engine** (`load_adapter_state`): writing a gathered adapter back (a best-validation copy) into
  ZeRO-3 partitions needs the parameters gathered while they are written;
* **keep BatchNorm statistics in step** (`sync_batch_norm_statistics`): DDP broadcasts rank 0's buffers at every
  forward; FSDP and DeepSpeed don't, so each process's running statistics (``batch_norm_statistics="update"`` and the
  blocks' input BatchNorm) drift apart and evaluation on several processes mixes different models;
* **clip as asked** (`check_grad_clipping`): DeepSpeed clips with its config's ``gradient_clipping`` and ignores the
  loop's ``clip_grad_norm_``.

Every function works with or without Accelerate: it recognises the wrapper it is given (``FullyShardedDataParallel``,
an ``fully_shard``-ed module, a DeepSpeed engine, DDP, or a plain model).

Scripts build their ``Accelerator`` with `make_accelerator`, which is ``Accelerator(**kwargs)`` except under the
test-only switch ``SMEAR_PEFT_CPU_SHARDING=1`` (`CPU_SHARDING_ENV`): Accelerate drops its DeepSpeed and FSDP plugins
on CPU, and the switch keeps them, on CPU processes talking over gloo, so the tests can run the example scripts under
``accelerate launch --config_file examples/configs/accelerate_zero3.yaml`` (or ``_fsdp1`` / ``_fsdp2``) without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

#: Buffers of a BatchNorm layer that training changes.
BATCH_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def engine_of(model: nn.Module) -> str:
    """``fsdp1``, ``fsdp2``, ``deepspeed`` (ZeRO stage 0-2), ``deepspeed3``, ``ddp`` or ``none``."""
    if type(model).__name__ == "DeepSpeedEngine" or hasattr(model, "zero_optimization_stage"):
        return "deepspeed3" if model.zero_optimization_stage() == 3 else "deepspeed"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            return "fsdp1"
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            return "fsdp2"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    return "none"


def _inner(model: nn.Module) -> nn.Module:
    """The module inside a DDP / FSDP1 / DeepSpeed wrapper (an FSDP2 module is its own inner module)."""
    while isinstance(getattr(model, "module", None), nn.Module) and engine_of(model) in ("fsdp1", "ddp", "deepspeed", "deepspeed3"):
        model = model.module
    return model


# -- Accelerate on CPU (test-only switch) ----------------------------------------------------------------------------
#: Test-only: set to 1 to keep Accelerate's DeepSpeed / FSDP plugin on CPU processes (gloo); read by `make_accelerator`.
CPU_SHARDING_ENV = "SMEAR_PEFT_CPU_SHARDING"


def make_accelerator(**kwargs: Any):
    """``accelerate.Accelerator(**kwargs)``; under the test-only switch ``SMEAR_PEFT_CPU_SHARDING=1``, one whose
    DeepSpeed or FSDP plugin (from ``accelerate launch --config_file ...``) runs on CPU processes over gloo.

    Accelerate 1.16 drops both plugins on CPU: ``AcceleratorState`` selects DeepSpeed only when ``cpu`` is false
    (and ``--cpu`` / ``ACCELERATE_USE_CPU`` force it true), and FSDP only for GPU-like process groups
    (``MULTI_GPU``, ...), never ``MULTI_CPU``; with ``cpu`` false on a machine without a GPU, ``PartialState`` starts
    no process group at all. The switch starts the gloo process group first (``PartialState(cpu=True)``), then lets
    ``AcceleratorState`` see a non-CPU run: a GPU-like group type when FSDP is asked for. DeepSpeed's shared-memory
    communication op, which would be compiled at start (minutes of C++), is turned off: gloo needs none.

    For tests and debugging only: nothing is faster on CPU, and FSDP runs there only because torch's FSDP accepts a
    CPU ``device_id``. Launch without ``--cpu`` and without ``ACCELERATE_USE_CPU`` (they drop the plugins again)."""
    from accelerate import Accelerator

    if os.environ.get(CPU_SHARDING_ENV, "") not in ("", "0"):
        _keep_sharding_plugins_on_cpu()
    return Accelerator(**kwargs)


def _keep_sharding_plugins_on_cpu() -> None:
    from accelerate import PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise RuntimeError(
            f"{CPU_SHARDING_ENV}=1 keeps Accelerate's DeepSpeed / FSDP plugins on CPU, but ACCELERATE_USE_CPU (or "
            "`accelerate launch --cpu`, or `use_cpu: true` in the config file) drops them again: launch without it, "
            "e.g. `accelerate launch --config_file examples/configs/accelerate_zero3.yaml --num_processes 2 ...`."
        )
    state = PartialState(cpu=True)  # the gloo process group on CPU (torchrun's environment)
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        import deepspeed

        for name in list(deepspeed.ops.__compatible_ops__):
            if "shm" in name:
                deepspeed.ops.__compatible_ops__[name] = False
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and state.distributed_type == DistributedType.MULTI_CPU:
        # AcceleratorState keeps the FSDP plugin only for GPU-like process groups; the device stays the CPU.
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def set_deepspeed_micro_batch(accelerator: Any, micro_batch_size: int, accumulation: int = 1) -> None:
    """Tell DeepSpeed the per-process micro-batch size of a loop that feeds its own batches. Call before ``prepare``;
    does nothing without DeepSpeed.

    Accelerate reads DeepSpeed's ``train_micro_batch_size_per_gpu`` (``auto`` in the example configs) from the
    training DataLoader given to ``prepare``, and refuses to prepare without one. Raises ValueError when the loop
    accumulates gradients itself (``accumulation`` > 1): under DeepSpeed every ``accelerator.backward`` outside
    ``accelerator.accumulate`` is an optimizer step, so the loop's accumulation would step at every micro-batch."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return
    if accumulation != 1:
        raise ValueError(
            f"Under DeepSpeed this loop cannot accumulate gradients ({accumulation} micro-batches per step): every "
            "backward is an optimizer step. Use per_device_batch_size = batch_size / processes (no accumulation), "
            "or more processes."
        )
    configured = plugin.deepspeed_config.get("gradient_accumulation_steps", 1)
    if configured not in (1, "auto"):
        raise ValueError(
            f"The DeepSpeed config sets gradient_accumulation_steps={configured}, but this loop does not accumulate "
            "under DeepSpeed: set it to 1 (the examples/configs/accelerate_zero*.yaml files do)."
        )
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    plugin.deepspeed_config["gradient_accumulation_steps"] = 1


# -- BatchNorm statistics -------------------------------------------------------------------------------------------
def batch_norm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm layer in ``model`` (adapter copies and the blocks' own input norms
    included), by buffer name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            for buffer_name in BATCH_NORM_BUFFERS:
                buffer = module._buffers.get(buffer_name)
                if buffer is not None:
                    found[f"{name}.{buffer_name}" if name else buffer_name] = buffer
    return found


@torch.no_grad()
def sync_batch_norm_statistics(model: nn.Module, mode: str = "broadcast", src: int = 0) -> int:
    """Make every process's BatchNorm running statistics equal; a collective: call it on every process (before
    evaluating and before saving). Returns the number of buffers synchronised (0 outside distributed runs).

    ``mode="broadcast"`` (default) copies rank ``src``'s statistics to every process. This is what DDP gives: DDP
    broadcasts rank 0's buffers before every training forward, so rank 0's statistics only ever see rank 0's
    micro-batches and the other ranks' are overwritten; a training-mode BatchNorm normalises with its batch's own
    statistics, never the running ones, so broadcasting once before evaluation or saving leaves every process with
    exactly DDP's statistics (and the saved adapter with what evaluation used).

    ``mode="mean"`` averages the statistics over processes instead. Running statistics are exponential moving averages,
    so the mean over ranks is the moving average of the per-step mean of the ranks' batch means and variances: it uses
    every rank's data, like SyncBatchNorm's running statistics except that the running variance leaves out the spread
    between the ranks' batch means. (SyncBatchNorm itself would also change the training forward, normalising with
    the global batch's statistics, which DDP does not do.)
    """
    if mode not in ("broadcast", "mean"):
        raise ValueError(f"mode must be 'broadcast' or 'mean', got {mode!r}.")
    if not _distributed():
        return 0
    buffers = list(batch_norm_statistics(_inner(model)).values())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for buffer in buffers:
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    world = dist.get_world_size()
    for (dtype, _), tensors in groups.items():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if mode == "mean" and dtype.is_floating_point:
            dist.all_reduce(flat)
            flat /= world
        else:  # counters (num_batches_tracked) are equal under DDP too: rank src's
            dist.broadcast(flat, src)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
    return len(buffers)


# -- generation -----------------------------------------------------------------------------------------------------
def generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` of the PEFT model inside ``model`` (a DDP / FSDP / DeepSpeed wrapper or the model itself), run so
    that sharded parameters are gathered: under FSDP1 and FSDP2 the call goes through the root module's forward (its
    hooks unshard the root's own parameters; the inner units unshard themselves at every decoding step). Every process
    must call it (``synced_gpus`` is turned on when parameters are sharded, so processes step together)."""
    engine = engine_of(model)
    inner = _inner(model)
    if engine in ("fsdp1", "fsdp2", "deepspeed3") and _distributed():
        kwargs.setdefault("synced_gpus", True)
    if engine not in ("fsdp1", "fsdp2"):
        return inner.generate(*args, **kwargs)
    generate_method = inner.generate
    had_forward = "forward" in inner.__dict__
    saved_forward = inner.__dict__.get("forward")
    inner.forward = lambda *a, **k: generate_method(*a, **k)
    try:
        return model(*args, **kwargs)
    finally:
        if had_forward:
            inner.forward = saved_forward
        else:
            del inner.forward


# -- saving ---------------------------------------------------------------------------------------------------------
def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of the module inside ``model``, on CPU, on every process. A collective under
    FSDP and ZeRO-3: call it on every process.

    Under ZeRO-3 only the trainable parameters (the adapter) are gathered, with the buffers; the frozen base weights
    stay partitioned and are left out. Under FSDP the whole model is gathered (to CPU)."""
    engine = engine_of(model)
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            state = model.state_dict()
    elif engine == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    elif engine == "deepspeed3":
        import deepspeed

        module = model.module
        trainable = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            names = {id(p): n for n, p in module.named_parameters()}
            state = {names[id(p)]: p.detach().cpu().clone() for p in trainable}
        state.update({n: b for n, b in module.named_buffers()})
    else:
        state = _inner(model).state_dict()
    return {_clean_name(k): v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _is_main_process() -> bool:
    return not _distributed() or dist.get_rank() == 0


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None, accelerator: Any = None) -> dict:
    """The adapter's checkpoint tensors (what ``save_pretrained`` writes), gathered, on every process. A collective."""
    from peft.utils import get_peft_model_state_dict

    peft_model = accelerator.unwrap_model(model) if accelerator is not None else _inner(model)
    adapter_name = adapter_name or getattr(peft_model, "active_adapter", "default")
    state = gather_state_dict(model)
    # PEFT finds modules_to_save (and BatchNorm statistics copies) by module name and asks each for its keys with
    # `.state_dict()`, a collective inside FSDP1 units: so this runs on every process, with FSDP prefixes removed.
    with _clean_module_names(peft_model):
        return get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter_name)


def load_adapter_state(model: nn.Module, state: dict, *, accelerator: Any = None, adapter_name: Optional[str] = None) -> None:
    """Load an adapter state (what `adapter_state_dict` returns: gathered, PEFT's checkpoint keys) into ``model``, on
    every process. A collective under ZeRO-3: call it on every process, each with the same ``state``.

    Under ZeRO-3 the trainable parameters are gathered, written, and partitioned again (``GatheredParameters`` with
    ``modifier_rank=0``); buffers (BatchNorm statistics) are not partitioned and are written directly. Under DDP,
    ZeRO-1/2 or one process the parameters are whole and are written as they are. FSDP1 / FSDP2 (flattened or DTensor
    parameters) are refused with NotImplementedError rather than loaded wrongly. Raises RuntimeError if ``state``
    holds a key the model does not have."""
    from peft import set_peft_model_state_dict

    engine = engine_of(model)
    if engine in ("fsdp1", "fsdp2"):
        raise NotImplementedError(
            f"Loading an adapter state into a {engine.upper()} model is not supported: its parameters are flattened "
            "or DTensor shards. Use DeepSpeed (ZeRO-2/3) or DDP, or reload the saved adapter in one process "
            "(PeftModel.from_pretrained(base_model, output_dir))."
        )
    peft_model = accelerator.unwrap_model(model) if accelerator is not None else _inner(model)
    adapter_name = adapter_name or getattr(peft_model, "active_adapter", "default")
    gathered = contextlib.nullcontext()
    if engine == "deepspeed3":
        import deepspeed

        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        gathered = deepspeed.zero.GatheredParameters(trainable, modifier_rank=0)
    with gathered:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise RuntimeError(f"The adapter state holds {len(result.unexpected_keys)} keys the model lacks, e.g. "
                           f"{result.unexpected_keys[0]}: it was taken from another model.")


def save_adapter(
    model: nn.Module, path: str, *, accelerator: Any = None, adapter_name: Optional[str] = None, sync_batch_norm: bool = True
) -> dict:
    """Save the PEFT adapter of ``model`` (any wrapper) to ``path`` from rank 0, after gathering it on every process.

    A collective: call it on every process. BatchNorm statistics are synchronised first (`sync_batch_norm_statistics`),
    so the saved adapter is the one every process evaluates. Rank 0 writes ``adapter_config.json`` and
    ``adapter_model.safetensors`` (what ``PeftModel.save_pretrained`` writes), then reads the file back and raises
    (`verify_saved_adapter`) if a tensor is missing, empty or not what was gathered: success is never reported for an
    adapter that would not reload. Returns the saved tensors."""
    import copy

    from safetensors.torch import save_file

    if sync_batch_norm:
        sync_batch_norm_statistics(model)
    peft_model = accelerator.unwrap_model(model) if accelerator is not None else _inner(model)
    adapter_name = adapter_name or getattr(peft_model, "active_adapter", "default")
    saved = adapter_state_dict(model, adapter_name, accelerator)
    if _is_main_process():
        os.makedirs(path, exist_ok=True)
        config = copy.deepcopy(peft_model.peft_config[adapter_name])
        config.inference_mode = True
        config.save_pretrained(path)
        tensors = {k: v.detach().clone().contiguous() for k, v in saved.items()}  # no shared storage
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
        if hasattr(peft_model, "create_or_update_model_card"):
            peft_model.create_or_update_model_card(path)  # PEFT's README, as save_pretrained writes it
        verify_saved_adapter(path, saved)
    if _distributed():
        dist.barrier()
    return saved


def _clean_name(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


@contextlib.contextmanager
def _clean_module_names(model: nn.Module):
    """PEFT finds ``modules_to_save`` (and the BatchNorm statistics copies) by module name; inside nested FSDP1 units
    those names carry ``_fsdp_wrapped_module.``, which PEFT strips only at the front (peft PR #2681). Make
    ``named_modules`` report clean names while saving."""
    original = model.named_modules

    def named_modules(*args, **kwargs):
        for name, module in original(*args, **kwargs):
            yield _clean_name(name), module

    model.named_modules = named_modules
    try:
        yield
    finally:
        del model.named_modules


def verify_saved_adapter(path: str, expected: Optional[dict] = None) -> None:
    """Raise if the adapter saved in ``path`` has no tensors, an empty (zero-element) tensor, or (given ``expected``,
    the adapter state that was saved) a tensor that is missing or differs from it."""
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise RuntimeError(f"No adapter_model.safetensors in {path}: the adapter was not saved.")
    loaded = load_file(file)
    if not loaded:
        raise RuntimeError(f"{file} holds no tensors: the adapter was not saved.")
    empty = sorted(k for k, v in loaded.items() if v.numel() == 0)
    if empty:
        raise RuntimeError(
            f"{file} holds {len(empty)} empty tensors (e.g. {empty[0]}): sharded parameters were saved without being "
            "gathered (ZeRO-3 / FSDP). Save with smear_peft.distributed.save_adapter on every process."
        )
    if expected is not None:
        missing = sorted(set(expected) - set(loaded))
        if missing:
            raise RuntimeError(f"{file} lacks {len(missing)} adapter tensors, e.g. {missing[0]}.")
        for key, value in expected.items():
            if tuple(loaded[key].shape) != tuple(value.shape) or not torch.equal(loaded[key], value.to(loaded[key].dtype)):
                raise RuntimeError(f"{file}: {key} differs from the adapter that was saved.")


# -- gradient clipping ----------------------------------------------------------------------------------------------
def check_grad_clipping(accelerator: Any, max_grad_norm: Optional[float]) -> Optional[float]:
    """Make DeepSpeed clip at ``max_grad_norm`` or say why it doesn't. Call after ``accelerator.prepare``.

    Under DeepSpeed the engine clips with its config's ``gradient_clipping`` and ``accelerator.clip_grad_norm_`` does
    nothing. When the config says ``"auto"`` Accelerate fills in 1.0; if the value differs from ``max_grad_norm`` the
    engine is set to ``max_grad_norm`` (when it allows it) and a warning says so. Returns the norm the run clips at."""
    state = getattr(accelerator, "state", None)
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is None:
        return max_grad_norm
    engine = None
    for candidate in getattr(accelerator, "_models", []):
        if engine_of(candidate).startswith("deepspeed"):
            engine = candidate
    configured = plugin.deepspeed_config.get("gradient_clipping")
    if configured in (None, "auto"):
        configured = engine.gradient_clipping() if engine is not None else None
    wanted = float(max_grad_norm or 0.0)
    if configured is not None and float(configured) == wanted:
        return wanted
    message = (
        f"DeepSpeed clips gradients with its config's gradient_clipping={configured}, not max_grad_norm={max_grad_norm} "
        "(accelerator.clip_grad_norm_ does nothing under DeepSpeed)"
    )
    if engine is not None and hasattr(engine, "_config"):
        engine._config.gradient_clipping = wanted
        plugin.deepspeed_config["gradient_clipping"] = wanted
        warnings.warn(message + f": the engine now clips at {wanted}. Set gradient_clipping in the DeepSpeed config "
                      "to silence this.", stacklevel=2)
        return wanted
    warnings.warn(message + ".", stacklevel=2)
    return None if configured is None else float(configured)
