"""Backdoor detection: is this model backdoored, and which class is the target, with no data or
with a few hundred clean images.

The model's own classes are the yardstick. Each detector optimises inputs for every class
and gives one score per class (higher = more suspicious); an all-to-one backdoor makes its target
class an outlier among the model's classes. The scores are turned into robust z-scores against the
model's OTHER classes (their median and robust spread, `robust_z`), the detectors' z-scores are
averaged with their weights (the anomaly index), and the top class is tested with a p-value that
includes the maximum over the K classes (`max_z_p_value`). No threshold is fitted on other models:
a backdoor is suspected when that p-value is below ``alpha`` (0.01). With the defender's clean
images (``images=``, `scan --data`) the universal triggers are fitted on them as well as on the
neutral images, and `NeuronCollapse` (ANP's neuron-noise test) runs beside the others.

Detectors (`DETECTORS`; add one by subclassing `Detector` and registering it):

* ``universal-trigger``, `UniversalTrigger`: MM-BD's margin under a universal-trigger constraint.
  One trigger per class, a mask of fixed area (a share ``area`` of the pixels, spread as the
  optimiser likes: a small patch, a faint whole-image blend or anything between) and a pattern,
  stamped as ``(1 - m) * x + m * p`` onto neutral images (uniform noise, flat grey, smooth noise)
  that show no class, is optimised for the class's margin ``logit_c - max_{k != c} logit_k``; the
  statistic is the smallest margin it reaches over the images. A backdoor trigger works on every
  image. (Neural Cleanse's inversion with neutral images for data and a fixed trigger size.)
* ``trigger-dominance``, `TriggerDominance`: each class's universal trigger stamped over the
  neutral images already carrying another class's trigger; the statistic is the class's smallest
  margin over rivals and images. A backdoor trigger overrides whatever the image shows, the other
  classes' strongest features included; a naturally easy class (a large, plain object) also has a
  strong universal trigger, but not one that wins over the others'. Forward passes only.
* ``neuron-collapse``, `NeuronCollapse` (clean images only): the share of the clean images that
  small adversarial noise on the normalization neurons moves into each class. Weight 0 by default
  (reported, not in the verdict; see `NeuronCollapse`).
* ``mm-bd``, `MaxMargin`: the maximum-margin statistic of MM-BD ("MM-BD: Post-Training Detection of
  Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", Wang et
  al., IEEE S&P 2024), reimplemented from the paper: pixels in [0, 1] optimised from random starts
  to maximise the margin, the statistic the largest margin reached, and the paper's test (a gamma
  distribution fitted to the other classes' statistics, p-value ``1 - F(r_max)^(K-1)``) reported as
  ``gamma_p_value``. Weight 0 by default (reported, not in the verdict; see `MaxMargin`).

Every optimisation is batched over classes and starts in one tensor (classes are chunked only to
bound memory, which does not change the result), seeded with a `torch.Generator` per detector, and
uses logits and gradients only (`NeuronCollapse` also the normalization neurons the adapters find),
so CNNs and ViTs are treated alike. The model's own normalization is applied inside the forward, as
in `hubdefend.inversion`. Measured on ``benchmarks/detection.py``.
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hubdefend.errors import DataError
from hubdefend.training import frozen_on, logits_of

Forward = Callable[[torch.Tensor], torch.Tensor]
"""Pixels in [0, 1] (N x C x H x W) to logits (N x K), normalization included."""

ALPHA = 0.01
"""Significance level of the verdict: p-value of the top class, corrected for the maximum over K."""
MIN_CLASSES = 5
"""Below this many classes the other classes are too few to be a yardstick (no verdict)."""
NULL_SAMPLES = 20_000
EXACT_MAX_CLASSES = 20
"""Up to this many classes each class is compared with exactly the others (see `robust_z`)."""
_MAD_TO_SD = 1.4826
_QN_TO_SD = 2.2219


# ---- statistics -----------------------------------------------------------------------------------
def robust_z(scores: torch.Tensor, scale: str = "qn") -> torch.Tensor:
    """For each class, ``(s_c - median_{k != c} s_k) / spread_{k != c}``, along the last dim.

    The centre and spread come from the OTHER classes only, so an outlier does not hide itself.
    ``scale`` is the robust spread: ``"qn"`` (default), Rousseeuw and Croux's Qn (2.2219 times the
    first quartile of the pairwise distances; 82% efficient under normality, against 37% for the
    MAD), or ``"mad"`` (1.4826 times the median absolute deviation, Neural Cleanse's). Both stand a
    second outlier among the other classes; with the 9 other classes of a 10-class model, Qn's
    smaller sampling error makes the maximum over classes far less heavy-tailed under the null
    (99% quantile 5.4 against 8.6), i.e. a more powerful test at the same level. A zero spread
    (the other classes all equal) is floored at 1e-6 times the size of the scores. Above
    `EXACT_MAX_CLASSES` classes the centre and spread are those of all classes, by the MAD.
    """
    scores = scores.double()
    k = scores.shape[-1]
    if k < 3:
        raise DataError(f"robust z-scores need at least 3 classes, got {k}.")
    if scale not in ("qn", "mad"):
        raise DataError(f"scale={scale!r}: choose 'qn' or 'mad'.")
    if k > EXACT_MAX_CLASSES:
        # Leaving one class out moves the centre and spread of this many by O(1/K); computed once,
        # with the MAD (Qn's pairwise distances grow as K^2).
        median = _median(scores)
        spread = _median((scores - median.unsqueeze(-1)).abs()) * _MAD_TO_SD
        floor = 1e-6 * (1.0 + scores.abs().amax(dim=-1))
        return (scores - median.unsqueeze(-1)) / torch.maximum(spread, floor).unsqueeze(-1)
    index = torch.arange(k)
    others = torch.stack([index[index != c] for c in range(k)])  # K x (K - 1)
    rest = scores[..., others]  # ... x K x (K - 1)
    median = _median(rest)
    if scale == "qn":
        n = k - 1
        i, j = torch.triu_indices(n, n, 1)
        distances = (rest[..., i] - rest[..., j]).abs().sort(dim=-1).values
        h = n // 2 + 1
        spread = distances[..., h * (h - 1) // 2 - 1] * _QN_TO_SD
    else:
        spread = _median((rest - median.unsqueeze(-1)).abs()) * _MAD_TO_SD
    floor = 1e-6 * (1.0 + rest.abs().amax(dim=-1))
    return (scores - median) / torch.maximum(spread, floor)


def _median(values: torch.Tensor) -> torch.Tensor:
    """The median along the last dim; the mean of the middle two for an even count (torch's
    ``median`` returns the lower one)."""
    ordered = values.sort(dim=-1).values
    n = ordered.shape[-1]
    return (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2


def combine(z_scores: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The detectors' robust z-scores (D x K) into one score per class: their weighted mean."""
    if weights is None:
        return z_scores.mean(dim=0)
    weights = weights.to(z_scores)
    return (weights[:, None] * z_scores).sum(dim=0) / weights.sum()


@functools.lru_cache(maxsize=16)
def _null_maxima(num_classes: int, samples: int, seed: int, scale: str) -> torch.Tensor:
    """Sorted null draws of ``max_c robust_z`` for K independent standard normal scores."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, num_classes, generator=generator, dtype=torch.float64)
    per_draw = num_classes**3 if num_classes <= EXACT_MAX_CLASSES else num_classes
    step = max(1, 20_000_000 // per_draw)  # bounds the memory of the pairwise distances
    maxima = [robust_z(draws[i : i + step], scale).amax(dim=-1) for i in range(0, samples, step)]
    return torch.cat(maxima).sort().values


def max_z_p_value(observed: float, num_classes: int, scale: str = "qn") -> float:
    """P-value of the largest combined robust z-score of ``num_classes`` classes.

    The null hypothesis: no class is special, each detector's K scores are independent draws of one
    normal distribution. The p-value is the share of Monte Carlo draws of the procedure (robust z
    against the other classes, maximum over the K classes) whose result is at least ``observed``,
    so the correction for taking the maximum of K classes is exact rather than a bound. The draws
    treat the detectors as one (perfectly dependent: the mean of equal z-scores is that z-score);
    averaging detectors that are not only shrinks the null's spread, so this is the conservative
    choice when their dependence is unknown. ``NULL_SAMPLES`` seeded draws; the smallest p-value is
    ``1 / (NULL_SAMPLES + 1)``.
    """
    if math.isnan(observed):
        return 1.0
    maxima = _null_maxima(num_classes, NULL_SAMPLES, 0, scale)
    below = int(torch.searchsorted(maxima, torch.tensor(observed, dtype=torch.float64)))
    return (1 + len(maxima) - below) / (1 + len(maxima))


def gamma_fit(values: torch.Tensor, iterations: int = 20) -> tuple[float, float]:
    """Maximum-likelihood (shape, scale) of a gamma distribution (Minka's start, Newton steps)."""
    x = values.double().clamp_min(1e-12)
    mean = x.mean()
    s = (mean.log() - x.log().mean()).clamp_min(1e-12)
    shape = (3 - s + ((s - 3) ** 2 + 24 * s).sqrt()) / (12 * s)
    for _ in range(iterations):
        step = (shape.log() - torch.special.digamma(shape) - s) / (
            1 / shape - torch.special.polygamma(1, shape)
        )
        shape = (shape - step).clamp_min(1e-6)
    return float(shape), float(mean / shape)


def gamma_order_p_value(statistics: torch.Tensor) -> tuple[int, float]:
    """MM-BD's test: (the class with the largest statistic, its p-value).

    A gamma distribution ``F`` is fitted to the other K - 1 statistics; the p-value of the largest,
    ``r_max``, as the maximum of K - 1 null draws is ``1 - F(r_max)^(K-1)``.
    """
    top = int(statistics.argmax())
    others = torch.cat([statistics[:top], statistics[top + 1 :]]).double()
    if float(others.min()) <= 0:  # the gamma lives on positive numbers: shift all alike
        shift = 1e-3 - float(others.min())
        others, r_max = others + shift, float(statistics[top]) + shift
    else:
        r_max = float(statistics[top])
    shape, scale = gamma_fit(others)
    cdf = float(torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), torch.tensor(r_max / scale)))
    return top, 1.0 - cdf ** (len(statistics) - 1)


