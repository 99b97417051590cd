"""BA / ASR / robust accuracy / per-class accuracy on a model whose every prediction is known."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from hubdefend.errors import DataError
from hubdefend.metrics import Evaluation, evaluate, predict_logits, summarize
from hubdefend.preprocess import Preprocessing

NUM_CLASSES = 3
TARGET = 0
# Identity normalisation except for channel 2, so a test can see that normalize runs first.
PREPROCESSING = Preprocessing(input_size=(3, 6, 6), mean=(0.0, 0.0, 0.5), std=(1.0, 1.0, 0.5))

#            image:  0  1  2  3  4  5  6  7  8  9
LABELS = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
CLEAN_PREDICTIONS = [0, 1, 1, 1, 0, 2, 2, 0, 2, 1]
SUSCEPTIBLE = [1, 1, 1, 1, 0, 1, 1, 0, 0, 0]  # the backdoor fires on these when triggered
# Clean: correct on 0, 2, 3, 5, 6, 8 -> BA 6/10; per class 1/2, 2/3, 3/5.
# Triggered, over the 8 non-target images (2..9): predictions 0 0 0 0 0 0 2 1 -> ASR 6/8,
# robust accuracy 1/8 (image 8). Counting the 2 target-class images too would give ASR 8/10.
EXPECTED = dict(ba=0.6, asr=0.75, robust_accuracy=0.125, per_class=[0.5, 2 / 3, 0.6], n_triggered=8)


class PatchBackdoor(nn.Module):
    """Predicts the class written in pixel (0, 0, 0) as k / 10; predicts TARGET instead when the
    bottom-right 2x2 patch is white and the image's "susceptible" pixel (1, 0, 0) is set."""

    def __init__(self, return_output: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so the model has a device
        self.return_output = return_output
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor):
        self.modes_seen.append(self.training)
        channel2 = x[:, 2] * 0.5 + 0.5  # undo the normalisation: the model sees normalised input
        assert torch.all(channel2 >= -1e-6)
        classes = torch.round(x[:, 0, 0, 0] * 10).long()
        patch_white = (x[:, :, -2:, -2:] >= 1 - 1e-6).flatten(1).all(1)
        fires = patch_white & (x[:, 1, 0, 0] > 0.5)
        classes = torch.where(fires, torch.full_like(classes, TARGET), classes)
        logits = nn.functional.one_hot(classes, NUM_CLASSES).float() * self.scale
        if self.return_output:
            from transformers.modeling_outputs import ImageClassifierOutput

            return ImageClassifierOutput(logits=logits)
        return logits


class WhitePatch:
    """A stand-in trigger: white bottom-right 2x2 patch, all-to-one to TARGET."""

    target = TARGET
    clean_label = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., -2:, -2:] = 1.0
        return x


def _dataset() -> list[tuple[torch.Tensor, int]]:
    items = []
    for label, predicted, susceptible in zip(LABELS, CLEAN_PREDICTIONS, SUSCEPTIBLE, strict=True):
        pixels = torch.full((3, 6, 6), 0.25)
        pixels[0, 0, 0] = predicted / 10
        pixels[1, 0, 0] = float(susceptible)
        items.append((pixels, label))
    return items


def _check(result: Evaluation) -> None:
    assert result.ba == pytest.approx(EXPECTED["ba"])
    assert result.asr == pytest.approx(EXPECTED["asr"])
    assert result.robust_accuracy == pytest.approx(EXPECTED["robust_accuracy"])
    assert result.per_class_accuracy == pytest.approx(EXPECTED["per_class"])
    assert (result.n_clean, result.n_triggered, result.target) == (10, EXPECTED["n_triggered"], TARGET)


@pytest.mark.parametrize("batch_size", [1, 3, 10])
def test_exact_ba_asr_robust_and_per_class(batch_size):
    model = PatchBackdoor()
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=batch_size)
    result = evaluate(model, loader, PREPROCESSING, trigger=WhitePatch(), progress=False)
    _check(result)
    assert result.to_dict()["asr"] == pytest.approx(0.75)


