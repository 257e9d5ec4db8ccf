"""Re-parametrise PEFT's own test classes with SMEAR cases (the test bodies stay PEFT's, imported from its sdist).

PEFT's test classes (``TestPeftCustomModel``, ``TestEncoderDecoderModels``, ``TestDecoderModels``) parametrise every
shared test with their own matrix of PEFT methods. `adopt` subclasses such a class, keeps each test whose
parametrisation names the config matrix, and swaps that matrix for ours; every other test of the class (tests of one
specific PEFT method, or of a Hub checkpoint) is disabled and listed in `DROPPED`, so nothing disappears silently.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Optional

import pytest
import torch

#: ``{class name: [test names not run, because they are not parametrised by the PEFT-method matrix]}``
DROPPED: dict[str, list[str]] = {}

#: Per-routing extra inputs: tag and hash routing need per-example tags / keys on every call (routing_inputs).
ROUTING_INPUTS = {"tag": {"routing_tags": [1]}, "hash": {"routing_keys": [5]}}


def routing_inputs(config_kwargs: Optional[dict]) -> dict:
    return dict(ROUTING_INPUTS.get((config_kwargs or {}).get("routing", "smear"), {}))


def _wrap(fn: Callable, marks: list, original: Optional[Callable] = None) -> Callable:
    @functools.wraps(original or fn)
    def test(self, *args: Any, **kwargs: Any):
        self.routing_inputs = routing_inputs(kwargs.get("config_kwargs"))
        if "config_kwargs" in kwargs:  # some PEFT tests edit it in place; keep the shared matrix intact
            kwargs["config_kwargs"] = copy.deepcopy(kwargs["config_kwargs"])
        return fn(self, *args, **kwargs)

    test.pytestmark = marks
    return test


def adopt(
    cls: type, base: type, matrices: dict[str, Optional[list]], required: list[str], transform: Optional[Callable] = None
) -> type:
    """Give ``cls`` (a subclass of ``base``) every ``test_*`` of ``base`` parametrised by one of ``required`` (argnames
    of PEFT's method matrices, e.g. ``"test_name, model_id, config_cls, config_kwargs"``, tried in order), with each
    parametrisation named in ``matrices`` replaced by ours (``None``: drop tests parametrised by it). Other tests of
    ``base`` are disabled and listed in `DROPPED`. ``transform(fn)`` may wrap each test (e.g. to fill in arguments)."""
    required = [_argnames(r) for r in required]
    matrices = {_argnames(k): v for k, v in matrices.items()}
    dropped = DROPPED.setdefault(cls.__name__, [])
    for name in sorted(dir(base)):
        if not name.startswith("test_") or name in cls.__dict__:
            continue
        fn = getattr(base, name)
        params = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        names = {_argnames(m.args[0]) for m in params}
        usable = any(r in names for r in required) and all(matrices.get(n, ()) is not None for n in names)
        if not usable:
            setattr(cls, name, None)  # not collected
            dropped.append(name)
            continue
        keep = []
        for mark in getattr(fn, "pytestmark", []):
            argnames = _argnames(mark.args[0]) if mark.name == "parametrize" else None
            keep.append(pytest.mark.parametrize(mark.args[0], matrices[argnames]) if argnames in matrices else mark)
        setattr(cls, name, _wrap(transform(fn) if transform else fn, keep, fn))
    return cls


def _argnames(argnames) -> str:
    names = argnames if isinstance(argnames, (list, tuple)) else argnames.split(",")
    return ",".join(n.strip() for n in names)


def with_routing_inputs(inputs: dict, routing_inputs: dict) -> dict:
    """The test's inputs plus one routing tag / key per example (smear-peft requires exactly one per example)."""
    batch = next(v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {**inputs, **{name: [values[0]] * batch for name, values in routing_inputs.items()}}


class RoutingInputsModel:
    """Mixin for base models: accept (and ignore) ``routing_tags`` / ``routing_keys``, which SMEAR's forward hook
    consumes when the model is wrapped, so the tests' calls of the bare base model take the same inputs."""

    def forward(self, *args: Any, routing_tags: Any = None, routing_keys: Any = None, **kwargs: Any):
        return super().forward(*args, **kwargs)


_ACCEPTING: dict[type, type] = {}


def accept_routing_inputs(model):
    """``model``, its class swapped for a subclass with `RoutingInputsModel`'s ``forward``."""
    base = type(model)
    if base not in _ACCEPTING:
        _ACCEPTING[base] = type(base.__name__, (RoutingInputsModel, base), {"__module__": base.__module__})
    model.__class__ = _ACCEPTING[base]
    return model


class WithRoutingInputs:
    """Mixin for the adopted test classes: PEFT's test inputs plus the case's routing tags / keys (`ROUTING_INPUTS`;
    `_wrap` sets ``routing_inputs`` for each test)."""

    routing_inputs: dict = {}

    def prepare_inputs_for_testing(self):
        return with_routing_inputs(super().prepare_inputs_for_testing(), self.routing_inputs)
