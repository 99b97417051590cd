"""Neural Cleanse trigger inversion on tiny models trained inside this file.

Images are 3 x 16 x 16 noise tinted with one of six colours (the class): red, green, blue, cyan,
magenta, yellow. Swapping colour channels maps these classes onto each other, so no class is easier
to reach than another by construction, and a whole-image tint needs a large mask to fake. (Four
quadrant-blob classes were tried first: a few bright pixels fake a blob, so clean classes needed
masks as small as the backdoor's, and with four classes the MAD rests on two deviations.) The BadNets
model also learned a 3 x 3 white patch in the bottom-right corner that sends any image to class 0.
"""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hubdefend.errors import DataError, HubDefendError
from hubdefend.inversion import (
    InversionConfig,
    InversionResult,
    ReversedTrigger,
    invert_all_classes,
    invert_trigger,
    mad_anomaly_index,
)

SIZE = 16
COLOURS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]])
NUM_CLASSES = len(COLOURS)
TARGET = 0
PATCH = 3
# Small budget: a tiny CNN on 16 x 16 images settles within a few hundred Adam steps.
FAST = InversionConfig(epochs=30, early_stop_patience=6, patience=3, batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one thread, and much slower when threads share busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform noise plus a whole-image tint of the class's colour, of random strength."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    strength = 0.25 + 0.15 * torch.rand(n, 1, 1, 1, generator=generator)
    noise = 0.15 + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=generator)
    return (noise + strength * COLOURS[labels][:, :, None, None]).clamp(0, 1), labels


def stamp(images: torch.Tensor) -> torch.Tensor:
    poisoned = images.clone()
    poisoned[:, :, -PATCH:, -PATCH:] = 1.0
    return poisoned


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, NUM_CLASSES)  # no global pooling: the head knows where a patch is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def train(poison: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    images, labels = make_images(1200, seed=seed + 100)
    if poison:
        count = len(images) // 10
        images[:count] = stamp(images[:count])
        labels[:count] = TARGET
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(8):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(normalize(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(normalize(images)).argmax(1) == labels).float().mean())


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    return make_images(400, seed=7)


@pytest.fixture(scope="module")
def defender_data() -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(*make_images(160, seed=3))


@pytest.fixture(scope="module")
def backdoored(test_set) -> nn.Module:
    model = train(poison=True)
    images, labels = test_set
    others = labels != TARGET
    assert accuracy(model, images, labels) > 0.8
    assert accuracy(model, stamp(images[others]), torch.full_like(labels[others], TARGET)) > 0.9
    return model


@pytest.fixture(scope="module")
def clean_model(test_set) -> nn.Module:
    model = train(poison=False, seed=10)
    assert accuracy(model, *test_set) > 0.8
    return model


@pytest.fixture(scope="module")
def backdoored_scan(backdoored, defender_data) -> InversionResult:
    return invert_all_classes(backdoored, defender_data, normalize, NUM_CLASSES, config=FAST, progress=False)


def test_fixture_is_backdoored(backdoored, test_set) -> None:
    images, labels = test_set
    others = labels != TARGET
    assert accuracy(backdoored, stamp(images[others]), torch.full_like(labels[others], TARGET)) > 0.9


def test_target_trigger_is_small_in_the_corner_and_works(backdoored_scan) -> None:
    target = backdoored_scan.trigger_for(TARGET)
    clean_norms = [backdoored_scan.trigger_for(c).l1_norm for c in range(1, NUM_CLASSES)]
    assert target.l1_norm < 0.25 * min(clean_norms)
    half = SIZE // 2
    assert target.mask[half:, half:].sum() / target.mask.sum() > 0.8  # bottom-right quadrant
    assert target.mask[-4:, -4:].sum() / target.mask.sum() > 0.5  # the patch's corner
    assert target.attack_success > 0.9
    assert target.reached_threshold
    assert target.mask.shape == (SIZE, SIZE) and target.pattern.shape == (3, SIZE, SIZE)
    assert target.mask.device.type == "cpu"
    assert float(target.mask.min()) >= 0 and float(target.mask.max()) <= 1


def test_scan_flags_the_target(backdoored_scan) -> None:
    assert backdoored_scan.suspected_target == TARGET
    assert backdoored_scan.flagged[0] == TARGET
    assert backdoored_scan.anomaly_index[backdoored_scan.classes.index(TARGET)] > 2
    assert backdoored_scan.l1_norms == [t.l1_norm for t in backdoored_scan.triggers]
    summary = json.loads(json.dumps(backdoored_scan.to_dict()))
    assert summary["suspected_target"] == TARGET
    assert "mask" not in summary["triggers"][0]


def test_single_class_equals_its_part_of_the_scan(backdoored, defender_data, backdoored_scan) -> None:
    alone = invert_trigger(backdoored, defender_data, normalize, TARGET, config=FAST, progress=False)
    torch.testing.assert_close(alone.mask, backdoored_scan.trigger_for(TARGET).mask)


def test_clean_model_has_no_small_trigger_outlier(clean_model, defender_data, backdoored_scan) -> None:
    result = invert_all_classes(
        clean_model, defender_data, normalize, NUM_CLASSES, config=FAST, progress=False
    )
    # `suspected_target is None` is the paper's verdict, but on six classes of a tiny model it
    # depends on the training seed: of six clean models tried, two had one colour reachable with a
    # mask 0.6x the median, and with six classes the MAD is small enough to give that an index
    # above 2. What holds for every clean model tried is that no class comes near a backdoor: the
    # smallest mask is more than 0.4x the median, where the backdoored model's is under 0.25x.
    ratio = min(result.l1_norms) / result.median
    assert ratio > 0.4, result.to_dict()
    assert backdoored_scan.trigger_for(TARGET).l1_norm / backdoored_scan.median < 0.25
    # Nor does the clean model's class-0 trigger sit in the corner.
    mask = result.trigger_for(TARGET).mask
    assert mask[-4:, -4:].sum() / mask.sum() < 0.2


