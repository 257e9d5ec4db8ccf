"""Shared structure of the multi-domain image datasets (DomainNet and the embedded digit domains).

Every example of these datasets is a mapping with three entries:

- ``pixel_values``: a float tensor of shape ``(channels, height, width)``, already normalised;
- ``labels``: the class index, an ``int``;
- ``routing_tags``: the index of the example's domain in the dataset's ``domain_names``, an ``int``.
  It is what tag routing ("Tag" in the SMEAR paper) routes on, and what per-domain metrics group by.

:func:`collate_routed_images` turns a list of such examples into a batch of tensors, and
:class:`RoutedImageSplits` bundles the train/validation/test datasets with the metadata a training
script needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

ROUTED_IMAGE_KEYS: tuple[str, str, str] = ("pixel_values", "labels", "routing_tags")
"""The keys of every example and of every batch produced by :func:`collate_routed_images`."""


@dataclass(frozen=True)
class RoutedImageSplits:
    """The three splits of a multi-domain image classification dataset.

    Attributes:
        train: Training examples.
        validation: Validation examples (model selection).
        test: Held-out test examples.
        domain_names: Domain names; ``routing_tags == i`` means the example belongs to ``domain_names[i]``.
        num_labels: Number of classes; labels are in ``range(num_labels)``.
    """

    train: Dataset
    validation: Dataset
    test: Dataset
    domain_names: tuple[str, ...]
    num_labels: int


def collate_routed_images(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack routed image examples into a batch.

    Args:
        examples: Examples with the keys ``pixel_values`` (a ``(C, H, W)`` tensor), ``labels`` and
            ``routing_tags`` (ints or 0-d integer tensors).

    Returns:
        ``{"pixel_values": (B, C, H, W) float tensor, "labels": (B,) int64, "routing_tags": (B,) int64}``.
    """
    if not examples:
        raise ValueError("collate_routed_images got an empty list of examples; use a DataLoader with batch_size >= 1.")
    missing = [key for key in ROUTED_IMAGE_KEYS if key not in examples[0]]
    if missing:
        raise KeyError(
            f"Examples lack the keys {missing}; collate_routed_images expects every example to have "
            f"{list(ROUTED_IMAGE_KEYS)} (as produced by smear_peft.data.domainnet and smear_peft.data.digits)."
        )
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.as_tensor([int(example["labels"]) for example in examples], dtype=torch.long),
        "routing_tags": torch.as_tensor([int(example["routing_tags"]) for example in examples], dtype=torch.long),
    }
