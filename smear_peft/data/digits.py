"""An offline multi-domain image dataset built from scikit-learn's bundled handwritten digits.

It stands in for DomainNet where nothing can be downloaded: the 1797 real 8x8 digit images of
:func:`sklearn.datasets.load_digits` (shipped with scikit-learn) are rendered in six domains that share
the ten labels. The domain order defines the routing tags (``routing_tags == i`` means ``DIGIT_DOMAINS[i]``)::

    0 original   the digit as scanned
    1 inverted   1 - intensity (white background, dark strokes)
    2 rotated    rotated by 90 degrees counter-clockwise
    3 noisy      additive Gaussian noise (std NOISE_STD), clipped to [0, 1]
    4 blurred    Gaussian blur (sigma BLUR_SIGMA_PIXELS at 32x32, scaled with the image size)
    5 sketch     outline only: morphological gradient (3x3 dilation minus 3x3 erosion)

Construction, deterministic given ``seed``:

1. The 1797 digits are partitioned into six disjoint, label-stratified groups with
   ``StratifiedKFold(n_splits=6, shuffle=True, random_state=seed)``; group ``i`` is rendered only in
   domain ``i``, so no underlying digit appears in two domains or two splits.
2. Each group is split, stratified by label, into test (``test_fraction``), validation
   (``validation_fraction``) and train (the rest). With the defaults that is about 180/60/60 digits per domain.
3. Each 8x8 image (intensities 0..16, scaled to [0, 1]) is upsampled bilinearly to ``image_size``, the
   domain shift is applied at that resolution, and the result is normalised to ``(x - 0.5) / 0.5``
   (so [0, 1] maps to [-1, 1]) and replicated to ``num_channels`` channels.

:func:`load_digit_pretraining_splits` gives the ``original`` rendering of the same partition's digits,
pooled over all domains, as the "ImageNet" on which a small backbone is pretrained before adapting it
to the six domains. Its test split holds only test digits, so pretraining never sees a test digit.

Everything is plain torch (no torchvision) and builds in well under a second.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch.utils.data import Dataset

from smear_peft.data.routed_images import RoutedImageSplits

DIGIT_DOMAINS: tuple[str, ...] = ("original", "inverted", "rotated", "noisy", "blurred", "sketch")
"""The six digit domains; a domain's position is its routing tag."""

DIGITS_NUM_LABELS = 10
DIGITS_SOURCE_SIZE = 8
"""Side of the scikit-learn digit images."""

PIXEL_MEAN = 0.5
PIXEL_STD = 0.5
NOISE_STD = 0.35
"""Standard deviation of the ``noisy`` domain's additive Gaussian noise, on the [0, 1] intensity scale."""
BLUR_SIGMA_PIXELS = 3.0
"""Gaussian blur sigma of the ``blurred`` domain for 32x32 images; scaled proportionally for other sizes."""

SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")


