"""Data-free synthesis (DeepInversion) on the tiny backdoored fixture and a tiny ViT: seeded, in
[0, 1], class-balanced, closer to the BatchNorm running statistics than noise, classified as the
prior label, and the model left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hubdefend.errors import DataError
from hubdefend.synthesis import (
    NoRunningStatisticsWarning,
    SyntheticData,
    norm_input_statistics,
    running_stat_layers,
    synthesize,
)

# Small budgets: the suite's CPU time; the defaults are for the defense.
FAST = dict(n=40, steps=60, batch_size=40, progress=False)


@pytest.fixture(scope="module")
def synthetic(tiny_backdoor) -> SyntheticData:
    return synthesize(
        tiny_backdoor.model, num_classes=10, preprocessing=tiny_backdoor.preprocessing, seed=0, **FAST
    )


def _statistics_distance(model, pixels, preprocessing) -> float:
    """Sum over BatchNorm layers of the relative distance of the input moments to the running ones."""
    stats = norm_input_statistics(model, pixels, normalize=preprocessing.normalize)
    total = 0.0
    for name, layer in running_stat_layers(model):
        mean, var = stats[name]
        total += float((mean - layer.running_mean).norm() / layer.running_var.sum().sqrt())
        total += float((var - layer.running_var).norm() / layer.running_var.norm())
    return total


def test_images_are_pixels_with_balanced_prior_labels(synthetic, tiny_backdoor) -> None:
    assert synthetic.pixels.shape == (40, *tiny_backdoor.preprocessing.input_size)
    assert synthetic.pixels.min() >= 0 and synthetic.pixels.max() <= 1
    assert torch.bincount(synthetic.labels, minlength=10).tolist() == [4] * 10
    pixels, label = synthetic[13]
    assert torch.equal(pixels, synthetic.pixels[13]) and label == 3 and len(synthetic) == 40
    facts = synthetic.facts
    assert facts.prior == "batchnorm" and facts.statistics_layers == len(
        running_stat_layers(tiny_backdoor.model)
    )
    assert facts.final_bn_loss < facts.initial_bn_loss and facts.seconds > 0


def test_batch_statistics_much_closer_than_noise(synthetic, tiny_backdoor) -> None:
    model, preprocessing = tiny_backdoor.model, tiny_backdoor.preprocessing
    noise = torch.rand(synthetic.pixels.shape, generator=torch.Generator().manual_seed(0))
    synthetic_distance = _statistics_distance(model, synthetic.pixels, preprocessing)
    noise_distance = _statistics_distance(model, noise, preprocessing)
    assert synthetic_distance < 0.5 * noise_distance, (synthetic_distance, noise_distance)


def test_model_classifies_images_as_their_prior_label(synthetic, tiny_backdoor) -> None:
    model, preprocessing = tiny_backdoor.model.eval(), tiny_backdoor.preprocessing
    with torch.no_grad():
        predicted = model(preprocessing.normalize(synthetic.pixels)).argmax(1)
    agreement = (predicted == synthetic.labels).float().mean().item()
    assert agreement >= 0.8
    assert synthetic.facts.prior_accuracy == pytest.approx(agreement)


def test_same_seed_same_images_and_model_untouched(tiny_backdoor) -> None:
    model = tiny_backdoor.model.train()  # a training-mode model must come back in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    options = dict(num_classes=10, preprocessing=tiny_backdoor.preprocessing, n=8, steps=5, progress=False)
    try:
        first = synthesize(model, seed=1, **options).pixels
        assert model.training
        second = synthesize(model, seed=1, **options).pixels
        other = synthesize(model, seed=2, **options).pixels
    finally:
        model.eval()
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats too
    assert [p.requires_grad for p in model.parameters()] == flags


def test_two_processes_synthesise_the_same_images(tiny_backdoor, tmp_path: Path) -> None:
    """Under `accelerate launch` with two (gloo, CPU) processes every process ends with the same
    images, and they are the images one process makes: the seed, not the process, decides."""
    options = {"n": 8, "steps": 5, "batch_size": 8, "seed": 1}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(Path(__file__).parent / "ddp_score.py"), str(tiny_backdoor.folder), str(tmp_path), "synthesize",
        json.dumps(options),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    rank0 = torch.load(tmp_path / "images-rank0.pt")
    rank1 = torch.load(tmp_path / "images-rank1.pt")
    assert rank0.shape == (8, 3, 32, 32) and torch.equal(rank0, rank1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes: the thread count changes float sums
    try:
        alone = synthesize(
            tiny_backdoor.model,
            num_classes=10,
            preprocessing=tiny_backdoor.preprocessing,
            progress=False,
            **options,
        ).pixels
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(rank0, alone, atol=1e-5)


def test_vit_falls_back_to_the_priors_and_says_so() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
    ).eval()
    assert not running_stat_layers(vit)
    with pytest.warns(NoRunningStatisticsWarning, match="no BatchNorm running statistics"):
        data = synthesize(
            vit,
            num_classes=10,
            normalize=lambda x: (x - 0.5) / 0.5,
            image_size=(3, 32, 32),
            n=20,
            steps=30,
            progress=False,
        )
    assert data.facts.prior == "none" and data.facts.final_bn_loss is None and data.facts.warnings
    assert data.pixels.min() >= 0 and data.pixels.max() <= 1
    assert data.facts.prior_accuracy >= 0.8  # the class prior alone still steers the images


def test_bad_input(tiny_backdoor) -> None:
    model = tiny_backdoor.model
    with pytest.raises(DataError, match="preprocessing="):
        synthesize(model, num_classes=10, n=4, progress=False)
    with pytest.raises(DataError, match="no option"):
        synthesize(model, num_classes=10, preprocessing=tiny_backdoor.preprocessing, nonsense=1)
    with pytest.raises(DataError, match="at least 1"):
        synthesize(model, num_classes=10, preprocessing=tiny_backdoor.preprocessing, n=0)
