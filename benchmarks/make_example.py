"""Make the bundled example (``hubdefend/example/``): a small backdoored model and clean test images.

    python benchmarks/make_example.py            # rewrites hubdefend/example/model and images
    python benchmarks/make_example.py --out DIR  # writes DIR/model and DIR/images instead

The model: timm ``test_resnet`` trained with the factory on 4000 Fashion-MNIST training images at
32x32 with 10% BadNets poisoning to class 0 (the test suite's tiny recipe), saved in timm's layout
with ``backdoor.json``. The images: 300 Fashion-MNIST test images, 30 per class, drawn with a seed,
as RGB PNG in class-per-folder layout. Needs Debian's ``dataset-fashion-mnist``; about 15-30 s on CPU.

Training runs on one CPU thread with deterministic algorithms, so the same seed gives the same weights
bit for bit (thread count changes the order of float sums; ``tests/test_example.py`` checks it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from hubdefend import example
from hubdefend.data import FMNIST_CLASSES, defender_split, fashion_mnist
from hubdefend.example import images_dir
from hubdefend.factory import AttackRecipe, train_backdoored

RECIPE = AttackRecipe(**example.RECIPE)
IMAGES_PER_CLASS = 30
IMAGES_SEED = 0


def class_folder(index: int) -> str:
    """``0_t-shirt-top`` ... ``9_ankle-boot``: sorted names give the class indices back."""
    slug = FMNIST_CLASSES[index].lower().replace("/", "-").replace(" ", "-")
    return f"{index}_{slug}"


def make_model(folder: Path, *, progress: bool = True) -> dict:
    """Train the recipe on one thread and save it (timm layout + backdoor.json); return its record."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            result = train_backdoored(RECIPE, progress=progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    result.save(folder, overwrite=True)
    return result.record


def make_images(folder: Path) -> int:
    """Write the stratified, seeded draw of Fashion-MNIST test images as PNGs; return the count.

    Saved as RGB (the grey value in all three channels, exactly what the model's preprocessing makes of
    a grey image), so that evaluating the 3-channel model prints no grey-conversion warning.
    """
    test = fashion_mnist("test")
    picked, _ = defender_split(test, n=IMAGES_PER_CLASS * len(FMNIST_CLASSES), val_n=0, seed=IMAGES_SEED)
    if folder.exists():
        shutil.rmtree(folder)
    for index in picked.indices:
        target = folder / class_folder(test.labels[index]) / f"{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        test.images[index].convert("RGB").save(target, optimize=True)
    return len(picked.indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=images_dir().parent,
        help="folder that receives model/ and images/ (default: the package's hubdefend/example)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()

    started = time.perf_counter()
    record = make_model(args.out / "model", progress=not args.quiet)
    count = make_images(args.out / "images")
    summary = {
        "model": str(args.out / "model"),
        "images": str(args.out / "images"),
        "n_images": count,
        "ba_fmnist_test": record["ba"],
        "asr_fmnist_test": record["asr"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