class RoutedImageTensorDataset(Dataset):
    """In-memory routed images; items are ``{"pixel_values", "labels", "routing_tags"}``.

    Attributes:
        pixel_values: ``(N, C, H, W)`` float tensor, normalised.
        labels: ``(N,)`` int64 class indices.
        routing_tags: ``(N,)`` int64 domain indices.
        digit_indices: ``(N,)`` int64 index of each example's source image in ``sklearn.datasets.load_digits()``.
    """

    def __init__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, routing_tags: torch.Tensor, digit_indices: torch.Tensor
    ):
        if not len(pixel_values) == len(labels) == len(routing_tags) == len(digit_indices):
            raise ValueError("pixel_values, labels, routing_tags and digit_indices must have the same length.")
        self.pixel_values = pixel_values
        self.labels = labels
        self.routing_tags = routing_tags
        self.digit_indices = digit_indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "pixel_values": self.pixel_values[index],
            "labels": int(self.labels[index]),
            "routing_tags": int(self.routing_tags[index]),
        }


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` images with reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def _morphological_gradient(images: torch.Tensor) -> torch.Tensor:
    """3x3 dilation minus 3x3 erosion of ``(N, 1, H, W)`` images: the outline of the strokes."""
    dilated = F.max_pool2d(images, kernel_size=3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, kernel_size=3, stride=1, padding=1)
    return dilated - eroded


def render_digit_domain(images: torch.Tensor, domain: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply a domain's shift to images with intensities in [0, 1].

    Args:
        images: ``(N, 1, H, W)`` float tensor in [0, 1], already at the target resolution.
        domain: One of :data:`DIGIT_DOMAINS`.
        generator: Random generator for the ``noisy`` domain (the other domains are deterministic).

    Returns:
        ``(N, 1, H, W)`` float tensor in [0, 1].
    """
    if domain == "original":
        return images.clone()
    if domain == "inverted":
        return 1.0 - images
    if domain == "rotated":
        return torch.rot90(images, k=1, dims=(-2, -1))
    if domain == "noisy":
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        return (images + NOISE_STD * noise).clamp(0.0, 1.0)
    if domain == "blurred":
        return _gaussian_blur(images, sigma=BLUR_SIGMA_PIXELS * images.shape[-1] / 32)
    if domain == "sketch":
        return _morphological_gradient(images)
    raise ValueError(f"Unknown digit domain {domain!r}; choose from {DIGIT_DOMAINS}.")


def upsample_digits(images_8x8: torch.Tensor, image_size: int) -> torch.Tensor:
    """Scale ``(N, 8, 8)`` digit intensities 0..16 to [0, 1] and upsample bilinearly to ``(N, 1, size, size)``."""
    images = images_8x8.to(torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def _normalise(images: torch.Tensor, num_channels: int) -> torch.Tensor:
    return ((images - PIXEL_MEAN) / PIXEL_STD).repeat(1, num_channels, 1, 1)


def partition_digits(
    labels: torch.Tensor, seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, list[torch.Tensor]]:
    """Assign every digit to exactly one (domain, split) cell, stratified by label.

    Args:
        labels: ``(N,)`` labels of all digits.
        seed: Seed of the partition.
        validation_fraction: Fraction of each domain's digits used for validation.
        test_fraction: Fraction of each domain's digits used for test.

    Returns:
        ``{split_name: [indices of domain 0, ..., indices of domain 5]}`` with sorted int64 index tensors.
    """
    if validation_fraction <= 0 or test_fraction <= 0 or validation_fraction + test_fraction >= 1:
        raise ValueError(
            "Need validation_fraction > 0, test_fraction > 0 and their sum < 1; "
            f"got {validation_fraction} and {test_fraction}."
        )
    labels_array = labels.numpy()
    folds = StratifiedKFold(n_splits=len(DIGIT_DOMAINS), shuffle=True, random_state=seed)
    cells: dict[str, list[torch.Tensor]] = {split: [] for split in SPLIT_NAMES}
    for _, domain_indices in folds.split(labels_array, labels_array):
        train_validation, test = train_test_split(
            domain_indices, test_size=test_fraction, stratify=labels_array[domain_indices], random_state=seed
        )
        train, validation = train_test_split(
            train_validation,
            test_size=validation_fraction / (1 - test_fraction),
            stratify=labels_array[train_validation],
            random_state=seed,
        )
        for split, indices in zip(SPLIT_NAMES, (train, validation, test), strict=True):
            cells[split].append(torch.as_tensor(indices, dtype=torch.long).sort().values)
    return cells


def _load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    return torch.as_tensor(bunch.images), torch.as_tensor(bunch.target, dtype=torch.long)


def load_digit_domains(
    image_size: int = 32,
    num_channels: int = 3,
    seed: int = 0,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> RoutedImageSplits:
    """Build the six-domain digit dataset (see the module docstring for the construction).

    Args:
        image_size: Side of the square output images (bilinear upsampling from 8x8).
        num_channels: Number of identical channels per image (3 for an ImageNet-style ResNet stem).
        seed: Seed of the domain partition, the splits and the ``noisy`` domain's noise.
        validation_fraction: Fraction of each domain's digits held out for validation.
        test_fraction: Fraction of each domain's digits held out for test.

    Returns:
        Splits of :class:`RoutedImageTensorDataset`; ``domain_names`` is :data:`DIGIT_DOMAINS` and
        ``num_labels`` 10. Within a split, examples are ordered by domain.
    """
    images_8x8, labels = _load_sklearn_digits()
    cells = partition_digits(labels, seed, validation_fraction, test_fraction)
    noise_generator = torch.Generator().manual_seed(seed)
    split_datasets = {}
    for split in SPLIT_NAMES:
        pixel_values, routing_tags = [], []
        for domain_index, (domain, indices) in enumerate(zip(DIGIT_DOMAINS, cells[split], strict=True)):
            rendered = render_digit_domain(upsample_digits(images_8x8[indices], image_size), domain, noise_generator)
            pixel_values.append(_normalise(rendered, num_channels))
            routing_tags.append(torch.full((len(indices),), domain_index, dtype=torch.long))
        digit_indices = torch.cat(cells[split])
        split_datasets[split] = RoutedImageTensorDataset(
            torch.cat(pixel_values), labels[digit_indices], torch.cat(routing_tags), digit_indices
        )
    return RoutedImageSplits(
        train=split_datasets["train"],
        validation=split_datasets["validation"],
        test=split_datasets["test"],
        domain_names=DIGIT_DOMAINS,
        num_labels=DIGITS_NUM_LABELS,
    )


def load_digit_pretraining_splits(
    image_size: int = 32,
    num_channels: int = 3,
    seed: int = 0,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> RoutedImageSplits:
    """The ``original`` rendering of all digits, for pretraining a backbone before domain adaptation.

    Uses the same partition as :func:`load_digit_domains` with the same arguments: each split pools the
    digits of that split of all six domains (about 1080/360/360 with the defaults), rendered unshifted.
    Pretraining on ``train`` therefore never sees a digit of any domain's validation or test split.

    Returns:
        Splits whose ``domain_names`` is ``("original",)``; every routing tag is 0.
    """
    images_8x8, labels = _load_sklearn_digits()
    cells = partition_digits(labels, seed, validation_fraction, test_fraction)
    split_datasets = {}
    for split in SPLIT_NAMES:
        digit_indices = torch.cat(cells[split]).sort().values
        pixel_values = _normalise(upsample_digits(images_8x8[digit_indices], image_size), num_channels)
        routing_tags = torch.zeros(len(digit_indices), dtype=torch.long)
        split_datasets[split] = RoutedImageTensorDataset(
            pixel_values, labels[digit_indices], routing_tags, digit_indices
        )
    return RoutedImageSplits(
        train=split_datasets["train"],
        validation=split_datasets["validation"],
        test=split_datasets["test"],
        domain_names=DIGIT_DOMAINS[:1],
        num_labels=DIGITS_NUM_LABELS,
    )
