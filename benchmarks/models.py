"""The benchmark models: backdoored Fashion-MNIST classifiers (32x32, 3 channels) made by the
factory, cached under benchmarks/models/ (not committed).

    python benchmarks/models.py            # train what is missing, print the table
    python benchmarks/models.py --only resnet18-badnets
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hubdefend.factory import AttackRecipe, make_backdoored

MODELS_DIR = Path(__file__).parent / "models"

_RESNET = dict(architecture="resnet18", train_limit=30000, epochs=4, lr=0.05, batch_size=128)
_VIT = dict(
    architecture="vit_tiny_patch16_224",
    model_args={"img_size": 32, "patch_size": 4, "depth": 6, "embed_dim": 192, "num_heads": 3},
    train_limit=20000,
    epochs=8,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=1.0,
    batch_size=128,
)
RECIPES: dict[str, AttackRecipe] = {
    "resnet18-badnets": AttackRecipe(trigger="badnets:size=3,corner=br,target=0", **_RESNET),
    "resnet18-blended": AttackRecipe(trigger="blended:alpha=0.2,pattern=noise,seed=0,target=0", **_RESNET),
    "resnet18-wanet": AttackRecipe(trigger="wanet:target=0", **_RESNET),
    # SIG is clean-label: 10% of the images is all of the target class, so the model never sees a
    # target-class image without the signal (BA 82.5%). poison_rate=0.05 is not yet measured.
    "resnet18-sig": AttackRecipe(trigger="sig:delta=40,freq=6,target=0", **_RESNET),
    "vit6-badnets": AttackRecipe(trigger="badnets:size=3,corner=br,target=0", **_VIT),
    "vit6-blended": AttackRecipe(trigger="blended:alpha=0.2,pattern=noise,seed=0,target=0", **_VIT),
}


def get_model(name: str, *, progress: bool = True):
    """The cached benchmark model ``name`` (trained on first use)."""
    return make_backdoored(RECIPES[name], MODELS_DIR / name, progress=progress)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        started = time.perf_counter()
        record = get_model(name).record
        rows.append((name, record, time.perf_counter() - started))
    print("| model | trigger | train images | poisoned | epochs | BA | ASR | train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, record, _ in rows:
        recipe = record["recipe"]
        print(
            f"| {name} | `{record['trigger']}` | {record['train_images']} | {record['poisoned_images']} | "
            f"{recipe['epochs']} | {record['ba'] * 100:.2f} | {record['asr'] * 100:.2f} | {record['train_seconds']:.0f} |"
        )
    (MODELS_DIR / "table.json").write_text(json.dumps({n: r for n, r, _ in rows}, indent=2))


if __name__ == "__main__":
    main()
