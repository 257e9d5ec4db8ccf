"""Tests of the embedded multi-domain digits dataset."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from smear_peft.data.digits import (
    DIGIT_DOMAINS,
    load_digit_domains,
    load_digit_pretraining_splits,
    render_digit_domain,
    upsample_digits,
)
from smear_peft.data.routed_images import RoutedImageSplits, collate_routed_images

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def digit_splits() -> RoutedImageSplits:
    return load_digit_domains()


def _splits(splits: RoutedImageSplits) -> dict:
    return {"train": splits.train, "validation": splits.validation, "test": splits.test}


def _normalised_original(digit_indices: torch.Tensor, image_size: int = 32) -> torch.Tensor:
    """The ``original`` rendering of the given sklearn digits, normalised, single channel."""
    images = torch.as_tensor(load_digits().images)[digit_indices]
    return (upsample_digits(images, image_size) - 0.5) / 0.5


def test_shapes_dtypes_and_metadata(digit_splits: RoutedImageSplits) -> None:
    expected_domains = ("original", "inverted", "rotated", "noisy", "blurred", "sketch")
    assert digit_splits.domain_names == DIGIT_DOMAINS == expected_domains
    assert digit_splits.num_labels == 10
    for dataset in _splits(digit_splits).values():
        assert dataset.pixel_values.shape[1:] == (3, 32, 32)
        assert dataset.pixel_values.dtype == torch.float32
        assert dataset.pixel_values.min() >= -1.0 and dataset.pixel_values.max() <= 1.0
        assert torch.equal(dataset.pixel_values[:, 0], dataset.pixel_values[:, 2])
    item = digit_splits.train[0]
    assert set(item) == {"pixel_values", "labels", "routing_tags"}
    assert isinstance(item["labels"], int) and isinstance(item["routing_tags"], int)
    small = load_digit_domains(image_size=16, num_channels=1)
    assert small.test.pixel_values.shape[1:] == (1, 16, 16)


def test_split_sizes_and_disjoint_digits(digit_splits: RoutedImageSplits) -> None:
    all_digits = torch.cat([dataset.digit_indices for dataset in _splits(digit_splits).values()])
    assert len(all_digits) == NUM_DIGITS
    assert torch.equal(all_digits.sort().values, torch.arange(NUM_DIGITS))  # every digit exactly once
    for domain_index in range(len(DIGIT_DOMAINS)):
        sizes = {name: int((d.routing_tags == domain_index).sum()) for name, d in _splits(digit_splits).items()}
        domain_size = sum(sizes.values())
        assert NUM_DIGITS // 6 <= domain_size <= NUM_DIGITS // 6 + 1
        assert abs(sizes["test"] - 0.2 * domain_size) <= 1
        assert abs(sizes["validation"] - 0.2 * domain_size) <= 1


def test_labels_and_routing_tags(digit_splits: RoutedImageSplits) -> None:
    sklearn_labels = torch.as_tensor(load_digits().target)
    for dataset in _splits(digit_splits).values():
        assert torch.equal(dataset.labels, sklearn_labels[dataset.digit_indices])
        assert set(dataset.labels.tolist()) == set(range(10))
        assert set(dataset.routing_tags.tolist()) == set(range(6))
    for domain_index in range(6):
        domain_train_labels = digit_splits.train.labels[digit_splits.train.routing_tags == domain_index]
        assert torch.bincount(domain_train_labels, minlength=10).min() >= 15  # stratified: every class present


def test_deterministic_given_seed(digit_splits: RoutedImageSplits) -> None:
    rebuilt = load_digit_domains()
    for name, dataset in _splits(digit_splits).items():
        other = getattr(rebuilt, name)
        assert torch.equal(dataset.pixel_values, other.pixel_values)  # includes the noisy domain's noise
        assert torch.equal(dataset.digit_indices, other.digit_indices)
    reseeded = load_digit_domains(seed=1)
    assert not torch.equal(reseeded.train.digit_indices, digit_splits.train.digit_indices)


def test_domains_are_transforms_of_the_original(digit_splits: RoutedImageSplits) -> None:
    test_set = digit_splits.test
    for domain in ("inverted", "rotated", "sketch"):
        mask = test_set.routing_tags == DIGIT_DOMAINS.index(domain)
        original = _normalised_original(test_set.digit_indices[mask])
        rendered = test_set.pixel_values[mask][:, :1]
        if domain == "inverted":
            assert torch.allclose(rendered, -original, atol=1e-6)
        elif domain == "rotated":
            assert torch.allclose(rendered, torch.rot90(original, k=1, dims=(-2, -1)), atol=1e-6)
        else:
            assert not torch.allclose(rendered, original, atol=0.1)
            assert rendered.mean() < original.mean()  # outlines cover fewer pixels than filled strokes


def test_domains_differ_in_pixel_statistics(digit_splits: RoutedImageSplits) -> None:
    pixels = digit_splits.train.pixel_values[:, 0]
    tags = digit_splits.train.routing_tags
    mean_image = {domain: pixels[tags == index].mean(0) for index, domain in enumerate(DIGIT_DOMAINS)}
    for first in DIGIT_DOMAINS:
        for second in DIGIT_DOMAINS:
            if first < second:
                assert (mean_image[first] - mean_image[second]).abs().mean() > 0.02, (first, second)
    for domain in ("noisy", "blurred"):
        mask = tags == DIGIT_DOMAINS.index(domain)
        original = _normalised_original(digit_splits.train.digit_indices[mask])[:, 0]
        assert (pixels[mask] - original).abs().mean() > 0.1, domain  # same digits, visibly altered


def test_render_rejects_unknown_domain() -> None:
    with pytest.raises(ValueError, match="choose from"):
        render_digit_domain(torch.zeros(1, 1, 8, 8), "photo")


def test_pretraining_splits_use_original_rendering_without_test_digits(digit_splits: RoutedImageSplits) -> None:
    pretraining = load_digit_pretraining_splits()
    assert pretraining.domain_names == ("original",)
    for name, dataset in _splits(pretraining).items():
        task_dataset = getattr(digit_splits, name)
        assert torch.equal(dataset.digit_indices, task_dataset.digit_indices.sort().values)
        assert torch.equal(dataset.routing_tags, torch.zeros(len(dataset), dtype=torch.long))
        assert torch.allclose(dataset.pixel_values[:, :1], _normalised_original(dataset.digit_indices), atol=1e-6)
    assert not set(pretraining.train.digit_indices.tolist()) & set(digit_splits.test.digit_indices.tolist())


def test_collate_with_dataloader(digit_splits: RoutedImageSplits) -> None:
    loader = DataLoader(digit_splits.train, batch_size=8, shuffle=False, collate_fn=collate_routed_images)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert torch.equal(batch["labels"], digit_splits.train.labels[:8])
    assert torch.equal(batch["routing_tags"], digit_splits.train.routing_tags[:8])
