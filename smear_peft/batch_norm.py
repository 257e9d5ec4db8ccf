"""The frozen backbone's BatchNorm running statistics while adapters train (``SmearConfig.batch_norm_statistics``).

A frozen BatchNorm layer still updates its running statistics in ``train()`` mode. Left alone, training would
silently change a model that is later rebuilt from the base weights plus the saved adapter. Two policies:

* ``update`` (the authors' ResNet recipe: statistics track the training data). Each backbone BatchNorm is wrapped in
  a `BatchNormStatisticsWrapper`, which keeps a per-adapter copy. The copy's running statistics update and are saved
  with the adapter. Its affine ``weight`` and ``bias`` are buffers, so they stay frozen and nothing can make them
  trainable. The base model's own BatchNorm is never run while the adapter is active, so ``disable_adapter()`` and
  ``unload()`` give back the unchanged base model.
* ``frozen``: backbone BatchNorm layers run in eval mode, on the loaded statistics, even while the model trains
  (see `keep_in_eval_mode`). The routing blocks' own input BatchNorm still trains.

BatchNorm layers the user lists in ``modules_to_save`` are trained and saved in full by PEFT and left alone here.
"""

from __future__ import annotations

from collections.abc import Iterable

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle


class BatchNormStatisticsWrapper(ModulesToSaveWrapper):
    """A backbone BatchNorm with one copy per adapter: the running statistics train, the affine parameters don't.

    It is a `ModulesToSaveWrapper`, so PEFT saves, loads, switches and deletes the copies like ``modules_to_save``.
    The checkpoint keys are the same too (``<bn>.weight``, ``<bn>.running_mean``, ...).
    """

    def update(self, adapter_name: str, **kwargs) -> None:
        super().update(adapter_name, **kwargs)
        _affine_parameters_to_buffers(self.modules_to_save[adapter_name])

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None):
        """Unloading gives back the base model's own BatchNorm, with its original statistics."""
        return self.original_module

    def _error_message_name(self) -> str:
        return "BatchNorm statistics"


def _affine_parameters_to_buffers(norm: nn.Module) -> None:
    """Turn ``weight`` / ``bias`` into buffers of the same name: still used and saved, never trainable."""
    for name in ("weight", "bias"):
        parameter = norm._parameters.get(name)
        if parameter is not None:
            del norm._parameters[name]
            norm.register_buffer(name, parameter.detach())


def backbone_batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    """The base model's BatchNorm layers by name (a `BatchNormStatisticsWrapper` stands for the layer it wraps).

    Leaves out the routing blocks' own norms and anything inside PEFT's other training wrappers (``modules_to_save``).
    """
    found: dict[str, nn.Module] = {}
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skipped):
            continue
        if isinstance(module, (_BatchNorm, BatchNormStatisticsWrapper)):
            found[name] = module
        if isinstance(module, AuxiliaryTrainingWrapper):
            skipped.append(f"{name}.")
        elif isinstance(module, BaseTunerLayer):
            skipped += [f"{name}.{attribute}." for attribute in module.adapter_layer_names]
    return found


def wrap_batch_norm_statistics(
    model: nn.Module, norms: dict[str, nn.Module], adapter_name: str, *, inference_mode: bool, activate: bool
) -> None:
    """Give ``adapter_name`` its own statistics in every backbone BatchNorm (``batch_norm_statistics="update"``).

    Mirrors how PEFT adds an adapter to ``modules_to_save``.
    """
    for name, norm in norms.items():
        if isinstance(norm, BatchNormStatisticsWrapper):
            norm.update(adapter_name)
            norm.set_adapter(norm.active_adapters, inference_mode=inference_mode)
            continue
        parent_name, _, child_name = name.rpartition(".")
        wrapper = BatchNormStatisticsWrapper(norm, adapter_name)
        wrapper.set_adapter(adapter_name if activate else [], inference_mode=inference_mode)
        setattr(model.get_submodule(parent_name), child_name, wrapper)


class _EvalModeDuringForward:
    """Forward hooks that run a module in eval mode and then restore its ``training`` flag."""

    def __init__(self) -> None:
        self._switched: set[int] = set()

    def before(self, module: nn.Module, args) -> None:
        if module.training:
            module.training = False
            self._switched.add(id(module))

    def after(self, module: nn.Module, args, output) -> None:
        if id(module) in self._switched:
            self._switched.discard(id(module))
            module.training = True


def keep_in_eval_mode(norms: Iterable[nn.Module]) -> list[RemovableHandle]:
    """Make each BatchNorm normalise with, and keep, its running statistics whatever the model's mode
    (``batch_norm_statistics="frozen"``). Hooks rather than an overridden ``train()`` make this hold however the model
    is called or switched to training. Returns the hook handles; removing them restores the usual behaviour."""
    switch = _EvalModeDuringForward()
    handles = []
    for norm in norms:
        handles.append(norm.register_forward_pre_hook(switch.before))
        handles.append(norm.register_forward_hook(switch.after, always_call=True))
    return handles

