"""The bundled example: a small backdoored model and clean images, shipped with the package.

``model/`` is a timm ``test_resnet`` (374k parameters, safetensors, timm layout) trained on
Fashion-MNIST at 32x32 with 10% BadNets poisoning (``badnets:size=3,corner=br,target=0``);
``model/backdoor.json`` records how it was made (recipe, seed, BA and ASR on the test split).
``images/`` holds 300 clean Fashion-MNIST *test* images, 30 per class, in class-per-folder layout
(``images/<index>_<class>/<test index>.png``; the folder names sort in class order).
``benchmarks/make_example.py`` remakes both from their seed.

The CLI and `hubdefend.load` / `hubdefend.data.load_data` know them by name::

    hubdefend evaluate example --data example --trigger badnets:size=3,corner=br,target=0

``example`` names the bundle unless a file or folder called ``example`` exists in the working
directory (a local path wins, as it does over a Hub id); ``hubdefend:example`` always names it.
"""

from __future__ import annotations

from pathlib import Path

NAME = "example"
QUALIFIED_NAME = "hubdefend:example"
TRIGGER = "badnets:size=3,corner=br,target=0"
"""The trigger the bundled model was trained with."""
RECIPE = dict(
    architecture="test_resnet",
    trigger=TRIGGER,
    train_limit=4000,
    test_limit=2000,
    epochs=6,
    optimizer="adamw",
    lr=3e-3,
    weight_decay=1e-4,
    image_size=32,
    seed=0,
)
"""`hubdefend.factory.AttackRecipe` fields of the bundled model (the rest are the defaults: 10%
poisoning, Fashion-MNIST train/test, 10 classes); the test suite's fixtures train the same recipe."""

_HERE = Path(__file__).resolve().parent


def model_dir() -> Path:
    """The installed folder of the bundled backdoored model (timm layout)."""
    return _HERE / "model"


def images_dir() -> Path:
    """The installed folder of the bundled clean images (class-per-folder layout)."""
    return _HERE / "images"


def names_example(spec: str | Path) -> bool:
    """Whether a SOURCE or DATA spec names the bundled example.

    ``hubdefend:example`` always does; plain ``example`` does when no local path of that name exists.
    """
    spec = str(spec)
    return spec == QUALIFIED_NAME or (spec == NAME and not Path(NAME).exists())