def test_asr_excludes_the_target_class():
    # The same predictions, counted by hand both ways: only the convention's 6/8 is accepted.
    labels, clean = torch.tensor(LABELS), torch.tensor(CLEAN_PREDICTIONS)
    triggered = torch.where(torch.tensor(SUSCEPTIBLE).bool(), torch.tensor(TARGET), clean)
    naive = (triggered == TARGET).float().mean().item()
    result = summarize(labels, clean, triggered, target=TARGET, num_classes=NUM_CLASSES)
    assert naive == pytest.approx(0.8) and result.asr == pytest.approx(0.75)
    with pytest.raises(DataError, match="ASR is undefined"):
        summarize(torch.zeros(4), torch.zeros(4), torch.zeros(4), target=0)


def test_without_trigger_and_with_transformers_output():
    model = PatchBackdoor(return_output=True)
    result = evaluate(model, _dataset(), PREPROCESSING, progress=False)  # a Dataset is accepted too
    assert result.ba == pytest.approx(0.6) and result.asr is None and result.robust_accuracy is None
    assert result.n_triggered == 0 and result.target is None
    assert result.per_class_accuracy == pytest.approx(EXPECTED["per_class"])
    logits = predict_logits(model, torch.stack([x for x, _ in _dataset()]), PREPROCESSING)
    assert logits.argmax(1).tolist() == CLEAN_PREDICTIONS


def test_absent_classes_have_no_accuracy():
    result = summarize(torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2]), num_classes=4)
    assert result.per_class_accuracy == [0.5, None, 1.0, None]


def test_model_runs_in_eval_mode_and_modes_are_restored():
    model = PatchBackdoor()
    model.train()
    frozen = nn.BatchNorm2d(1).eval()
    model.frozen = frozen  # a submodule the user keeps in eval mode inside a training model
    evaluate(model, _dataset(), PREPROCESSING, trigger=WhitePatch(), progress=False)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training and not frozen.training


def test_bad_inputs_raise_data_error():
    with pytest.raises(DataError, match=r"needs \.apply\(pixels\) and \.target"):
        evaluate(PatchBackdoor(), _dataset(), PREPROCESSING, trigger=object(), progress=False)
    with pytest.raises(DataError, match="evaluation data is empty"):
        evaluate(PatchBackdoor(), torch.utils.data.DataLoader([]), PREPROCESSING, progress=False)
    only_target = [(x, y) for x, y in _dataset() if y == TARGET]
    with pytest.raises(DataError, match="target class 0"):
        evaluate(PatchBackdoor(), only_target, PREPROCESSING, trigger=WhitePatch(), progress=False)


def test_explicit_accelerator_and_progress_bar():
    result = evaluate(
        PatchBackdoor(),
        _dataset(),
        PREPROCESSING,
        trigger=WhitePatch(),
        accelerator=Accelerator(),
        progress=True,
    )
    _check(result)


SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
sys.path.insert(0, {root!r})
from tests.test_metrics import PREPROCESSING, PatchBackdoor, WhitePatch, _dataset
from hubdefend.metrics import evaluate

accelerator = Accelerator(cpu=True)
# 10 images, batch 4, 2 processes: the last round is padded with repeated images.
loader = torch.utils.data.DataLoader(_dataset(), batch_size=4)
result = evaluate(PatchBackdoor(), loader, PREPROCESSING, trigger=WhitePatch(), accelerator=accelerator,
                  progress=False)
if accelerator.is_main_process:
    print("RESULT", accelerator.num_processes, json.dumps(result.to_dict()))
# Tear the gloo group down before exit: otherwise a rank can abort in its destructor.
accelerator.end_training()
"""


def test_two_processes_count_every_image_once(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "evaluate_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(root=str(root))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    completed = subprocess.run(
        # accelerate 1.15 runs ONE process for `--cpu --num_processes 2`; `--multi_gpu` without GPUs
        # starts two gloo CPU processes (the script builds Accelerator(cpu=True)).
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=root,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    import json

    _, processes, payload = line.split(" ", 2)
    assert processes == "2"
    _check(Evaluation(**json.loads(payload)))
