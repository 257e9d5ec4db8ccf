"""The authors' per-method settings (r-three/smear README commands and configs), in one table.

The example scripts (``examples/glue.py``, ``examples/domainnet.py``) and the benchmarks read their defaults from
here, so a value changes in one place only. Only what differs between routing methods is listed; everything the
methods share is a `SmearConfig` default or a script default.
"""

from __future__ import annotations

from .routing import ROUTING_METHODS

# The README runs SMEAR and top-k with `expert_dropout=0.1` (T5 and ResNet alike); every other method without it.
AUTHORS_METHOD_DEFAULTS: dict[str, dict] = {
    "smear": {"expert_dropout": 0.1},
    "top_k": {"expert_dropout": 0.1},
    "st_gumbel": {"expert_dropout": 0.0},
    "reinforce": {"expert_dropout": 0.0},
    "tag": {"expert_dropout": 0.0},
    "hash": {"expert_dropout": 0.0},
    "monolithic": {"expert_dropout": 0.0},
    "ensemble": {"expert_dropout": 0.0},
}


def authors_default(routing: str, key: str):
    """The authors' value of ``key`` for routing method ``routing``."""
    if routing not in AUTHORS_METHOD_DEFAULTS:
        raise ValueError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTING_METHODS)}")
    return AUTHORS_METHOD_DEFAULTS[routing][key]


def authors_expert_dropout(routing: str) -> float:
    """Expert dropout of the authors' README command for ``routing`` (0.1 for smear and top_k, else 0)."""
    return authors_default(routing, "expert_dropout")
