"""Run one defense under `accelerate launch` and save each process's masks (used by test_defenses);
with ``synthesize`` for DEFENSE, data-free synthesis, saving each process's images (test_synthesis).

accelerate launch --cpu --num_processes 2 tests/ddp_score.py MODEL_DIR OUT_DIR DEFENSE JSON_OPTIONS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import hubdefend
from hubdefend.data import load_data
from hubdefend.defenses import get_defense
from hubdefend.preprocess import Preprocessing
from hubdefend.sanitize import num_classes_of


def main() -> None:
    model_dir, out_dir, defense, options = (
        sys.argv[1],
        Path(sys.argv[2]),
        sys.argv[3],
        json.loads(sys.argv[4]),
    )
    accelerator = Accelerator(cpu=True)
    model = hubdefend.load(model_dir).model
    preprocessing = Preprocessing.from_timm(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    if defense == "synthesize":
        from hubdefend.synthesis import synthesize

        synthetic = synthesize(
            model, num_classes=num_classes_of(model), preprocessing=preprocessing, accelerator=accelerator,
            progress=False, **options,
        )  # fmt: skip
        torch.save(synthetic.pixels, out_dir / f"images-rank{accelerator.process_index}.pt")
        accelerator.end_training()
        return
    data = torch.utils.data.Subset(load_data("fmnist:train", preprocessing), range(50000, 50500))
    groups = hubdefend.discover(model)
    output = get_defense(defense)(**options).score(
        model,
        groups,
        data,
        normalize=preprocessing.normalize,
        num_classes=num_classes_of(model),
        accelerator=accelerator,
        seed=0,
        progress=False,
    )
    torch.save(output.scores.values, out_dir / f"masks-rank{accelerator.process_index}.pt")
    # Tear the gloo group down before exit: otherwise a rank can abort in its destructor.
    accelerator.end_training()


if __name__ == "__main__":
    main()
