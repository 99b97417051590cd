"""Data sources, preprocessing fidelity (timm / transformers), Fashion-MNIST and defender splits."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hubdefend.data import (
    FMNIST_DIR,
    check_labels,
    defender_split,
    fashion_mnist,
    from_torch,
    hf_dataset,
    image_folder,
    labels_of,
    load_data,
    make_loader,
)
from hubdefend.errors import DataError, HubDefendError
from hubdefend.preprocess import Preprocessing

CLASSES = ("cat", "dog", "emu")
PER_CLASS = 4
# Same maths, same resampling code; only the order of float ops differs (transformers fuses the
# 1/255 rescale into mean/std), so outputs agree to float32 rounding. Different resampling
# implementations (PIL vs torch) would differ by a few 1e-3, which this tolerance would catch.
TIGHT = 1e-6
PIXELS_32 = Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)


def _images(seed: int = 0, mode: str = "RGB") -> list[tuple[Image.Image, int]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for label in range(len(CLASSES)):
        for i in range(PER_CLASS):
            height, width = 20 + 3 * i, 24 + 5 * label  # mixed sizes and aspect ratios
            shape = (height, width, 3) if mode == "RGB" else (height, width)
            pairs.append((Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode), label))
    return pairs


@pytest.fixture(scope="module")
def pairs() -> list[tuple[Image.Image, int]]:
    return _images()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pairs) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for i, (image, label) in enumerate(pairs):
        (root / CLASSES[label]).mkdir(exist_ok=True)
        image.save(root / CLASSES[label] / f"{i:03d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _hf(pairs, image_column: str = "image", label_column: str = "label"):
    import datasets

    features = datasets.Features(
        {image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(CLASSES))}
    )
    return datasets.Dataset.from_dict(
        {image_column: [p for p, _ in pairs], label_column: [y for _, y in pairs]}, features=features
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pairs) -> Path:
    path = tmp_path_factory.mktemp("saved") / "ds"
    _hf(pairs).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, pairs) -> Path:
    path = tmp_path_factory.mktemp("parquet")
    _hf(pairs).to_parquet(str(path / "train.parquet"))
    return path


def _stack(dataset) -> tuple[torch.Tensor, list[int]]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), [int(y) for _, y in items]


# -- sources agree ------------------------------------------------------------------------------------


def test_folder_saved_dataset_hf_path_and_torch_dataset_give_identical_tensors(
    folder, saved, parquet_dir, pairs
):
    reference_x, reference_y = _stack(from_torch(pairs, PIXELS_32))
    assert reference_x.shape == (len(pairs), 3, 32, 32)
    assert reference_y == [y for _, y in pairs]
    assert reference_x.min() >= 0 and reference_x.max() <= 1
    for spec in (str(folder), str(saved), f"hf:{parquet_dir}", f"hf:{saved}"):
        x, y = _stack(load_data(spec, PIXELS_32))
        assert y == reference_y, spec
        assert torch.equal(x, reference_x), spec
    loader = torch.utils.data.DataLoader(pairs, batch_size=4)
    assert torch.equal(_stack(from_torch(loader, PIXELS_32))[0], reference_x)
    assert image_folder(folder, PIXELS_32).classes == list(CLASSES)


def test_limit_and_uint8_and_float_tensor_inputs(pairs):
    dataset = load_data("fmnist:test", PIXELS_32, limit=5) if FMNIST_DIR.is_dir() else None
    if dataset is not None:
        assert len(dataset) == 5
    as_uint8 = [(torch.from_numpy(np.array(p)).permute(2, 0, 1), y) for p, y in pairs]
    assert torch.equal(_stack(from_torch(as_uint8, PIXELS_32))[0], _stack(from_torch(pairs, PIXELS_32))[0])
    ready = torch.rand(3, 32, 32)
    assert torch.equal(from_torch([(ready, 1)], PIXELS_32)[0][0], ready)  # model-size pixels pass through
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        from_torch([(ready * 4 - 2, 1)], PIXELS_32)[0]


def test_saved_dataset_dict_splits(tmp_path, pairs):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": _hf(pairs[:6]), "test": _hf(pairs[6:])}).save_to_disk(str(path))
    assert len(load_data(str(path), PIXELS_32)) == 6
    assert len(load_data(f"{path}:test", PIXELS_32)) == len(pairs) - 6
    assert len(load_data(str(path), PIXELS_32, split="test")) == len(pairs) - 6
    with pytest.raises(DataError, match="no split 'validation'.*'train', 'test'"):
        load_data(f"{path}:validation", PIXELS_32)


def test_hf_columns_are_detected_or_named(pairs):
    dataset = hf_dataset(_hf(pairs, "img", "labels"), PIXELS_32)
    assert dataset.labels == [y for _, y in pairs] and dataset.classes == list(CLASSES)
    renamed = _hf(pairs, "picture", "cls")
    with pytest.raises(DataError, match=r"image column.*\['picture', 'cls'\]"):
        hf_dataset(renamed, PIXELS_32)
    with pytest.raises(DataError, match=r"no label column 'y'; its columns are \['picture', 'cls'\]"):
        hf_dataset(renamed, PIXELS_32, image_column="picture", label_column="y")
    assert len(hf_dataset(renamed, PIXELS_32, image_column="picture", label_column="cls")) == len(pairs)


def test_hf_streaming_takes_the_first_n(parquet_dir, pairs):
    streamed = load_data(f"hf:{parquet_dir}", PIXELS_32, streaming=True, limit=5)
    full = load_data(f"hf:{parquet_dir}", PIXELS_32)
    assert len(streamed) == 5
    assert torch.equal(_stack(streamed)[0], _stack(full)[0][:5])
    with pytest.raises(DataError, match="limit"):
        load_data(f"hf:{parquet_dir}", PIXELS_32, streaming=True)


# -- preprocessing matches the models' own transforms -------------------------------------------------


@pytest.mark.parametrize(
    "overlay",
    [
        dict(input_size=(3, 32, 32), crop_pct=0.875),
        dict(input_size=(3, 32, 48), crop_pct=0.9, interpolation="bicubic"),
        dict(input_size=(3, 30, 30), crop_pct=1.0, crop_mode="squash"),
        dict(input_size=(3, 32, 40), crop_pct=0.95, crop_mode="border", mean=(0.4, 0.5, 0.6)),
    ],
)
def test_timm_preprocessing_equals_timm_transform(pairs, overlay):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model("test_resnet", num_classes=3, pretrained_cfg_overlay=overlay)
    reference = create_transform(**resolve_model_data_config(model))
    preprocessing = Preprocessing.from_timm(model)
    assert preprocessing == Preprocessing.from_timm(model.pretrained_cfg)
    transform = preprocessing.pixel_transform()
    for image, _ in pairs:
        ours = preprocessing.normalize(transform(image).unsqueeze(0))[0]
        assert ours.shape == (3, *overlay["input_size"][1:])
        assert (ours - reference(image)).abs().max() <= TIGHT


def _processors():
    from transformers import ConvNextImageProcessor, ViTImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return [
        ViTImageProcessor(size={"height": 32, "width": 32}),
        ViTImageProcessorPil(size={"height": 32, "width": 32}),
        ViTImageProcessor(
            size={"height": 40, "width": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32}
        ),
        ConvNextImageProcessor(size={"shortest_edge": 32}),  # short edge to 36, centre crop 32
        ConvNextImageProcessor(size={"shortest_edge": 384}, resample=2),  # warp, no crop
    ]


@pytest.mark.parametrize("index", range(5))
def test_image_processor_preprocessing_equals_the_processor(pairs, index):
    processor = _processors()[index]
    preprocessing = Preprocessing.from_image_processor(processor)
    transform = preprocessing.pixel_transform()
    for image, _ in pairs[::2]:
        reference = processor(image, return_tensors="pt")["pixel_values"][0]
        ours = preprocessing.normalize(transform(image))
        assert ours.shape == reference.shape
        assert (ours - reference).abs().max() <= TIGHT


def test_grey_images_for_an_rgb_model_are_converted_with_one_warning(tmp_path):
    root = tmp_path / "grey"
    for i, (image, label) in enumerate(_images(1, mode="L")):
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / CLASSES[label] / f"{i}.png")
    dataset = load_data(str(root), PIXELS_32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, _ = _stack(dataset)
    assert [str(w.message) for w in caught if "Grey" in str(w.message)] == [
        "Grey images are converted to RGB (the grey value in all three channels) for this 3-channel model."
    ]
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_preprocessing_round_trip_and_from_model():
    import timm
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    for preprocessing in (PIXELS_32, Preprocessing.from_image_processor(processor)):
        payload = json.loads(json.dumps(preprocessing.to_dict()))
        assert Preprocessing.from_dict(payload) == preprocessing
    timm_model = timm.create_model("test_resnet", num_classes=3)
    assert Preprocessing.from_model(timm_model) == Preprocessing.from_timm(timm_model)
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            num_labels=3,
        )
    )
    from_vit = Preprocessing.from_model(vit, image_processor=processor)
    assert (
        from_vit.input_size == (3, 32, 32)
        and from_vit.mean == (0.5, 0.5, 0.5)
        and from_vit.crop_mode == "squash"
    )
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    assert Preprocessing.from_model(plain, fallback=PIXELS_32) is PIXELS_32
    with pytest.raises(DataError, match=r"Pass preprocessing=Preprocessing\(input_size"):
        Preprocessing.from_model(plain)


def test_normalize_works_on_batches_and_single_images():
    preprocessing = Preprocessing(input_size=(3, 2, 2), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(
        3, 1, 1
    )
    assert (
        torch.allclose(preprocessing.normalize(x), expected) and preprocessing.normalize(x).dtype == x.dtype
    )
    assert torch.allclose(preprocessing.normalize(x[0]), expected[0])


def test_bad_preprocessing_raises_data_error():
    from transformers import ViTImageProcessor

    with pytest.raises(DataError, match="1 or 3 channels"):
        Preprocessing(input_size=(4, 8, 8))
    with pytest.raises(DataError, match="2 values but the model has 3 channels"):
        Preprocessing(mean=(0.5, 0.5))
    with pytest.raises(DataError, match="must be positive"):
        Preprocessing(std=(0.0, 1.0, 1.0))
    with pytest.raises(DataError, match="Unknown preprocessing keys"):
        Preprocessing.from_dict({"size": 3})
    with pytest.raises(DataError, match="does not resize"):
        Preprocessing.from_image_processor(ViTImageProcessor(do_resize=False))
    assert issubclass(DataError, HubDefendError)


# -- Fashion-MNIST ------------------------------------------------------------------------------------

needs_fmnist = pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")


@needs_fmnist
def test_fmnist_test_split_as_grey_and_as_rgb():
    grey = fashion_mnist("test")  # raw 1 x 28 x 28
    assert len(grey) == 10000
    assert Counter(grey.labels) == {c: 1000 for c in range(10)}
    x, y = grey[0]
    assert x.shape == (1, 28, 28) and y == grey.labels[0] and x.min() >= 0 and x.max() <= 1
    assert torch.equal((x * 255).round().to(torch.uint8)[0], torch.from_numpy(np.array(grey.images[0])))

    rgb = Preprocessing(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    dataset = load_data("fmnist", rgb)  # default: test
    assert len(dataset) == 10000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels, label = dataset[9999]
    assert pixels.shape == (3, 32, 32) and label == grey.labels[9999]
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


@needs_fmnist
def test_fmnist_train_and_bad_split():
    assert len(load_data("fmnist:train", PIXELS_32)) == 60000
    with pytest.raises(DataError, match="splits train and test"):
        load_data("fmnist:val", PIXELS_32)


def test_missing_fmnist_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist("test", PIXELS_32, root=tmp_path)


# -- bad inputs ---------------------------------------------------------------------------------------


def test_bad_specs_raise_data_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images in class-per-folder layout"):
        load_data(str(empty), PIXELS_32)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (4, 4)).save(loose / "a.png")
    with pytest.raises(DataError, match="move them into one folder per class"):
        load_data(str(loose), PIXELS_32)
    with pytest.raises(DataError, match=r"hf:NAME\[:SPLIT\]"):
        load_data(str(tmp_path / "nowhere"), PIXELS_32)
    with pytest.raises(DataError, match="hf: needs a dataset name"):
        load_data("hf:", PIXELS_32)
    with pytest.raises(DataError, match="positive number"):
        load_data(str(empty), PIXELS_32, limit=0)
    with pytest.raises(DataError, match="is empty"):
        from_torch([], PIXELS_32)


# -- defender split -----------------------------------------------------------------------------------


class _Labelled(torch.utils.data.Dataset):
    """Labels without images: splits only need labels."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.zeros(1), self.labels[index]