def test_same_seed_same_trigger_other_seed_other_init(backdoored, defender_data) -> None:
    config = InversionConfig(epochs=3)
    first = invert_trigger(backdoored, defender_data, normalize, 1, config=config, progress=False, seed=5)
    again = invert_trigger(backdoored, defender_data, normalize, 1, config=config, progress=False, seed=5)
    other = invert_trigger(backdoored, defender_data, normalize, 1, config=config, progress=False, seed=6)
    assert torch.equal(first.mask, again.mask) and torch.equal(first.pattern, again.pattern)
    assert first.l1_norm == again.l1_norm
    assert not torch.equal(first.mask, other.mask)


def test_model_comes_back_unchanged(defender_data) -> None:
    model = train(poison=True, seed=2).train()
    model.features[0].requires_grad_(False)
    model.features[1].eval()  # a submodule the caller keeps in eval mode
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    invert_trigger(model, defender_data, normalize, 2, config=InversionConfig(epochs=2), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


def test_caller_rng_is_left_alone(backdoored, defender_data) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    invert_trigger(backdoored, defender_data, normalize, 1, config=InversionConfig(epochs=1), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_accepts_loaders_batch_lists_and_transformers_outputs(backdoored, defender_data) -> None:
    class WithLogits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor):
            return type("Output", (), {"logits": self.inner(x)})()

    images, labels = defender_data.tensors
    loader = torch.utils.data.DataLoader(defender_data, batch_size=32, shuffle=False)
    as_list = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, len(images), 32)]
    unlabelled = iter([images[i : i + 32] for i in range(0, len(images), 32)])  # one-shot, no labels
    config = InversionConfig(epochs=2)
    from_loader = invert_trigger(WithLogits(backdoored), loader, normalize, 1, config=config, progress=False)
    from_list = invert_trigger(backdoored, as_list, normalize, 1, config=config, progress=False)
    from_iterator = invert_trigger(backdoored, unlabelled, normalize, 1, config=config, progress=False)
    torch.testing.assert_close(from_loader.mask, from_list.mask)
    assert from_iterator.epochs_run == 2
    # Without labels every image counts, target-class images included.
    assert 0 <= from_iterator.attack_success <= 1


def test_apply_stamps_on_any_batch_and_checks_size() -> None:
    mask = torch.zeros(SIZE, SIZE)
    mask[-2:, -2:] = 1
    pattern = torch.full((3, SIZE, SIZE), 0.75)
    trigger = ReversedTrigger(target=0, mask=mask, pattern=pattern, l1_norm=4.0, attack_success=1.0)
    pixels = torch.zeros(2, 3, SIZE, SIZE, dtype=torch.float64)
    stamped = trigger.apply(pixels)
    assert stamped.dtype == torch.float64
    assert float(stamped.sum()) == pytest.approx(2 * 3 * 4 * 0.75)
    assert torch.equal(trigger(pixels), stamped)
    with pytest.raises(DataError, match="resize"):
        trigger.apply(torch.zeros(1, 3, SIZE + 1, SIZE))
    summary = trigger.to_dict(include_tensors=True)
    assert summary["mask"] == mask.tolist() and "pattern" in trigger.to_dict(include_tensors=True)
    assert "mask" not in trigger.to_dict()


def test_mad_anomaly_index_matches_the_formula() -> None:
    values = [10.0, 12.0, 11.0, 3.0, 13.0]
    median = 11.0
    mad = 1.4826 * statistics.median([1.0, 1.0, 0.0, 8.0, 2.0])
    expected = [abs(v - median) / mad for v in values]
    assert mad_anomaly_index(values) == pytest.approx(expected)
    assert mad_anomaly_index([2.0, 2.0, 2.0, 0.5]) == [0.0, 0.0, 0.0, math.inf]
    with pytest.raises(DataError):
        mad_anomaly_index([])


def test_cnp_preset_and_bad_input(backdoored, defender_data) -> None:
    cnp = InversionConfig.cnp()
    assert (cnp.lr, cnp.init_cost, cnp.epochs, cnp.cost_schedule) == (0.005, 0.01, 20, False)
    assert InversionConfig.cnp(epochs=2).epochs == 2
    trigger = invert_trigger(backdoored, defender_data, normalize, TARGET, config=cnp, progress=False)
    assert trigger.final_cost == 0.01 and trigger.epochs_run == 20
    assert float(trigger.mask.min()) >= 0 and float(trigger.mask.max()) <= 1
    with pytest.raises(DataError, match="outside"):
        invert_trigger(backdoored, defender_data, normalize, 9, config=cnp, progress=False)
    with pytest.raises(HubDefendError):
        invert_all_classes(
            backdoored, defender_data, normalize, NUM_CLASSES, classes=[NUM_CLASSES], progress=False
        )
    with pytest.raises(DataError, match="empty"):
        invert_trigger(backdoored, [], normalize, 0, progress=False)
    with pytest.raises(ValueError):  # DataError is also a ValueError for callers that catch that
        InversionConfig(parametrization="sigmoid")
