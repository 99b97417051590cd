"""Clean data for the defender: torch datasets, image folders, Hugging Face datasets and Debian's
Fashion-MNIST, all yielding ``(pixels, label)`` with pixels in [0, 1] at the model's input size."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hubdefend.errors import DataError
from hubdefend.preprocess import Preprocessing

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        if mode == "RGB" and image.mode in ("L", "LA", "I", "I;16", "1"):
            _note_grey()
        image = image.convert(mode)
    return image


_grey_noted = False


def _note_grey() -> None:
    global _grey_noted
    if not _grey_noted:
        _grey_noted = True
        warnings.warn("Grey images are converted to RGB for this RGB model.", stacklevel=3)


class PixelDataset(torch.utils.data.Dataset):
    """Images (PIL or a loader of them) and labels, returned as model-size pixels in [0, 1]."""

    def __init__(self, get_image, labels: list[int], preprocessing: Preprocessing) -> None:
        self.get_image = get_image
        self.labels = list(labels)
        self.preprocessing = preprocessing
        self.transform = preprocessing.pixel_transform()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _to_channels(self.get_image(index), self.preprocessing.input_size[0])
        return self.transform(image), self.labels[index]


def _read_idx(path: Path, *, images: bool) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    data = np.frombuffer(raw, np.uint8, offset=16 if images else 8)
    return data.reshape(-1, 28, 28) if images else data


def fashion_mnist(split: str, preprocessing: Preprocessing) -> PixelDataset:
    if split not in ("train", "test"):
        raise DataError(f"fmnist:{split}: the split is train or test.")
    prefix = "train" if split == "train" else "t10k"
    images_path = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise DataError(
            f"Fashion-MNIST is not installed ({images_path}); run: apt-get install -y dataset-fashion-mnist"
        )
    images = _read_idx(images_path, images=True)
    labels = _read_idx(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", images=False)
    return PixelDataset(lambda i: Image.fromarray(images[i], mode="L"), labels.tolist(), preprocessing)


def image_folder(path: Path, preprocessing: Preprocessing) -> PixelDataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((path / name).rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(index)
    if not files:
        raise DataError(f"{path} holds no images in class-per-folder layout (DIR/CLASS/IMAGE.png).")
    return PixelDataset(lambda i: Image.open(files[i]), labels, preprocessing)


def hf_dataset(
    dataset, preprocessing: Preprocessing, image_column: str | None, label_column: str | None
) -> PixelDataset:
    columns = list(dataset.column_names)
    image_column = image_column or next((c for c in ("image", "img") if c in columns), None)
    label_column = label_column or next((c for c in ("label", "labels") if c in columns), None)
    for wanted, kind in ((image_column, "image"), (label_column, "label")):
        if wanted is None or wanted not in columns:
            raise DataError(f"The dataset has no {kind} column {wanted!r}; its columns are {columns}.")
    return PixelDataset(lambda i: dataset[i][image_column], list(dataset[label_column]), preprocessing)


def load_data(
    spec: str,
    preprocessing: Preprocessing,
    *,
    limit: int | None = None,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
) -> torch.utils.data.Dataset:
    """Parse a data spec: an image folder, ``hf:NAME[:SPLIT]``, a saved datasets folder, ``fmnist[:SPLIT]``."""
    if spec == "fmnist" or spec.startswith("fmnist:"):
        dataset = fashion_mnist(spec.partition(":")[2] or "test", preprocessing)
    elif spec.startswith("hf:"):
        import datasets

        name, _, hf_split = spec[3:].partition(":")
        dataset = hf_dataset(
            datasets.load_dataset(name, split=hf_split or split), preprocessing, image_column, label_column
        )
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise DataError(
                f"--data {spec!r}: give an image folder, hf:NAME[:SPLIT], a saved datasets folder, or fmnist[:train|test]."
            )
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split] if split in loaded else next(iter(loaded.values()))
            dataset = hf_dataset(loaded, preprocessing, image_column, label_column)
        else:
            dataset = image_folder(path, preprocessing)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return dataset


def labels_of(dataset) -> list[int]:
    """The labels of a dataset, without decoding images where the dataset knows them."""
    if isinstance(dataset, torch.utils.data.Subset):
        parent = labels_of(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    if hasattr(dataset, "labels"):
        return [int(v) for v in dataset.labels]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def check_labels(dataset, num_classes: int) -> None:
    labels = labels_of(dataset)
    bad = sorted({v for v in labels if not 0 <= v < num_classes})
    if bad:
        raise DataError(
            f"The data has labels {bad[:5]} but the model predicts only {num_classes} classes (0..{num_classes - 1})."
        )


def defender_split(
    dataset,
    *,
    n: int | None = None,
    fraction: float | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels_needed: bool = True,
):
    """A seeded, class-stratified defender subset and a disjoint clean validation split."""
    total = len(dataset)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"fraction={fraction}: give a fraction in (0, 1].")
        n = max(1, round(total * fraction))
    n = total if n is None else n
    if n > total:
        raise DataError(f"Asked for {n} defender images but the data has only {total}.")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator).tolist()
    labels = labels_of(dataset)
    by_class: dict[int, list[int]] = {}
    for index in order:
        by_class.setdefault(labels[index], []).append(index)
    chosen_by_class = {c: idx[: round(n * len(idx) / total)] for c, idx in by_class.items()}
    chosen = sorted(i for idx in chosen_by_class.values() for i in idx)
    val = sorted(i for idx in chosen_by_class.values() for i in idx[: round(len(idx) * val_fraction)])
    val_set = set(val)
    defender = [i for i in chosen if i not in val_set]
    return torch.utils.data.Subset(dataset, defender), torch.utils.data.Subset(dataset, val)