def test_defender_split_is_disjoint_stratified_and_seeded():
    labels = [0] * 500 + [1] * 300 + [2] * 200
    data = _Labelled(labels)
    defender, val = defender_split(data, n=100, val_fraction=0.2, seed=3)
    assert len(defender) == 80 and len(val) == 20
    assert not set(defender.indices) & set(val.indices)
    assert Counter(labels[i] for i in defender.indices) == {0: 40, 1: 24, 2: 16}
    assert Counter(labels[i] for i in val.indices) == {0: 10, 1: 6, 2: 4}
    again = defender_split(data, n=100, val_fraction=0.2, seed=3)
    assert again[0].indices == defender.indices and again[1].indices == val.indices
    other = defender_split(data, n=100, val_fraction=0.2, seed=4)
    assert other[0].indices != defender.indices
    assert labels_of(defender) == [labels[i] for i in defender.indices]

    by_fraction, val_by_count = defender_split(data, fraction=0.05, val_n=10, seed=0)
    assert len(by_fraction) == 40 and len(val_by_count) == 10
    everything, none = defender_split(data, val_fraction=0.0)
    assert len(everything) == 1000 and len(none) == 0
    unlabelled, unlabelled_val = defender_split(data, n=50, seed=1, labels_needed=False)
    assert len(unlabelled) == 40 and len(unlabelled_val) == 10
    assert not set(unlabelled.indices) & set(unlabelled_val.indices)


def test_defender_split_and_label_errors():
    data = _Labelled([0] * 30 + [1] * 2)
    with pytest.raises(DataError, match="only 32; pass n <= 32"):
        defender_split(data, n=33)
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(DataError, match=r"in \(0, 1\]"):
            defender_split(data, fraction=fraction)
    with pytest.raises(DataError, match="Too few images per class: class 1"):
        defender_split(data, n=4)
    with pytest.raises(DataError, match="leaves no defender images"):
        defender_split(data, n=10, val_n=10)
    check_labels(data, 2)
    with pytest.raises(DataError, match=r"labels \[1\] but the model predicts only 1 classes"):
        check_labels(data, 1)


def test_make_loader_is_seeded():
    data = _Labelled(list(range(20)))
    first = [y.tolist() for _, y in make_loader(data, batch_size=6, shuffle=True, seed=7)]
    second = [y.tolist() for _, y in make_loader(data, batch_size=6, shuffle=True, seed=7)]
    other = [y.tolist() for _, y in make_loader(data, batch_size=6, shuffle=True, seed=8)]
    assert first == second != other
    x, y = next(iter(make_loader(data, batch_size=6)))
    assert x.shape == (6, 1) and y.dtype == torch.long and y.tolist() == list(range(6))
