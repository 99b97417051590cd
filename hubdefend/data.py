"""Clean data for the defender and the evaluator.

Every source yields ``(pixels, label)``: pixels a float tensor in [0, 1] at the model's input size
(``Preprocessing.pixel_transform``), label an int. Triggers are applied to these pixels later, before
the model's normalisation. Sources: a torch Dataset or DataLoader, a class-per-folder image
directory, a Hugging Face ``datasets`` dataset (Hub name, local path, ``save_to_disk`` folder, or
streamed), and Debian's Fashion-MNIST idx files. `load_data` parses the CLI's data spec (also
``example``: the clean images bundled with the package, see `hubdefend.example`).
"""

from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from hubdefend.errors import DataError
from hubdefend.example import images_dir, names_example
from hubdefend.preprocess import Preprocessing

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
SPEC_HELP = "give a class-per-folder image directory, hf:NAME[:SPLIT], a saved datasets folder, fmnist[:train|test], or example"


class PixelDataset(Dataset):
    """Images from any indexable source, returned as ``(pixels in [0, 1] at model size, label)``.

    Args:
        images: ``images[i]`` is a PIL image, a uint8 array or a float tensor in [0, 1].
        labels: one int per image (known without decoding, for fast splits and checks).
        preprocessing: the model's preprocessing; only its pixel part is applied here.
        classes: class names by index, when the source has them.
    """

    def __init__(
        self,
        images: Sequence[Any],
        labels: Sequence[int],
        preprocessing: Preprocessing,
        classes: Sequence[str] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels: give one label per image.")
        self.images = images
        self.labels = [int(v) for v in labels]
        self.preprocessing = preprocessing
        self.classes = list(classes) if classes is not None else None
        self.transform = preprocessing.pixel_transform()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


class _Files:
    """Lazily opened image files (picklable, for DataLoader workers)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image.load()
                return image
        except OSError as error:
            raise DataError(f"Cannot read image {path}: {error}. Remove or replace the file.") from error


class _Column:
    """One column of a Hugging Face dataset, decoded a row at a time."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        value = self.dataset[int(index)][self.column]
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            # An Image feature stored with decode=False.
            import io

            return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        return value


class _GreyArrays:
    """Rows of a uint8 N x H x W array as grey PIL images."""

    def __init__(self, arrays: np.ndarray) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.arrays[index], mode="L")


