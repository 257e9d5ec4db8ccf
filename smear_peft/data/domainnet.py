"""DomainNet for the SMEAR ResNet-18 experiments (Muqeeth, Liu, Raffel 2023, §5 / Table 2).

DomainNet (Peng et al., 2019; http://ai.bu.edu/M3SDA/) has 345 classes in six domains. The domain
order below is the order of the authors' ``domain_index_dict`` in ``cvl/src/data/DatasetReader.py``
and therefore defines the routing tags: ``routing_tags == i`` means ``DOMAINNET_DOMAINS[i]``::

    0 clipart, 1 infograph, 2 painting, 3 quickdraw, 4 real, 5 sketch

Splits, as in the authors' ``cvl/README.md``:

- For each domain, in the order above, the official ``<domain>_train.txt`` is shuffled with ONE
  ``random.Random(42)`` shared by all domains (the authors call ``random.seed(42)`` once before the
  loop and then ``random.shuffle`` per domain, so a domain's split depends on the lengths of the train
  lists of the domains before it). The **first** ``int(0.2 * n)`` shuffled lines are the validation
  set and the remaining lines the training set.
- The official ``<domain>_test.txt`` is the test set.
- All selected domains are pooled into one dataset per split.

Two sources are supported:

- :func:`load_domainnet`: the official download, laid out as ``<root>/<domain>/<class>/<image>.jpg``
  with the list files ``<domain>_train.txt`` / ``<domain>_test.txt`` in ``<root>``, ``<root>/splits``
  or ``<root>/txt``. Each list line reads ``<domain>/<class>/<image>.jpg <label>``, the path being
  relative to ``<root>``.
- :func:`load_domainnet_from_hub` / :func:`domainnet_splits_from_hf`: a ``datasets`` dataset with
  ``train`` and ``test`` splits and an image column, an integer label column and a domain column (domain
  names as strings or as a ``ClassLabel``, or plain integers in the order above).

Transforms follow the authors' code: training uses ``RandomResizedCrop`` + ``RandomHorizontalFlip``,
evaluation ``Resize(256)`` + ``CenterCrop(224)``, both followed by ImageNet mean/std normalisation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from smear_peft.data.routed_images import RoutedImageSplits

if TYPE_CHECKING:
    import datasets

DOMAINNET_DOMAINS: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
"""The six DomainNet domains; a domain's position is its routing tag."""

DOMAINNET_NUM_LABELS = 345
"""Number of DomainNet classes (labels ``0..344``, class folders in alphabetical order)."""

DOMAINNET_SPLIT_SEED = 42
"""Seed of the authors' train/validation split (``random.seed(42)``)."""