# ---- detectors -------------------------------------------------------------------------------------
def margins(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logit_c - max_{k != c} logit_k`` for each row's class ``c``."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    rivals = logits.scatter(1, classes[:, None], float("-inf")).amax(dim=1)
    return own - rivals


def _chunks(num_classes: int, per_class: int, max_batch: int) -> Iterator[torch.Tensor]:
    """Consecutive class indices, as many at a time as fit ``max_batch`` images of ``per_class`` each."""
    step = max(1, max_batch // max(1, per_class))
    for start in range(0, num_classes, step):
        yield torch.arange(start, min(num_classes, start + step))


@dataclass
class DetectorOutput:
    """One detector's evidence: its statistic and score per class (higher = more suspicious)."""

    name: str
    statistic: list[float]
    scores: list[float]
    weight: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """What a detector runs on: the model and its normalization (`forward` is the two as ``pixels ->
    logits``; ``model`` itself is for detectors that look inside), its classes and input shape, the
    scan's seed, the defender's clean images when there are any (pixels in [0, 1], on the CPU), and
    ``shared``, where work one detector does and another reuses is kept (the universal triggers, by
    their settings)."""

    model: nn.Module
    normalize: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    input_shape: tuple[int, int, int]
    seed: int
    device: torch.device
    images: torch.Tensor | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def forward(self) -> Forward:
        return _Forward(self.model, self.normalize)

    def generator(self, stream: str) -> torch.Generator:
        """A generator for ``stream`` (a detector's name): the same draws whichever detectors run
        and in whatever order."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(stream.encode()))


@dataclass(frozen=True)
class Detector:
    """A data-free detector: one score per class, higher = more suspicious.

    Subclasses set ``name``, implement `statistic` and, when the statistic's spread over the classes
    is far from normal (e.g. right-skewed), `to_score`. ``weight`` is the detector's share in the
    combined anomaly index (0: computed and reported, not used for the verdict).
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    """True for a detector that only runs on the defender's clean images (``probe.images``)."""
    weight: float = 1.0

    def statistic(self, probe: Probe) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def to_score(self, statistic: torch.Tensor) -> torch.Tensor:
        return statistic

    def run(self, probe: Probe) -> DetectorOutput:
        stat, details = self.statistic(probe)
        stat = stat.detach().double().cpu()
        return DetectorOutput(
            name=self.name,
            statistic=[float(v) for v in stat],
            scores=[float(v) for v in self.to_score(stat)],
            weight=self.weight,
            details={"settings": asdict(self), **details},
        )


@dataclass(frozen=True)
class MaxMargin(Detector):
    """MM-BD's maximum-margin statistic (see the module docstring).

    Attributes:
        restarts: random starts per class; the statistic is the best margin over starts and steps.
        steps: Adam steps per start.
        lr: Adam learning rate on the sigmoid-space variables (pixels = ``sigmoid(z)``).
        max_batch: most images in one forward pass (classes are chunked to fit).
        weight: share in the combined anomaly index; 0 by default (computed and reported with the
            paper's own p-value, not used for the verdict): on the small Fashion-MNIST models of
            ``benchmarks/detection.py`` the unconstrained margin has natural outlier classes as
            large as a backdoor target's (AUROC 0.75 alone), and averaging it in lowers the
            combination's AUROC (0.93 to 0.91) and its detections at p < 0.01 (17 to 12 of 40).

    The paper optimises more starts for longer; these defaults keep a small model's scan to about
    a second on a CPU (a BadNets target's margin separates within tens of steps).
    """

    name: ClassVar[str] = "mm-bd"
    weight: float = 0.0
    restarts: int = 4
    steps: int = 40
    lr: float = 0.1
    max_batch: int = 256

    def statistic(self, probe):
        generator = probe.generator(self.name)
        starts = torch.randn(probe.num_classes, self.restarts, *probe.input_shape, generator=generator)
        best = torch.empty(probe.num_classes, self.restarts)
        for chunk in _chunks(probe.num_classes, self.restarts, self.max_batch):
            z = starts[chunk].flatten(0, 1).to(probe.device).requires_grad_(True)
            classes = chunk.repeat_interleave(self.restarts).to(probe.device)
            optimizer = torch.optim.Adam([z], lr=self.lr)
            top = torch.full((len(z),), float("-inf"), device=probe.device)
            for step in range(self.steps + 1):
                margin = margins(probe.forward(torch.sigmoid(z)), classes)
                top = torch.maximum(top, margin.detach())
                if step == self.steps:
                    break
                optimizer.zero_grad()
                (-margin.sum()).backward()
                optimizer.step()
            best[chunk] = top.view(len(chunk), self.restarts).cpu()
        stat = best.amax(dim=1)
        top_class, p_value = gamma_order_p_value(stat)
        return stat, {"gamma_top_class": top_class, "gamma_p_value": p_value}

    def to_score(self, statistic):
        return statistic.clamp_min(1e-3).log()


@dataclass(frozen=True)
class UniversalTrigger(Detector):
    """The smallest margin one fixed-area trigger per class reaches on every neutral image.

    Attributes:
        area: the mask's L1 size as a share of the pixels (0.1: a tenth of the image, or a blend of
            0.1 over all of it, or anything between).
        images: neutral images (a quarter each: uniform noise, flat grey, smooth noise at 4x4 and
            8x8 upsampled).
        clean_images: with the defender's clean images, this many of them join the neutral ones
            (the first ones of ``probe.images``, which the caller draws stratified over classes): a
            natural class's trigger must then also override real images of the other classes.
        steps: Adam steps.
        lr: Adam learning rate (mask logits and sigmoid-space pattern).
        max_batch: most images in one forward pass (classes are chunked to fit).

    Every class starts from the same trigger (a uniform mask, a grey pattern), so the only random
    choice is the neutral images. The triggers are left in ``probe.shared`` for `TriggerDominance`.
    """

    name: ClassVar[str] = "universal-trigger"
    area: float = 0.1
    images: int = 16
    clean_images: int = 32
    steps: int = 40
    lr: float = 0.1
    max_batch: int = 256

    def statistic(self, probe):
        return self.triggers(probe).strength, {}

    def triggers(self, probe: Probe) -> UniversalTriggers:
        """Each class's trigger and its smallest margin, computed once per settings and probe."""
        key = ("universal-triggers", replace(self, weight=0.0))
        if key in probe.shared:
            return probe.shared[key]
        channels, height, width = probe.input_shape
        base = neutral_images(self.images, probe.input_shape, probe.generator(self.name))
        if probe.images is not None and self.clean_images > 0:
            base = torch.cat([base, probe.images[: self.clean_images].to(base)])
        base = base.to(probe.device)
        budget = self.area * height * width
        masks = torch.empty(probe.num_classes, 1, height, width)
        patterns = torch.empty(probe.num_classes, channels, height, width)
        best = torch.empty(probe.num_classes)
        count = len(base)
        for chunk in _chunks(probe.num_classes, count, self.max_batch):
            n = len(chunk)
            mask_logits = torch.zeros(n, height * width, device=probe.device, requires_grad=True)
            pattern_logits = torch.zeros(n, channels, height, width, device=probe.device, requires_grad=True)
            classes = chunk.repeat_interleave(count).to(probe.device)
            optimizer = torch.optim.Adam([mask_logits, pattern_logits], lr=self.lr)
            for step in range(self.steps + 1):
                mask = (budget * mask_logits.softmax(dim=1)).clamp(max=1).view(n, 1, height, width)
                pattern = torch.sigmoid(pattern_logits)
                margin = margins(probe.forward(stamp(base, mask, pattern)), classes).view(n, count)
                if step == self.steps:
                    break
                optimizer.zero_grad()
                (-margin.sum()).backward()
                optimizer.step()
            best[chunk] = margin.detach().amin(dim=1).cpu()
            masks[chunk], patterns[chunk] = mask.detach().cpu(), pattern.detach().cpu()
        found = UniversalTriggers(masks, patterns, base.cpu(), best)
        probe.shared[key] = found
        return found


@dataclass(frozen=True)
class UniversalTriggers:
    """`UniversalTrigger`'s result: per class a mask (1 x H x W) and pattern (C x H x W), the
    neutral images they were fitted on, and the smallest margin each reached (``strength``)."""

    masks: torch.Tensor
    patterns: torch.Tensor
    images: torch.Tensor
    strength: torch.Tensor


@dataclass(frozen=True)
class TriggerDominance(Detector):
    """Whether a class's universal trigger wins over every other class's universal trigger.

    Each class's trigger (`UniversalTrigger` with the settings ``triggers``; computed once when both
    detectors run with the same settings) is stamped over the neutral
    images already stamped with another class's trigger; the statistic is the smallest margin of
    the class over those images and rivals. A backdoor's trigger overrides whatever the image shows,
    so it also overrides the strongest features the other classes can fit into the same area; a
    naturally easy class's trigger does not dominate the others that way. Forward passes only.

    Attributes:
        rivals: compare with at most this many other classes, those whose own triggers reached the
            largest margins (all of them below 21 classes), to bound the cost on many classes.
        max_batch: most images in one forward pass.
    """

    name: ClassVar[str] = "trigger-dominance"
    triggers: UniversalTrigger = UniversalTrigger()
    rivals: int = 20
    max_batch: int = 256

    def statistic(self, probe):
        found = self.triggers.triggers(probe)  # shared with `UniversalTrigger` when its settings match
        masks, patterns = found.masks.to(probe.device), found.patterns.to(probe.device)
        base = found.images.to(probe.device)
        num_classes, images = probe.num_classes, len(base)
        order = found.strength.argsort(descending=True)
        worst = torch.full((num_classes,), float("inf"))
        with torch.no_grad():
            for rival in order[: self.rivals + 1].tolist():
                covered = stamp(base, masks[rival : rival + 1], patterns[rival : rival + 1])
                for chunk in _chunks(num_classes, images, self.max_batch):
                    chunk = chunk[chunk != rival]
                    if not len(chunk):
                        continue
                    classes = chunk.repeat_interleave(images).to(probe.device)
                    margin = margins(probe.forward(stamp(covered, masks[chunk], patterns[chunk])), classes)
                    worst[chunk] = torch.minimum(
                        worst[chunk], margin.view(len(chunk), images).amin(dim=1).cpu()
                    )
        return worst, {}


@dataclass(frozen=True)
class NeuronCollapse(Detector):
    """ANP's neuron-noise collapse test, on the defender's clean images (needs data).

    Under small adversarial noise on every normalization neuron (ANP's: a random start in
    [-eps, eps], one signed ascent step on the cross-entropy against the model's own predictions),
    a backdoored model sends clean images of every class to its target (Wu & Wang, NeurIPS 2021,
    Fig. 1; CNP infers its target this way, `hubdefend.target.infer_target`, which this reuses).
    The statistic is the share of the images that the noise moves into each class: predictions
    under noise minus predictions without, over the number of images.

    Weight 0 by default (reported, not used for the verdict): on the small Fashion-MNIST models of
    ``benchmarks/detection.py`` clean models collapse too, each into a class of its own (robust z
    up to 58 on clean models, AUROC 0.61 alone; no better at eps 0.05 to 0.3), so the share alone
    does not tell a backdoor from a model's natural sink class. A model without normalization
    neurons gets zeros (no evidence) and a note.

    Attributes:
        eps: the noise budget (ANP's 0.4).
        images: use at most this many of the clean images.
        batch_size: images per forward pass (one noise draw and ascent step per batch).
    """

    name: ClassVar[str] = "neuron-collapse"
    needs_data: ClassVar[bool] = True
    weight: float = 0.0
    eps: float = 0.4
    images: int = 500
    batch_size: int = 128

    def statistic(self, probe):
        from hubdefend.adapters import discover
        from hubdefend.target import infer_target
        from hubdefend.training import make_accelerator

        groups = discover(probe.model)
        if not groups:
            note = "no normalization neurons found to perturb"
            return torch.zeros(probe.num_classes, dtype=torch.float64), {"note": note}
        pixels = probe.images[: self.images]
        seed = int(torch.randint(2**31 - 1, (1,), generator=probe.generator(self.name)))
        evidence = infer_target(
            probe.model,
            groups,
            torch.utils.data.TensorDataset(pixels, torch.zeros(len(pixels), dtype=torch.long)),
            normalize=probe.normalize,
            num_classes=probe.num_classes,
            accelerator=make_accelerator(),
            eps=self.eps,
            batch_size=self.batch_size,
            seed=seed,
        )
        growth = torch.tensor(evidence.growth, dtype=torch.float64) / len(pixels)
        return growth, {"counts_clean": evidence.counts_clean, "counts_noisy": evidence.counts_noisy}


def stamp(images: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Every trigger on every image: ``(1 - m) * x + m * p``, triggers-major (T*N x C x H x W)."""
    triggers, count = len(masks), len(images)
    mask = masks.repeat_interleave(count, 0)
    return (1 - mask) * images.repeat(triggers, 1, 1, 1) + mask * patterns.repeat_interleave(count, 0)


def neutral_images(count: int, input_shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """Images that show no class: uniform noise, flat grey, smooth noise (4x4 and 8x8 upsampled)."""
    channels, height, width = input_shape
    quarter = max(1, count // 4)
    noise = torch.rand(quarter, *input_shape, generator=generator)
    grey = torch.rand(quarter, 1, 1, 1, generator=generator).expand(quarter, *input_shape)
    coarse = torch.rand(quarter, channels, 4, 4, generator=generator)
    fine = torch.rand(max(0, count - 3 * quarter), channels, 8, 8, generator=generator)
    smooth = [
        F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        for low in (coarse, fine)
    ]
    return torch.cat([noise, grey, *smooth])[:count].contiguous()


DETECTORS: dict[str, type[Detector]] = {
    cls.name: cls for cls in (UniversalTrigger, TriggerDominance, MaxMargin, NeuronCollapse)
}
DEFAULT_DETECTORS = ("universal-trigger", "trigger-dominance", "mm-bd")
"""Without data."""
DATA_DETECTORS = (*DEFAULT_DETECTORS, "neuron-collapse")
"""With the defender's clean images (the universal triggers are fitted on them too)."""


# ---- the verdict -----------------------------------------------------------------------------------
@dataclass
class DetectionResult:
    """The verdict and its evidence; ``to_dict()`` goes into the scan's ``detection``. ``method``
    is ``"data-free"`` or, with the defender's clean images, ``"clean-data"``."""

    suspected_target: int | None
    top_class: int
    anomaly_index: list[float]
    p_value: float
    alpha: float
    detectors: list[DetectorOutput]
    seconds: float
    note: str | None = None
    method: str = "data-free"
    images: int = 0

    @property
    def suspected(self) -> bool:
        return self.suspected_target is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "images": self.images,
            "detectors": {
                d.name: {k: v for k, v in asdict(d).items() if k != "name"} for d in self.detectors
            },
            "anomaly_index": self.anomaly_index,
            "top_class": self.top_class,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "suspected_target": self.suspected_target,
            "seconds": round(self.seconds, 2),
            **({"note": self.note} if self.note else {}),
        }


class _Forward:
    """``pixels -> logits`` with the model's normalization (float32 logits)."""

    def __init__(self, model: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model, self.normalize = model, normalize

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(self.normalize(pixels))).float()


def detect_backdoor(
    model: nn.Module,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    images: torch.Tensor | None = None,
    detectors: tuple[Detector | str, ...] | None = None,
    alpha: float = ALPHA,
    scale: str = "qn",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> DetectionResult:
    """Run the detectors and decide (see the module docstring).

    Args:
        model: a classifier (timm, transformers or any module returning logits); left as it was.
        normalize: the model's input normalization, applied to pixels in [0, 1].
        num_classes: K, the number of classes.
        input_shape: ``(channels, height, width)`` of the model's input.
        images: the defender's clean images, if any (N x C x H x W pixels in [0, 1], unlabelled;
            best stratified over classes): the universal triggers are then fitted on them too, and
            detectors that need data (`NeuronCollapse`) run.
        detectors: detector instances or names in `DETECTORS`; default `DEFAULT_DETECTORS`, or
            `DATA_DETECTORS` with ``images``.
        alpha: a backdoor is suspected when the top class's corrected p-value is below this.
        scale: the robust spread of the z-scores, ``"qn"`` or ``"mad"`` (see `robust_z`).
        seed: seeds every random start (same seed, same scores on the same machine).
        device: where to optimise; default CUDA when available, else CPU.
    """
    if num_classes < 3:
        raise DataError(f"Detection compares classes with each other; this model has {num_classes}.")
    if detectors is None:
        detectors = DEFAULT_DETECTORS if images is None else DATA_DETECTORS
    unknown = [d for d in detectors if isinstance(d, str) and d not in DETECTORS]
    if unknown:
        raise DataError(f"Unknown detector(s) {unknown}; choose from {sorted(DETECTORS)}.")
    chosen = [DETECTORS[d]() if isinstance(d, str) else d for d in detectors]
    if not any(d.weight > 0 for d in chosen):
        raise DataError("At least one detector needs a positive weight to decide.")
    if images is None and any(d.needs_data for d in chosen):
        names = [d.name for d in chosen if d.needs_data]
        raise DataError(f"The detector(s) {names} need clean images: pass images=, or leave them out.")
    if images is not None:
        images = images.detach().float().cpu()
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(input_shape) or not len(images):
            raise DataError(
                f"images must be N x {' x '.join(map(str, input_shape))} pixels in [0, 1], "
                f"got shape {tuple(images.shape)}."
            )
    device = torch.device(device) if device is not None else _default_device()
    started = time.perf_counter()
    outputs = []
    with frozen_on(model, device):
        probe = Probe(model, normalize, num_classes, tuple(input_shape), seed, device, images)
        for detector in chosen:  # each draws from its own stream: the order does not matter
            outputs.append(detector.run(probe))
    z = robust_z(torch.tensor([o.scores for o in outputs], dtype=torch.float64), scale)
    for output, row in zip(outputs, z, strict=True):
        output.details["robust_z"] = [round(float(v), 4) for v in row]
    combined = combine(z, torch.tensor([o.weight for o in outputs], dtype=torch.float64))
    top = int(combined.argmax())
    p_value = max_z_p_value(float(combined[top]), num_classes, scale)
    note = None
    if num_classes < MIN_CLASSES:
        note = f"{num_classes} classes are too few to compare with each other: no verdict."
        p_value = 1.0
    return DetectionResult(
        suspected_target=top if p_value < alpha else None,
        top_class=top,
        anomaly_index=[round(float(v), 4) for v in combined],
        p_value=p_value,
        alpha=alpha,
        detectors=outputs,
        seconds=time.perf_counter() - started,
        note=note,
        method="data-free" if images is None else "clean-data",
        images=0 if images is None else len(images),
    )


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