class _TorchPairs:
    """The image half of a torch dataset of ``(image, label)`` pairs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index][0]


# -- sources ------------------------------------------------------------------------------------------


def from_torch(data: Dataset | DataLoader, preprocessing: Preprocessing) -> PixelDataset:
    """Wrap a torch Dataset (or a DataLoader's dataset) of ``(PIL image or tensor, label)`` pairs.

    Labels are read once here (from ``targets`` when the dataset has them, as torchvision's do).
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    try:
        length = len(dataset)
    except TypeError as error:
        raise DataError(
            f"{type(dataset).__name__} has no length (an iterable dataset?): give a map-style Dataset, or "
            "take the images you need into a list first."
        ) from error
    if length == 0:
        raise DataError(f"The {type(dataset).__name__} is empty: give at least one (image, label) pair.")
    return PixelDataset(_TorchPairs(dataset), labels_of(dataset), preprocessing)


def image_folder(path: str | Path, preprocessing: Preprocessing) -> PixelDataset:
    """A class-per-folder directory (``DIR/CLASS/IMAGE.png``); sorted class names give the indices.

    Raises:
        DataError: the folder does not exist or holds no images in that layout.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; {SPEC_HELP}.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(index)
    if not files:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES][:3]
        hint = (
            f" (images found directly in it, e.g. {loose}: move them into one folder per class)"
            if loose
            else ""
        )
        raise DataError(
            f"{root} holds no images in class-per-folder layout (DIR/CLASS/IMAGE.png, extensions "
            f"{', '.join(IMAGE_SUFFIXES)}){hint}."
        )
    return PixelDataset(_Files(files), labels, preprocessing, classes=classes)


def hf_dataset(
    dataset: Any,
    preprocessing: Preprocessing,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
) -> PixelDataset:
    """A Hugging Face ``datasets`` Dataset (or IterableDataset: its first ``limit`` rows).

    Args:
        dataset: a ``datasets.Dataset`` or ``datasets.IterableDataset``.
        image_column / label_column: column names; found among ``image``/``img`` and
            ``label``/``labels`` when not given.
        limit: keep only the first rows; required for an IterableDataset.
    """
    import datasets

    columns = list(dataset.column_names or [])
    image_column = _pick_column(columns, image_column, IMAGE_COLUMNS, "image")
    label_column = _pick_column(columns, label_column, LABEL_COLUMNS, "label")
    classes = _class_names(dataset, label_column)
    if isinstance(dataset, datasets.IterableDataset):
        if limit is None:
            raise DataError(
                "A streamed dataset has no end: pass limit=N (--limit N) to take its first N images."
            )
        rows = list(dataset.take(limit))
        images = [row[image_column] for row in rows]
        labels = [_as_label(row[label_column], label_column) for row in rows]
        if not images:
            raise DataError("The streamed dataset gave no rows.")
        return PixelDataset(images, labels, preprocessing, classes=classes)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError("The Hugging Face dataset is empty.")
    labels = [_as_label(v, label_column) for v in dataset[label_column]]
    return PixelDataset(_Column(dataset, image_column), labels, preprocessing, classes=classes)


def fashion_mnist(
    split: str = "test", preprocessing: Preprocessing | None = None, *, root: str | Path | None = None
) -> PixelDataset:
    """Debian's Fashion-MNIST (``apt-get install dataset-fashion-mnist``) as grey 28x28 PIL images.

    Args:
        split: ``train`` (60,000 images) or ``test`` (10,000).
        preprocessing: the model's; an RGB model gets the grey images converted to 3 channels.
        root: the folder of the four ``*-idx?-ubyte.gz`` files (default: Debian's).
    """
    if split not in ("train", "test"):
        raise DataError(f"fmnist:{split}: Fashion-MNIST has the splits train and test.")
    if preprocessing is None:
        preprocessing = Preprocessing(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,))
    images, labels = _read_fashion_mnist(str(Path(root or FMNIST_DIR)), split)
    return PixelDataset(_GreyArrays(images), labels.tolist(), preprocessing, classes=FMNIST_CLASSES)


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached: the session fixtures, the CLI and the benchmarks read the same files repeatedly.
    prefix = "train" if split == "train" else "t10k"
    images_path = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise DataError(
                f"Fashion-MNIST is not installed: {path} is missing. Run `apt-get install -y "
                "dataset-fashion-mnist`, or pass the folder holding the idx .gz files."
            )
    images = _read_idx(images_path, dims=3)
    labels = _read_idx(labels_path, dims=1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels.")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _read_idx(path: Path, *, dims: int) -> np.ndarray:
    """An idx file: magic (0, 0, 0x08 = uint8, dims), big-endian int32 sizes, then the data."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 + 4 * dims or raw[:3] != b"\x00\x00\x08" or raw[3] != dims:
        raise DataError(f"{path} is not a {dims}-d uint8 idx file; reinstall dataset-fashion-mnist.")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">i4", count=dims, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if data.size != math.prod(shape):
        raise DataError(f"{path} is truncated ({data.size} bytes for shape {shape}); reinstall it.")
    return data.reshape(shape)


def load_data(
    spec: str,
    preprocessing: Preprocessing,
    *,
    limit: int | None = None,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
) -> Dataset:
    """Parse a data spec into a Dataset of ``(pixels, label)``.

    Specs: a class-per-folder image directory; ``hf:NAME[:SPLIT]`` (Hub name or local path, loaded
    with ``datasets.load_dataset``); a folder written by ``save_to_disk`` (optionally ``DIR:SPLIT``);
    ``fmnist[:train|test]`` (default test); ``example`` / ``hubdefend:example``, the bundled clean
    Fashion-MNIST test images (an image folder, `hubdefend.example.images_dir`).

    Args:
        spec: the data spec.
        preprocessing: the model's preprocessing.
        limit: keep only the first ``limit`` images (a streamed dataset reads only those).
        split: the split when the spec names none (Hugging Face default: ``train``).
        image_column / label_column: Hugging Face column names (auto-detected when not given).
        streaming: stream an ``hf:`` dataset instead of downloading it whole (needs ``limit``).

    Raises:
        DataError: the spec names nothing usable; the message says what was expected.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}: give a positive number of images.")
    spec = str(spec)
    name, _, spec_split = spec.partition(":")
    if names_example(spec):
        dataset: Dataset = image_folder(images_dir(), preprocessing)
    elif name == "fmnist":
        dataset = fashion_mnist(spec_split or split or "test", preprocessing)
    elif name == "hf":
        dataset = _load_hf(spec_split, preprocessing, split, image_column, label_column, streaming, limit)
    else:
        dataset = _load_path(spec, preprocessing, split, image_column, label_column)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    dataset.spec = spec  # so that reports can say where the images came from (`spec_of`)
    return dataset


def _load_hf(
    rest: str,
    preprocessing: Preprocessing,
    split: str | None,
    image_column: str | None,
    label_column: str | None,
    streaming: bool,
    limit: int | None,
) -> PixelDataset:
    import datasets

    if not rest:
        raise DataError("hf: needs a dataset name, e.g. hf:uoft-cs/cifar10:test.")
    name, _, spec_split = rest.partition(":")
    chosen = spec_split or split or "train"
    if Path(name).expanduser().is_dir() and _is_saved_dataset(Path(name).expanduser()):
        loaded = _load_saved(Path(name).expanduser(), chosen if spec_split or split else None)
        return hf_dataset(loaded, preprocessing, image_column=image_column, label_column=label_column)
    try:
        loaded = datasets.load_dataset(name, split=chosen, streaming=streaming)
    except (ValueError, KeyError) as error:
        raise DataError(f"hf:{name} has no split {chosen!r} ({error}). Name one: hf:{name}:SPLIT.") from error
    except Exception as error:  # datasets raises many types for an unreachable or unknown dataset
        raise DataError(
            f"Cannot load the Hugging Face dataset {name!r}: {type(error).__name__}: {error}. Check the name, "
            "your network or HF_ENDPOINT, or save it with save_to_disk and pass that folder."
        ) from error
    return hf_dataset(
        loaded,
        preprocessing,
        image_column=image_column,
        label_column=label_column,
        limit=limit if streaming else None,
    )


def _load_path(
    spec: str,
    preprocessing: Preprocessing,
    split: str | None,
    image_column: str | None,
    label_column: str | None,
) -> PixelDataset:
    path = Path(spec).expanduser()
    if not path.is_dir():
        # DIR:SPLIT for a saved DatasetDict.
        head, sep, tail = spec.rpartition(":")
        if sep and Path(head).expanduser().is_dir() and _is_saved_dataset(Path(head).expanduser()):
            loaded = _load_saved(Path(head).expanduser(), tail)
            return hf_dataset(loaded, preprocessing, image_column=image_column, label_column=label_column)
        raise DataError(f"--data {spec!r} is not a directory or a known source: {SPEC_HELP}.")
    if _is_saved_dataset(path):
        loaded = _load_saved(path, split)
        return hf_dataset(loaded, preprocessing, image_column=image_column, label_column=label_column)
    return image_folder(path, preprocessing)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def _load_saved(path: Path, split: str | None) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            split = "train" if "train" in loaded else splits[0] if len(splits) == 1 else None
            if split is None:
                raise DataError(f"{path} holds the splits {splits}: name one, e.g. {path}:{splits[0]}.")
        if split not in loaded:
            raise DataError(f"{path} has no split {split!r}; it holds {splits}.")
        loaded = loaded[split]
    return loaded


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"The dataset has no {kind} column {wanted!r}; its columns are {columns}.")
        return wanted
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise DataError(
        f"Cannot find the {kind} column (looked for {', '.join(candidates)}); the dataset's columns are "
        f"{columns}. Name it with {kind}_column=... (--{kind}-column)."
    )


def _class_names(dataset: Any, label_column: str) -> list[str] | None:
    feature = (getattr(dataset, "features", None) or {}).get(label_column)
    return list(feature.names) if getattr(feature, "names", None) else None


def _as_label(value: Any, column: str) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"Column {column!r} holds {value!r}, not an integer class index. Give a ClassLabel or int column."
        ) from error
    return label


# -- labels, splits, loaders --------------------------------------------------------------------------


def materialize(dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a (small) dataset of ``(pixels, label)`` pairs, or its first ``limit``, into two tensors."""
    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y))
        if limit is not None and sum(len(b) for b in xs) >= limit:
            break
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    x, y = torch.cat(xs), torch.cat(ys).long()
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def spec_of(data: Any) -> str | None:
    """The data spec ``data`` was loaded from (`load_data` records it), or None for user datasets."""
    return data if isinstance(data, str) else getattr(data, "spec", None)


def labels_of(dataset: Dataset) -> list[int]:
    """The labels of a dataset, without decoding images where the dataset knows them."""
    if isinstance(dataset, Subset):
        parent = labels_of(dataset.dataset)
        return [parent[int(i)] for i in dataset.indices]
    for attribute in ("labels", "targets"):
        known = getattr(dataset, attribute, None)
        if known is not None and not callable(known):
            try:
                if len(known) == len(dataset):
                    return [int(v) for v in known]
            except TypeError:
                pass
    labels = []
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(
                f"Item {index} of {type(dataset).__name__} is not an (image, label) pair: give a dataset "
                "of (image, label) pairs."
            )
        labels.append(_as_label(item[1], "label"))
    return labels


def check_labels(dataset: Dataset, num_classes: int) -> None:
    """Raise `DataError` when a label is outside the model's classes ``0 .. num_classes - 1``."""
    labels = labels_of(dataset)
    bad = sorted({v for v in labels if not 0 <= v < num_classes})
    if bad:
        count = sum(1 for v in labels if not 0 <= v < num_classes)
        raise DataError(
            f"{count} images have labels {bad[:5]}{' ...' if len(bad) > 5 else ''} but the model predicts only "
            f"{num_classes} classes (0..{num_classes - 1}). Use data of the model's own classes, in its order."
        )


def defender_split(
    dataset: Dataset,
    *,
    n: int | None = None,
    fraction: float | None = None,
    val_fraction: float = 0.2,
    val_n: int | None = None,
    seed: int = 0,
    labels_needed: bool = True,
) -> tuple[Subset, Subset]:
    """A seeded, class-stratified pool of the data, split into defender images and clean validation.

    ``n`` (or ``fraction`` of the data; default all of it) images are drawn, each class keeping its
    share; ``val_n`` (or ``val_fraction``) of them form the validation subset, again stratified, and
    the rest the defender subset. The two are disjoint; the same seed gives the same indices.

    Args:
        dataset: a map-style dataset of ``(pixels, label)``.
        n / fraction: pool size, as a count or a share in (0, 1]; not both.
        val_fraction / val_n: validation size, as a share of the pool in [0, 1) or a count.
        seed: seeds the draw.
        labels_needed: with False (label-free defenses) the draw ignores labels and is not stratified.

    Returns:
        ``(defender, validation)`` subsets of ``dataset`` (indices sorted).

    Raises:
        DataError: sizes that do not fit the data, or a class with too few images for both subsets.
    """
    total = len(dataset)
    if total == 0:
        raise DataError("The data is empty: give defender images.")
    if n is not None and fraction is not None:
        raise DataError("Give n (an image count) or fraction (a share of the data), not both.")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"fraction={fraction}: give a share of the data in (0, 1], e.g. 0.01 for 1%.")
        n = max(1, round(total * fraction))
    n = total if n is None else int(n)
    if n < 1:
        raise DataError(f"n={n}: give a positive number of defender images.")
    if n > total:
        raise DataError(f"Asked for {n} defender images but the data has only {total}; pass n <= {total}.")
    if val_n is None:
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction={val_fraction}: give a share in [0, 1), e.g. 0.2.")
        val_count = round(n * val_fraction)
    else:
        val_count = int(val_n)
    if not 0 <= val_count < n:
        raise DataError(
            f"A validation split of {val_count} from {n} images leaves no defender images; ask for fewer "
            "validation images or a larger n."
        )

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator).tolist()
    if not labels_needed:
        pool = order[:n]
        return Subset(dataset, sorted(pool[val_count:])), Subset(dataset, sorted(pool[:val_count]))

    labels = labels_of(dataset)
    by_class: dict[int, list[int]] = {}
    for index in order:
        by_class.setdefault(labels[index], []).append(index)
    classes = sorted(by_class)
    pool_sizes = _apportion({c: len(by_class[c]) for c in classes}, n)
    val_sizes = _apportion(pool_sizes, val_count)
    short = [c for c in classes if pool_sizes[c] - val_sizes[c] < 1]
    if short:
        first = short[0]
        raise DataError(
            f"Too few images per class: class {first} gets {pool_sizes[first]} of the {n} drawn "
            f"({len(by_class[first])} in the data), leaving no defender image for it after validation "
            f"({len(short)} classes are short). Draw more images (n / fraction), or use data with more "
            "images of each class."
        )
    defender: list[int] = []
    val: list[int] = []
    for c in classes:
        picked = by_class[c][: pool_sizes[c]]
        val += picked[: val_sizes[c]]
        defender += picked[val_sizes[c] :]
    return Subset(dataset, sorted(defender)), Subset(dataset, sorted(val))


def _apportion(sizes: dict[int, int], total: int) -> dict[int, int]:
    """Split ``total`` across classes in proportion to ``sizes`` (largest remainder; ties by class)."""
    whole = sum(sizes.values())
    if whole == 0 or total == 0:
        return {c: 0 for c in sizes}
    exact = {c: total * size / whole for c, size in sizes.items()}
    counts = {c: math.floor(v) for c, v in exact.items()}
    leftover = total - sum(counts.values())
    by_remainder = sorted(sizes, key=lambda c: (-(exact[c] - counts[c]), c))
    for c in by_remainder[:leftover]:
        counts[c] += 1
    return counts


def collate(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(pixels, label)`` pairs into an ``N x C x H x W`` float batch and an int64 label vector."""
    if not batch:
        raise DataError("An empty batch: the data has no images.")
    pixels = torch.stack([item[0] for item in batch])
    labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.long)
    return pixels, labels


def make_loader(
    dataset: Dataset,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    *,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader with a seeded generator: the same seed gives the same shuffled order."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: give a positive batch size.")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn or collate,
    )