DOMAINNET_VALIDATION_FRACTION = 0.2
"""Fraction of each official train list that the authors hold out for validation."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

LIST_FILE_DIRECTORIES: tuple[str, ...] = (".", "splits", "txt")
"""Folders under the root searched for ``<domain>_<split>.txt``: the root itself (authors' layout),
``splits/`` (Dassl / torchvision-style downloads) and ``txt/`` (the folder of the official list URLs)."""

_EXPECTED_LAYOUT = (
    "Expected the official DomainNet layout: images at <root>/<domain>/<class>/<image>.jpg and list files "
    "<domain>_train.txt and <domain>_test.txt (in <root>, <root>/splits or <root>/txt) whose lines read "
    "'<domain>/<class>/<image>.jpg <label>'. Download the per-domain image zips and the train/test lists "
    "from http://ai.bu.edu/M3SDA/."
)

T = TypeVar("T")


@dataclass(frozen=True)
class DomainNetRecord:
    """One line of a DomainNet list file.

    Attributes:
        relative_path: Image path relative to the dataset root, e.g. ``clipart/apple/clipart_011_000001.jpg``.
        label: Class index in ``range(345)``.
        domain_index: Index into :data:`DOMAINNET_DOMAINS`; becomes the example's routing tag.
    """

    relative_path: str
    label: int
    domain_index: int


def domainnet_train_transform(image_size: int = 224) -> v2.Compose:
    """The authors' training transform: random resized crop, horizontal flip, ImageNet normalisation.

    Args:
        image_size: Side of the square output crop.

    Returns:
        A transform mapping an RGB PIL image to a ``(3, image_size, image_size)`` float tensor.
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def domainnet_eval_transform(image_size: int = 224, resize_size: int | None = None) -> v2.Compose:
    """The authors' evaluation transform: resize the shorter side, centre crop, ImageNet normalisation.

    Args:
        image_size: Side of the square output crop.
        resize_size: Target of the shorter side before cropping. Defaults to ``round(image_size * 256 / 224)``,
            i.e. the authors' ``Resize(256)`` for 224 crops.

    Returns:
        A deterministic transform mapping an RGB PIL image to a ``(3, image_size, image_size)`` float tensor.
    """
    if resize_size is None:
        resize_size = round(image_size * 256 / 224)
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size}) for a centre crop.")
    return v2.Compose(
        [
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def split_like_authors(
    examples_per_domain: Sequence[Sequence[T]],
    seed: int = DOMAINNET_SPLIT_SEED,
    validation_fraction: float = DOMAINNET_VALIDATION_FRACTION,
) -> list[tuple[list[T], list[T]]]:
    """Split each domain's official training examples into (train, validation) exactly like the authors.

    One ``random.Random(seed)`` is shared by all domains and consumed in the given order. Each domain's
    list is shuffled with it; the first ``int(len * validation_fraction)`` items become validation and
    the rest train. With ``seed=42``, ``validation_fraction=0.2`` and the six official train lists in
    :data:`DOMAINNET_DOMAINS` order, this reproduces the authors' ``<domain>_{train,valid}_fold.txt`` files.

    Args:
        examples_per_domain: One sequence per domain, in routing-tag order, in the order of the list file.
        seed: Seed of the shared random generator.
        validation_fraction: Fraction of each domain held out for validation, in ``[0, 1)``.

    Returns:
        One ``(train, validation)`` pair of lists per domain.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    generator = random.Random(seed)
    splits = []
    for examples in examples_per_domain:
        shuffled = list(examples)
        generator.shuffle(shuffled)
        num_validation = int(len(shuffled) * validation_fraction)
        splits.append((shuffled[num_validation:], shuffled[:num_validation]))
    return splits


def find_domainnet_list_file(root: str | Path, domain: str, split: str) -> Path:
    """Locate ``<domain>_<split>.txt`` under ``root`` (see :data:`LIST_FILE_DIRECTORIES`).

    Raises:
        FileNotFoundError: If no candidate exists; the message names every path tried and the expected layout.
    """
    root = Path(root)
    file_name = f"{domain}_{split}.txt"
    candidates = [root / directory / file_name for directory in LIST_FILE_DIRECTORIES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(f"DomainNet list file {file_name!r} not found (tried {tried}). {_EXPECTED_LAYOUT}")


def read_list_file_lines(path: Path) -> list[str]:
    """Read a list file the way the authors do (``f.readlines()``), newline characters stripped.

    Blank lines are kept so that shuffling consumes the random generator exactly like the authors' code;
    :func:`parse_list_line` callers skip them afterwards.
    """
    with open(path, encoding="utf-8") as list_file:
        return [line.rstrip("\r\n") for line in list_file]


def parse_list_line(line: str, domain_index: int, source: Path) -> DomainNetRecord:
    """Parse ``'<domain>/<class>/<image>.jpg <label>'`` into a :class:`DomainNetRecord`.

    Raises:
        ValueError: If the line does not have that form or the label is outside ``range(345)``.
    """
    fields = line.rsplit(maxsplit=1)
    if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
        raise ValueError(f"Malformed line {line!r} in {source}. {_EXPECTED_LAYOUT}")
    relative_path, label = fields[0], int(fields[1])
    if not 0 <= label < DOMAINNET_NUM_LABELS:
        raise ValueError(f"Label {label} in {source} (line {line!r}) is outside range({DOMAINNET_NUM_LABELS}).")
    return DomainNetRecord(relative_path=relative_path, label=label, domain_index=domain_index)


def _records_from_lines(lines: Sequence[str], domain_index: int, source: Path) -> list[DomainNetRecord]:
    return [parse_list_line(line, domain_index, source) for line in lines if line.strip()]


class DomainNetImageList(Dataset):
    """DomainNet images named by :class:`DomainNetRecord` s, loaded lazily from disk.

    Each item is ``{"pixel_values": transform(RGB image), "labels": int, "routing_tags": int}``.
    """

    def __init__(
        self,
        records: Sequence[DomainNetRecord],
        image_root: str | Path,
        transform: Callable[[Image.Image], Any],
    ):
        """
        Args:
            records: The examples, in dataset order.
            image_root: Folder the records' ``relative_path`` s are relative to.
            transform: Applied to each RGB PIL image, e.g. :func:`domainnet_train_transform`.
        """
        self.records = list(records)
        self.image_root = Path(image_root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image_path = self.image_root / record.relative_path
        try:
            with Image.open(image_path) as image:
                rgb_image = image.convert("RGB")
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"DomainNet image {image_path} (listed as {record.relative_path!r}) does not exist. {_EXPECTED_LAYOUT}"
            ) from error
        return {"pixel_values": self.transform(rgb_image), "labels": record.label, "routing_tags": record.domain_index}


def _check_domains(domains: Sequence[str]) -> list[int]:
    """Validate a domain selection and return the domains' routing tags, in canonical order."""
    unknown = [domain for domain in domains if domain not in DOMAINNET_DOMAINS]
    if unknown or not domains:
        raise ValueError(
            f"Unknown or empty DomainNet domain selection {list(domains)}; choose from {DOMAINNET_DOMAINS}."
        )
    if len(set(domains)) != len(domains):
        raise ValueError(f"Duplicate domains in {list(domains)}.")
    return sorted(DOMAINNET_DOMAINS.index(domain) for domain in domains)


def load_domainnet(
    root: str | Path,
    domains: Sequence[str] = DOMAINNET_DOMAINS,
    image_size: int = 224,
    seed: int = DOMAINNET_SPLIT_SEED,
    validation_fraction: float = DOMAINNET_VALIDATION_FRACTION,
) -> RoutedImageSplits:
    """Build the authors' DomainNet train/validation/test splits from the official download.

    Because the authors' split shares one random generator across domains in :data:`DOMAINNET_DOMAINS`
    order, the train lists of all domains up to the last selected one are read (not their images), so
    that a domain's split is the same whether or not other domains are selected.

    Args:
        root: Dataset root; see the module docstring for the layout.
        domains: Domains to include. Routing tags are always the canonical indices in
            :data:`DOMAINNET_DOMAINS`, whatever the selection.
        image_size: Side of the square crops.
        seed: Seed of the train/validation split (42 in the paper).
        validation_fraction: Held-out fraction of each official train list (0.2 in the paper).

    Returns:
        The pooled splits; ``domain_names`` is :data:`DOMAINNET_DOMAINS` and ``num_labels`` 345.

    Raises:
        FileNotFoundError: If a needed list file or a selected domain's image folder is missing.
    """
    root = Path(root)
    selected_tags = _check_domains(domains)
    replayed_domains = DOMAINNET_DOMAINS[: selected_tags[-1] + 1]
    train_list_paths = [find_domainnet_list_file(root, domain, "train") for domain in replayed_domains]
    train_lines_per_domain = [read_list_file_lines(path) for path in train_list_paths]
    train_validation_lines = split_like_authors(train_lines_per_domain, seed, validation_fraction)

    train_records: list[DomainNetRecord] = []
    validation_records: list[DomainNetRecord] = []
    test_records: list[DomainNetRecord] = []
    for domain_index in selected_tags:
        domain = DOMAINNET_DOMAINS[domain_index]
        if not (root / domain).is_dir():
            raise FileNotFoundError(f"DomainNet image folder {root / domain} is missing. {_EXPECTED_LAYOUT}")
        train_lines, validation_lines = train_validation_lines[domain_index]
        train_list_path = train_list_paths[domain_index]
        train_records += _records_from_lines(train_lines, domain_index, train_list_path)
        validation_records += _records_from_lines(validation_lines, domain_index, train_list_path)
        test_list_path = find_domainnet_list_file(root, domain, "test")
        test_records += _records_from_lines(read_list_file_lines(test_list_path), domain_index, test_list_path)

    train_transform = domainnet_train_transform(image_size)
    eval_transform = domainnet_eval_transform(image_size)
    return RoutedImageSplits(
        train=DomainNetImageList(train_records, root, train_transform),
        validation=DomainNetImageList(validation_records, root, eval_transform),
        test=DomainNetImageList(test_records, root, eval_transform),
        domain_names=DOMAINNET_DOMAINS,
        num_labels=DOMAINNET_NUM_LABELS,
    )


@dataclass(frozen=True)
class _DomainToRoutingTag:
    """Map a value of a ``datasets`` domain column to its routing tag (index in :data:`DOMAINNET_DOMAINS`).

    Values may be domain names, ``ClassLabel`` indices (``class_names`` given) or plain integers already in
    :data:`DOMAINNET_DOMAINS` order. A class rather than a closure so that DataLoader workers can pickle it.
    """

    class_names: tuple[str, ...] | None

    def __call__(self, value: Any) -> int:
        if isinstance(value, str):
            name = value.lower()
        elif self.class_names is not None:
            name = self.class_names[int(value)].lower()
        elif 0 <= int(value) < len(DOMAINNET_DOMAINS):
            return int(value)
        else:
            raise ValueError(f"Integer domain {value} is outside range({len(DOMAINNET_DOMAINS)}).")
        if name not in DOMAINNET_DOMAINS:
            raise ValueError(
                f"Unknown DomainNet domain {name!r} in the domain column; expected one of {DOMAINNET_DOMAINS}."
            )
        return DOMAINNET_DOMAINS.index(name)


@dataclass(frozen=True)
class _HFRoutedImageTransform:
    """``datasets`` batch transform producing ``pixel_values``, ``labels`` and ``routing_tags``."""

    image_transform: Callable[[Image.Image], torch.Tensor]
    routing_tag: _DomainToRoutingTag
    image_column: str
    label_column: str
    domain_column: str

    def __call__(self, batch: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        return {
            "pixel_values": [self.image_transform(image.convert("RGB")) for image in batch[self.image_column]],
            "labels": [int(label) for label in batch[self.label_column]],
            "routing_tags": [self.routing_tag(value) for value in batch[self.domain_column]],
        }


def domainnet_splits_from_hf(
    dataset: datasets.DatasetDict,
    domains: Sequence[str] = DOMAINNET_DOMAINS,
    image_size: int = 224,
    seed: int = DOMAINNET_SPLIT_SEED,
    validation_fraction: float = DOMAINNET_VALIDATION_FRACTION,
    image_column: str = "image",
    label_column: str = "label",
    domain_column: str = "domain",
    train_split: str = "train",
    test_split: str = "test",
) -> RoutedImageSplits:
    """Build the DomainNet splits from a ``datasets.DatasetDict`` (e.g. one loaded from the Hub).

    Column mapping: ``image_column`` holds the images (decoded to PIL by ``datasets``), ``label_column``
    the class index (kept as is; it must follow the official alphabetical class order to be comparable
    with the list files), ``domain_column`` the domain as a name (string or ``ClassLabel``) or as an integer
    already in :data:`DOMAINNET_DOMAINS` order. The train/validation split applies :func:`split_like_authors`
    to each domain's rows of ``train_split`` in stored order; it equals the authors' split only if the rows
    of each domain are stored in the official list-file order.

    Returns:
        Splits whose datasets are ``datasets.Dataset`` s with a transform attached; their items have the
        keys ``pixel_values``, ``labels`` and ``routing_tags``.
    """
    missing_splits = [split for split in (train_split, test_split) if split not in dataset]
    if missing_splits:
        raise KeyError(
            f"Splits {missing_splits} not in the dataset (it has {list(dataset)}); pass train_split/test_split."
        )
    for split in (train_split, test_split):
        column_names = dataset[split].column_names
        missing_columns = [c for c in (image_column, label_column, domain_column) if c not in column_names]
        if missing_columns:
            raise KeyError(
                f"Columns {missing_columns} not in split {split!r} (it has {column_names}); "
                "pass image_column/label_column/domain_column."
            )
    selected_tags = set(_check_domains(domains))
    class_names = getattr(dataset[train_split].features[domain_column], "names", None)
    routing_tag = _DomainToRoutingTag(tuple(class_names) if class_names is not None else None)

    def rows_per_domain(split: str) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in DOMAINNET_DOMAINS]
        for row_index, value in enumerate(dataset[split][domain_column]):
            rows[routing_tag(value)].append(row_index)
        return rows

    train_validation_rows = split_like_authors(rows_per_domain(train_split), seed, validation_fraction)
    test_rows = rows_per_domain(test_split)
    train_rows = [row for tag in sorted(selected_tags) for row in train_validation_rows[tag][0]]
    validation_rows = [row for tag in sorted(selected_tags) for row in train_validation_rows[tag][1]]
    test_rows_selected = [row for tag in sorted(selected_tags) for row in test_rows[tag]]

    def attach(split: str, rows: list[int], image_transform: Callable[[Image.Image], torch.Tensor]) -> datasets.Dataset:
        columns = [image_column, label_column, domain_column]
        batch_transform = _HFRoutedImageTransform(image_transform, routing_tag, *columns)
        return dataset[split].select(rows).with_transform(batch_transform, columns=columns)

    eval_transform = domainnet_eval_transform(image_size)
    return RoutedImageSplits(
        train=attach(train_split, train_rows, domainnet_train_transform(image_size)),
        validation=attach(train_split, validation_rows, eval_transform),
        test=attach(test_split, test_rows_selected, eval_transform),
        domain_names=DOMAINNET_DOMAINS,
        num_labels=DOMAINNET_NUM_LABELS,
    )


def load_domainnet_from_hub(dataset_id: str, revision: str | None = None, **split_options: Any) -> RoutedImageSplits:
    """Load a DomainNet copy with ``datasets.load_dataset`` and build the splits.

    Args:
        dataset_id: Hub dataset id or local dataset folder accepted by ``datasets.load_dataset``.
        revision: Dataset revision (pin it for reproducible splits).
        **split_options: Forwarded to :func:`domainnet_splits_from_hf` (domains, image size, column names...).
    """
    import datasets

    return domainnet_splits_from_hf(datasets.load_dataset(dataset_id, revision=revision), **split_options)
