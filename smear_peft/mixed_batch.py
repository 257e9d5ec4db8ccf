"""PEFT's mixed adapter batches: ``model(..., adapter_names=[...])`` runs each example through its named adapter
(``"__base__"``: the base model), in ``forward`` and ``generate``.

Every SMEAR layer, and every copy PEFT keeps for ``modules_to_save`` (the layer norms SMEAR adapters train, per-adapter
BatchNorm statistics), computes the whole batch once per adapter named in the call and keeps each example's rows from
its own adapter's result. This is exact, because everything a block computes for one example (its routing input, its
routing, its merged expert) depends on that example only; it costs one pass of the wrapped layers per distinct
adapter. PEFT's own wrapper splits sub-batches instead and only for Linear / Embedding / Conv modules, so its layer
norms and BatchNorm copies could not take part.

As in PEFT: inference only (the model in ``eval()`` mode), no merged adapters. The selection belongs to the call's
routing frame, so concurrent calls with different ``adapter_names`` never see each other's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

#: PEFT's name for "no adapter" in ``adapter_names``.
BASE = "__base__"


def check_adapter_names(names: Any, known: Iterable[str], training: bool, merged: bool) -> list[str]:
    """``names`` as a list of known adapter names (or ``"__base__"``), or a clear error."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names must be a list of adapter names, one per example; got {names!r}.")
    known = list(known)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapter_names: unknown adapters {unknown}; this model has {known} (and '{BASE}').")
    if training:
        raise ValueError("adapter_names (mixed adapter batches) is for inference: call model.eval() first, as in PEFT.")
    if merged:
        raise ValueError("adapter_names cannot be used while an adapter is merged: call model.unmerge_adapter() first.")
    return list(names)


def example_rows(names: list[str], batch_size: int, per_example: Callable) -> dict[str, torch.Tensor]:
    """``{adapter: bool [batch_size]}``: the examples of the batch each adapter named in the call runs on
    (``per_example`` repeats them for beams and return sequences inside ``generate``)."""
    order = list(dict.fromkeys(names))
    index = per_example(torch.tensor([order.index(n) for n in names]), batch_size, "adapter_names")
    return {name: index == i for i, name in enumerate(order)}


def select_rows(results: Mapping[str, Any], rows: Mapping[str, torch.Tensor]) -> Any:
    """Combine per-adapter results of the same call: each example's rows from its adapter's result. A result is a
    tensor whose dim 0 is the batch (or batch x positions, for layers that see flattened tokens), or a tuple whose
    first element is (the rest is the same for every adapter: the first adapter's is kept)."""
    first = next(iter(results.values()))
    pick = (lambda r: r[0]) if isinstance(first, tuple) else (lambda r: r)
    hidden = pick(first)
    batch = next(iter(rows.values())).shape[0]
    if hidden.shape[0] % batch:
        raise ValueError(f"mixed adapter batch: a layer output of {hidden.shape[0]} rows for {batch} examples.")
    combined = hidden
    for name, mask in rows.items():
        mask = mask.to(hidden.device).repeat_interleave(hidden.shape[0] // batch)
        combined = torch.where(mask.view(-1, *[1] * (hidden.dim() - 1)), pick(results[name]), combined)
    return (combined, *first[1:]) if isinstance(first, tuple) else combined


class MixedModulesToSave:
    """Forward hook of PEFT's ``ModulesToSaveWrapper`` (registered once, permanently, by `SmearModel`): inside a
    call with ``adapter_names``, each example's rows come from its adapter's copy (the original module for
    ``"__base__"`` and for adapters without a copy); any other call is left alone."""

    def __init__(self, frames) -> None:
        self.frames = frames

    def __call__(self, module: ModulesToSaveWrapper, args: tuple, kwargs: dict, output: Any) -> Any:
        frame = self.frames.current()
        rows = frame.adapter_rows(args[0].shape[0] if frame.batch_size is None else frame.batch_size) if frame else None
        if rows is None:
            return None
        copies = module.modules_to_save
        results = {
            name: (copies[name] if name in copies else module.original_module)(*args, **kwargs) for name in rows
        }
        return select_rows(results, rows)

    def attach(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper) and not getattr(module, "_smear_mixed_batch", False):
                module.register_forward_hook(self, with_kwargs=True)
                module._smear_mixed_batch = True


def active_for(name: str, adapters: Iterable[str]) -> list[str]:
    """The adapters a layer runs for the examples named ``name``: that adapter if the layer has it, else none."""
    return [name] if name != BASE and name in adapters else []


