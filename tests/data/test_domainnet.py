"""Tests of the DomainNet loader on a tiny dataset generated in the official layout."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from smear_peft.data.domainnet import (
    DOMAINNET_DOMAINS,
    DOMAINNET_NUM_LABELS,
    domainnet_eval_transform,
    domainnet_splits_from_hf,
    domainnet_train_transform,
    load_domainnet,
    split_like_authors,
)
from smear_peft.data.routed_images import collate_routed_images

# Different train-list lengths per domain, so that the shared random generator matters.
TRAIN_SIZES = {"clipart": 11, "infograph": 7, "painting": 5, "quickdraw": 9, "real": 13, "sketch": 6}
TEST_SIZE = 3
CLASSES = {"aircraft_carrier": 0, "zigzag": 344}
SMALL_IMAGE_SIZE = 32


def _write_domainnet(root: Path, list_folder: str = ".") -> None:
    """Write a tiny DomainNet: images ``<root>/<domain>/<class>/<domain>_<i>.<ext>`` and official list files."""
    class_names = list(CLASSES)
    (root / list_folder).mkdir(parents=True, exist_ok=True)
    for domain_index, domain in enumerate(DOMAINNET_DOMAINS):
        for split, size in (("train", TRAIN_SIZES[domain]), ("test", TEST_SIZE)):
            lines = []
            for example_index in range(size):
                class_name = class_names[example_index % 2]
                extension = "png" if domain == "quickdraw" else "jpg"
                relative_path = f"{domain}/{class_name}/{domain}_{split}_{example_index:03d}.{extension}"
                image_path = root / relative_path
                image_path.parent.mkdir(parents=True, exist_ok=True)
                colour = (40 * domain_index, 7 * example_index, 200 if split == "test" else 0)
                mode = "L" if domain == "sketch" else "RGB"  # grey images must come out as 3 channels too
                Image.new("RGB", (24 + example_index, 18), colour).convert(mode).save(image_path)
                lines.append(f"{relative_path} {CLASSES[class_name]}\n")
            (root / list_folder / f"{domain}_{split}.txt").write_text("".join(lines))


@pytest.fixture(scope="module")
def domainnet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("domainnet")
    _write_domainnet(root)
    return root


def _authors_split(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """The snippet of the authors' cvl/README.md, run on the generated list files."""
    saved_state = random.getstate()
    random.seed(42)
    folds = {}
    for domain in DOMAINNET_DOMAINS:
        with open(root / f"{domain}_train.txt") as list_file:
            domain_data = list_file.readlines()
            random.shuffle(domain_data)
            valid_data = domain_data[0 : int(len(domain_data) * 0.2)]
            train_data = domain_data[int(len(domain_data) * 0.2) :]
        folds[domain] = ([line.split()[0] for line in train_data], [line.split()[0] for line in valid_data])
    random.setstate(saved_state)
    return folds


def _paths(dataset, domain_index: int) -> list[str]:
    return [record.relative_path for record in dataset.records if record.domain_index == domain_index]


def test_split_sizes_per_domain(domainnet_root: Path) -> None:
    splits = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE)
    for domain_index, domain in enumerate(DOMAINNET_DOMAINS):
        num_validation = int(TRAIN_SIZES[domain] * 0.2)
        assert len(_paths(splits.validation, domain_index)) == num_validation
        assert len(_paths(splits.train, domain_index)) == TRAIN_SIZES[domain] - num_validation
        assert len(_paths(splits.test, domain_index)) == TEST_SIZE
    assert len(splits.train) + len(splits.validation) == sum(TRAIN_SIZES.values())
    assert splits.domain_names == DOMAINNET_DOMAINS
    assert splits.num_labels == DOMAINNET_NUM_LABELS == 345


def test_split_reproduces_authors_fold_files(domainnet_root: Path) -> None:
    splits = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE)
    for domain_index, (domain, (train_paths, validation_paths)) in enumerate(_authors_split(domainnet_root).items()):
        assert _paths(splits.train, domain_index) == train_paths, domain
        assert _paths(splits.validation, domain_index) == validation_paths, domain


def test_validation_is_the_first_fifth_of_the_shuffled_list() -> None:
    examples = [list(range(10)), list(range(100, 107))]
    (train_a, validation_a), (train_b, validation_b) = split_like_authors(examples, seed=42, validation_fraction=0.2)
    generator = random.Random(42)
    shuffled_a, shuffled_b = examples[0][:], examples[1][:]
    generator.shuffle(shuffled_a)
    generator.shuffle(shuffled_b)
    assert (validation_a, train_a) == (shuffled_a[:2], shuffled_a[2:])
    assert (validation_b, train_b) == (shuffled_b[:1], shuffled_b[1:])


def test_split_is_deterministic_and_depends_on_seed(domainnet_root: Path) -> None:
    first = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE)
    second = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE)
    other_seed = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE, seed=0)
    assert first.train.records == second.train.records
    assert first.validation.records == second.validation.records
    assert first.train.records != other_seed.train.records
    assert sorted(r.relative_path for r in first.train.records + first.validation.records) == sorted(
        r.relative_path for r in other_seed.train.records + other_seed.validation.records
    )


def test_domain_subset_keeps_tags_and_splits(domainnet_root: Path) -> None:
    full = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE)
    sketch_only = load_domainnet(domainnet_root, domains=["sketch"], image_size=SMALL_IMAGE_SIZE)
    sketch_tag = DOMAINNET_DOMAINS.index("sketch")
    assert {record.domain_index for record in sketch_only.train.records} == {sketch_tag}
    assert _paths(sketch_only.train, sketch_tag) == _paths(full.train, sketch_tag)
    assert _paths(sketch_only.validation, sketch_tag) == _paths(full.validation, sketch_tag)
    with pytest.raises(ValueError, match="choose from"):
        load_domainnet(domainnet_root, domains=["photo"])


def test_items_have_labels_and_domain_tags(domainnet_root: Path) -> None:
    splits = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE)
    for index in range(len(splits.test)):
        record = splits.test.records[index]
        item = splits.test[index]
        assert item["routing_tags"] == DOMAINNET_DOMAINS.index(record.relative_path.split("/")[0])
        assert item["labels"] == CLASSES[record.relative_path.split("/")[1]]
        assert item["pixel_values"].shape == (3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)
    assert {record.domain_index for record in splits.test.records} == set(range(6))
    assert {record.label for record in splits.train.records} == {0, 344}


def test_collate_batches_tensors(domainnet_root: Path) -> None:
    splits = load_domainnet(domainnet_root, image_size=SMALL_IMAGE_SIZE)
    batch = next(iter(DataLoader(splits.test, batch_size=5, collate_fn=collate_routed_images)))
    assert batch["pixel_values"].shape == (5, 3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == batch["routing_tags"].dtype == torch.long
    assert batch["routing_tags"].tolist() == [r.domain_index for r in splits.test.records[:5]]


def test_transforms_shapes_and_randomness(domainnet_root: Path) -> None:
    constant_image = Image.open(domainnet_root / "clipart" / "zigzag" / "clipart_train_001.jpg").convert("RGB")
    gradient_image = Image.linear_gradient("L").convert("RGB").resize((64, 48))
    eval_transform = domainnet_eval_transform()
    train_transform = domainnet_train_transform()

    evaluated = eval_transform(gradient_image)
    assert evaluated.shape == (3, 224, 224)
    assert torch.equal(evaluated, eval_transform(gradient_image))

    torch.manual_seed(0)
    first_crop = train_transform(gradient_image)
    torch.manual_seed(1)
    second_crop = train_transform(gradient_image)
    assert first_crop.shape == second_crop.shape == (3, 224, 224)
    assert not torch.equal(first_crop, second_crop)

    # A constant image comes out as its colour normalised with the ImageNet mean/std.
    red, green, blue = (value / 255 for value in constant_image.getpixel((0, 0)))
    expected = torch.tensor([(red - 0.485) / 0.229, (green - 0.456) / 0.224, (blue - 0.406) / 0.225])
    assert torch.allclose(eval_transform(constant_image)[:, 112, 112], expected, atol=1e-5)
    assert domainnet_eval_transform(image_size=96)(constant_image).shape == (3, 96, 96)


def test_list_files_in_splits_folder(tmp_path: Path) -> None:
    _write_domainnet(tmp_path, list_folder="splits")
    splits = load_domainnet(tmp_path, image_size=SMALL_IMAGE_SIZE)
    assert len(splits.test) == TEST_SIZE * len(DOMAINNET_DOMAINS)
    assert splits.test[0]["pixel_values"].shape == (3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)


def test_clear_errors_on_bad_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"clipart_train\.txt.*<domain>/<class>/<image>\.jpg"):
        load_domainnet(tmp_path)
    _write_domainnet(tmp_path)
    (tmp_path / "painting_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"painting_test\.txt"):
        load_domainnet(tmp_path)
    _write_domainnet(tmp_path)
    (tmp_path / "real_train.txt").write_text("real/zigzag/real_train_000.jpg\n")
    with pytest.raises(ValueError, match="Malformed line"):
        load_domainnet(tmp_path)
    _write_domainnet(tmp_path)
    (tmp_path / "clipart" / "zigzag" / "clipart_test_001.jpg").unlink()
    splits = load_domainnet(tmp_path, image_size=SMALL_IMAGE_SIZE)
    with pytest.raises(FileNotFoundError, match=r"clipart_test_001\.jpg"):
        splits.test[1]


def test_splits_from_hf_dataset() -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Value("int64"),
            "domain": datasets.ClassLabel(names=list(DOMAINNET_DOMAINS)),
        }
    )

    def split(num_per_domain: int) -> datasets.Dataset:
        rows = [(domain_index, i) for i in range(num_per_domain) for domain_index in range(6)]
        return datasets.Dataset.from_dict(
            {
                "image": [Image.new("L", (20, 16), 10 * i) for _, i in rows],
                "label": [i % 3 for _, i in rows],
                "domain": [domain_index for domain_index, _ in rows],
            },
            features=features,
        )

    dataset = datasets.DatasetDict({"train": split(10), "test": split(2)})
    splits = domainnet_splits_from_hf(dataset, image_size=SMALL_IMAGE_SIZE)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (48, 12, 12)
    rows_per_domain = [[row for row in range(60) if row % 6 == tag] for tag in range(6)]
    expected_validation_rows = [row for _, validation in split_like_authors(rows_per_domain) for row in validation]
    for position, row in enumerate(expected_validation_rows):
        item = splits.validation[position]
        assert item["routing_tags"] == row % 6
        assert item["labels"] == (row // 6) % 3
        assert item["pixel_values"].shape == (3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)
    batch = collate_routed_images([splits.train[0], splits.train[1]])
    assert batch["pixel_values"].shape == (2, 3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE)
    unpickled = pickle.loads(pickle.dumps(splits.validation))  # DataLoader workers may need to pickle it
    assert torch.equal(unpickled[0]["pixel_values"], splits.validation[0]["pixel_values"])
    painting_only = domainnet_splits_from_hf(dataset, domains=["painting"], image_size=SMALL_IMAGE_SIZE)
    assert len(painting_only.test) == 2 and painting_only.test[0]["routing_tags"] == 2
