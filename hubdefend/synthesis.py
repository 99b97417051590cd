"""Data-free input synthesis: images made from the model alone (model inversion).

For a model with BatchNorm layers this follows DeepInversion ("Dreaming to Distill", Yin et al.,
CVPR 2020; its code is non-commercial, so this is our own implementation). A batch of images is
optimised in PIXEL space: ``pixels = sigmoid(z)`` keeps them in [0, 1], and the model's own
normalization is applied inside the forward, exactly as for real images. The loss is

    ce_weight * CE(f(x), prior label)
    + bn_weight * sum_l m_l (||mu_l(x) - running_mean_l||_2 / ||running_std_l||_2
                             + ||var_l(x) - running_var_l||_2 / ||running_var_l||_2)
    + tv_weight * TV(x) + l2_weight * mean(normalize(x)^2)

where ``mu_l, var_l`` are the per-channel statistics of the batch ENTERING the l-th layer that keeps
running statistics (forward pre-hooks), ``m_l`` is ``first_bn_multiplier`` for the first such layer
and 1 after, and the prior labels are assigned round-robin over the classes, so the set is
class-balanced. DeepInversion's distance is not divided by the layer's scale; undivided, the deep
layers of our ResNet-18 (running variances in the hundreds) outweighed the class prior a hundredfold
and the images ended at CE 22 toward their labels. DeepInversion's random shifts and flips are
options (``jitter``, ``flip``), off by default: on a stride-32 ResNet-18 at 32 px a 2-pixel shift
kept the cross-entropy above 19 after 30 steps (1.3 without), and models trained without flips do
not see a flipped image as the same class.

A model without running statistics (a ViT, a LayerNorm / GroupNorm network) has nothing to match:
synthesis then falls back to the class prior and the image priors alone, warns, and says so in
`SynthesisFacts.prior`.

The optimisation is not sharded: under ``accelerate launch`` every process runs the same seeded
synthesis and ends with the same images (the way `hubdefend.inversion` treats triggers).

Used by the data-free defenses (`hubdefend.defenses.dbrpu`) and by the checks that need images
when the user has none.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from hubdefend.errors import DataError
from hubdefend.training import frozen_on, logits_of, make_accelerator, progress_bar, release_optimizer

Normalize = Callable[[torch.Tensor], torch.Tensor]
_EPS = 1e-6


class NoRunningStatisticsWarning(UserWarning):
    """The model keeps no running statistics, so synthesis uses the class and image priors only."""


@dataclass(frozen=True)
class SynthesisConfig:
    """How images are synthesised. Defaults: DeepInversion's, shrunk to run in seconds on a CPU.

    DeepInversion's published settings: Adam (betas 0.5, 0.9) at lr 0.05 to 0.25, 2000 to 20k steps
    per batch of 152 to 256 images, BN weight 0.01 (ImageNet) to 10 (CIFAR-10), first BN layer
    weighted 10x, TV-L2 about 1e-4 and L2 1e-5 on the normalised input, jitter 30 px at 224 (2 px at
    32) and random flips. Deviations: 200 steps per batch instead of 2000 and batches of 128 (CPU
    time); the statistics distance divided by each layer's scale, hence weight 1 (see the module
    docstring); no jitter or flips by default (ditto); the TV term is the MEAN squared difference of
    neighbouring pixels (scale-free across image sizes), hence a larger weight; images are
    optimised in pixel space through a sigmoid rather than in normalised space.

    Attributes:
        steps: Adam steps per batch.
        lr: Adam learning rate on the sigmoid logits of the pixels.
        betas: Adam betas.
        batch_size: images optimised together (the BN statistics are those of one batch).
        ce_weight: weight of the cross-entropy toward the prior label.
        bn_weight: weight of the running-statistics term.
        first_bn_multiplier: extra weight of the first layer with running statistics.
        tv_weight: weight of the total-variation prior (mean squared neighbour difference).
        l2_weight: weight of the L2 prior on the normalised input.
        jitter: largest random shift, in pixels, applied (by rolling) at each step.
        flip: randomly flip the batch left-right at each step.
        init_scale: std of the Gaussian init of the sigmoid logits (0: a grey start).
        parametrization: ``"sigmoid"`` (pixels = sigmoid(free variables)) or ``"clip"`` (the pixels
            themselves, clamped to [0, 1] after each step).
    """

    steps: int = 200
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 128
    ce_weight: float = 1.0
    bn_weight: float = 1.0
    first_bn_multiplier: float = 10.0
    tv_weight: float = 1.0
    l2_weight: float = 1e-5
    jitter: int = 0
    flip: bool = False
    init_scale: float = 1.0
    parametrization: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise DataError(
                f"synthesis steps={self.steps}, batch_size={self.batch_size}: give steps >= 0, batch_size >= 1."
            )
        if self.parametrization not in ("sigmoid", "clip"):
            raise DataError(
                f"synthesis parametrization={self.parametrization!r}: choose 'sigmoid' or 'clip'."
            )
        if self.jitter < 0:
            raise DataError(f"synthesis jitter={self.jitter}: give a shift of 0 or more pixels.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SynthesisFacts:
    """What happened during synthesis, for reports.

    Attributes:
        images: number of images made.
        prior: ``"batchnorm"`` (running statistics matched) or ``"none"`` (the model keeps none:
            class and image priors only).
        statistics_layers: layers whose running statistics were matched.
        steps: Adam steps per batch.
        initial_bn_loss: the (scale-divided) running-statistics distance of the random start
            (first batch).
        final_bn_loss: the same distance after optimisation (mean over batches, without the
            first-layer multiplier or jitter).
        final_ce: cross-entropy of the final images toward their prior labels.
        prior_accuracy: share of the final images the model classifies as their prior label.
        seconds: wall time.
        warnings: what the caller should know (e.g. no running statistics).
    """

    images: int
    prior: str
    statistics_layers: int
    steps: int
    initial_bn_loss: float | None
    final_bn_loss: float | None
    final_ce: float
    prior_accuracy: float
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SyntheticData(torch.utils.data.Dataset):
    """Synthesised ``(pixels, label)`` pairs: pixels in [0, 1] at the model's input size, labels the
    class prior each image was optimised toward.

    Attributes:
        pixels: ``N x C x H x W`` float tensor on the CPU.
        labels: ``N`` long tensor.
        facts: the `SynthesisFacts`.
        config: the `SynthesisConfig` used.
    """

    def __init__(
        self, pixels: torch.Tensor, labels: torch.Tensor, facts: SynthesisFacts, config: SynthesisConfig
    ) -> None:
        self.pixels = pixels
        self.labels = labels
        self.facts = facts
        self.config = config

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels[index], int(self.labels[index])


# --- running statistics -------------------------------------------------------------------------


def running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every layer that keeps per-channel running mean and variance
    (BatchNorm of any dimension, timm's ``BatchNormAct2d``, SyncBatchNorm, ...), in module order."""
    layers = []
    for name, module in model.named_modules():
        mean = getattr(module, "running_mean", None)
        var = getattr(module, "running_var", None)
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.ndim == 1:
            layers.append((name, module))
    return layers


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and biased variance of a norm layer's input, in float32."""
    x = x.float()
    dims = [d for d in range(x.ndim) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


class _StatisticsHooks:
    """Forward pre-hooks recording the per-channel moments entering each given layer."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        self.layers = list(layers)
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @contextlib.contextmanager
    def attached(self) -> Iterator[_StatisticsHooks]:
        try:
            for name, module in self.layers:
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.moments = {}

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            self.moments[name] = _channel_moments(args[0])

        return record

    def loss(self, first_multiplier: float = 1.0) -> torch.Tensor:
        """Sum over layers of ``||mu - running_mean||_2 / ||running_std||_2 + ||var - running_var||_2
        / ||running_var||_2``: DeepInversion's distance, divided by the layer's own scale so that
        every layer (and every model) weighs alike."""
        total = None
        for index, (name, module) in enumerate(self.layers):
            if name not in self.moments:
                continue  # a layer this forward did not reach (e.g. an unused branch)
            mean, var = self.moments[name]
            running_var = module.running_var.float()
            distance = torch.linalg.vector_norm(mean - module.running_mean.float()) / (
                running_var.sum().sqrt() + _EPS
            ) + torch.linalg.vector_norm(var - running_var) / (torch.linalg.vector_norm(running_var) + _EPS)
            distance = distance * (first_multiplier if index == 0 else 1.0)
            total = distance if total is None else total + distance
        if total is None:
            return torch.zeros(())
        return total


@torch.no_grad()
def norm_input_statistics(
    model: nn.Module,
    pixels: torch.Tensor,
    *,
    normalize: Normalize,
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
    accelerator: Accelerator | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (biased) variance of the input of every running-statistics layer over
    a whole set of images, accumulated batch by batch (BNP's "batch statistics" over the set).

    Args:
        model: the model (run in eval mode; its mode is restored).
        pixels: ``N x C x H x W`` images in [0, 1].
        normalize: the model's normalization, applied before the forward.
        layers: only these layer paths (default: every `running_stat_layers` layer).
        batch_size: images per forward.
        accelerator: for device placement and autocast.

    Returns:
        ``{layer path: (mean, var)}``, float32 CPU tensors, for the layers the forward reached.
    """
    accelerator = make_accelerator(accelerator)
    chosen = running_stat_layers(model)
    if layers is not None:
        wanted = set(layers)
        chosen = [(n, m) for n, m in chosen if n in wanted]
    sums: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].double()
            dims = [d for d in range(x.ndim) if d != 1]
            count = x.numel() // x.shape[1]
            total, square = x.sum(dim=dims), x.square().sum(dim=dims)
            if name in sums:
                sums[name][0] += total
                sums[name][1] += square
                counts[name] += count
            else:
                sums[name], counts[name] = [total, square], count

        return hook

    with frozen_on(model, accelerator.device):
        handles = [m.register_forward_pre_hook(record(n)) for n, m in chosen]
        try:
            for start in range(0, len(pixels), batch_size):
                batch = pixels[start : start + batch_size].to(accelerator.device)
                with accelerator.autocast():
                    model(normalize(batch))
        finally:
            for handle in handles:
                handle.remove()
    stats = {}
    for name, (total, square) in sums.items():
        mean = total / counts[name]
        var = (square / counts[name] - mean.square()).clamp_min(0)
        stats[name] = (mean.float().cpu(), var.float().cpu())
    return stats


# --- image priors ---------------------------------------------------------------------------------


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of horizontally and vertically neighbouring pixels."""
    dx = pixels[..., :, 1:] - pixels[..., :, :-1]
    dy = pixels[..., 1:, :] - pixels[..., :-1, :]
    return dx.square().mean() + dy.square().mean()


def _jitter(pixels: torch.Tensor, shift: tuple[int, int], flip: bool) -> torch.Tensor:
    if shift != (0, 0):
        pixels = torch.roll(pixels, shifts=shift, dims=(-2, -1))
    return pixels.flip(-1) if flip else pixels


# --- synthesis ------------------------------------------------------------------------------------


def synthesize(
    model: nn.Module,
    *,
    num_classes: int,
    normalize: Normalize | None = None,
    image_size: tuple[int, int, int] | None = None,
    preprocessing: Any = None,
    n: int = 256,
    seed: int = 0,
    config: SynthesisConfig | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    **options: Any,
) -> SyntheticData:
    """Synthesise ``n`` class-balanced images from ``model`` alone.

    Args:
        model: a classifier (timm, transformers or torch). Its weights, buffers, train/eval modes,
            ``requires_grad`` flags and device are left as they were.
        num_classes: classes to spread the prior labels over (image ``i`` gets class ``i % K``).
        normalize: the model's normalization (pixels in [0, 1] -> model input); with
            ``preprocessing``, its ``normalize``.
        image_size: ``(C, H, W)``; with ``preprocessing``, its ``input_size``.
        preprocessing: a `hubdefend.preprocess.Preprocessing` supplying both of the above.
        n: number of images.
        seed: seeds the initial images and the jitter; the same seed gives the same images.
        config: a `SynthesisConfig`; ``options`` override its fields (e.g. ``steps=50``).
        accelerator: an `accelerate.Accelerator` (device and mixed precision); built when not given.
        progress: show a progress bar (main process only).

    Returns:
        A `SyntheticData` of ``(pixels, label)`` pairs with its `SynthesisFacts`.

    Raises:
        DataError: no normalization or image size was given, ``n`` or ``num_classes`` is below 1, or
            an option is unknown.
    """
    started = time.perf_counter()
    config = _config_with(config, options)
    if preprocessing is not None:
        normalize = normalize or preprocessing.normalize
        image_size = image_size or tuple(preprocessing.input_size)
    if normalize is None or image_size is None:
        raise DataError(
            "synthesize needs the model's normalization and input size: pass preprocessing="
            "Preprocessing.from_model(model), or normalize=... and image_size=(C, H, W)."
        )
    if n < 1 or num_classes < 1:
        raise DataError(f"synthesize: n={n} and num_classes={num_classes} must both be at least 1.")
    accelerator = make_accelerator(accelerator)
    layers = running_stat_layers(model)
    notes: list[str] = []
    if not layers:
        message = (
            f"{type(model).__name__} keeps no BatchNorm running statistics: synthetic images follow the "
            "class prior and the image priors only, so they are less natural than DeepInversion's."
        )
        warnings.warn(message, NoRunningStatisticsWarning, stacklevel=2)
        notes.append(message)
    labels = torch.arange(n) % num_classes
    generator = torch.Generator().manual_seed(seed)
    hooks = _StatisticsHooks(layers)
    batches, bn_losses, ces = [], [], []
    initial_bn = None
    with (
        frozen_on(model, accelerator.device),
        hooks.attached(),
        progress_bar(accelerator, enabled=progress) as bar,
    ):
        task = bar.add_task("synthesize", total=math.ceil(n / config.batch_size) * config.steps, status="")
        for start in range(0, n, config.batch_size):
            batch_labels = labels[start : start + config.batch_size]
            pixels, first_bn = _optimise_batch(
                model, batch_labels, tuple(image_size), normalize, config, accelerator, generator, hooks, bar, task
            )  # fmt: skip
            if initial_bn is None:
                initial_bn = first_bn
            bn_loss, ce, _ = _evaluate_batch(model, pixels, batch_labels, normalize, accelerator, hooks)
            batches.append(pixels.cpu())
            bn_losses.append(bn_loss)
            ces.append(ce)
        all_pixels = torch.cat(batches)
        predictions = _predict(model, all_pixels, normalize, accelerator, config.batch_size)
    facts = SynthesisFacts(
        images=n,
        prior="batchnorm" if layers else "none",
        statistics_layers=len(layers),
        steps=config.steps,
        initial_bn_loss=initial_bn if layers else None,
        final_bn_loss=sum(bn_losses) / len(bn_losses) if layers else None,
        final_ce=sum(ces) / len(ces),
        prior_accuracy=(predictions == labels).float().mean().item(),
        seconds=round(time.perf_counter() - started, 2),
        warnings=notes,
    )
    return SyntheticData(all_pixels, labels, facts, config)


def _config_with(config: SynthesisConfig | None, options: dict[str, Any]) -> SynthesisConfig:
    config = config or SynthesisConfig()
    unknown = sorted(set(options) - set(SynthesisConfig.__dataclass_fields__))
    if unknown:
        raise DataError(
            f"synthesize has no option(s) {', '.join(unknown)}. Its options: "
            f"{', '.join(sorted(SynthesisConfig.__dataclass_fields__))}."
        )
    return replace(config, **options)


def _optimise_batch(
    model: nn.Module,
    labels: torch.Tensor,
    image_size: tuple[int, int, int],
    normalize: Normalize,
    config: SynthesisConfig,
    accelerator: Accelerator,
    generator: torch.Generator,
    hooks: _StatisticsHooks,
    bar,
    task,
) -> tuple[torch.Tensor, float | None]:
    """One batch of DeepInversion; returns the pixels and the random start's statistics distance."""
    device = accelerator.device
    # Drawn on the CPU from the seeded generator: the same images on every device.
    init = torch.randn((len(labels), *image_size), generator=generator) * config.init_scale
    sigmoid = config.parametrization == "sigmoid"
    if not sigmoid:
        init = torch.sigmoid(init)  # the same starting images as the sigmoid parametrization
    logits_var = init.to(device).requires_grad_(True)
    targets = labels.to(device)
    optimizer = accelerator.prepare_optimizer(
        torch.optim.Adam([logits_var], lr=config.lr, betas=config.betas), device_placement=False
    )
    initial_bn = None
    try:
        for step in range(config.steps):
            shift = tuple(
                int(v) for v in torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator)
            )
            flip = bool(config.flip and torch.rand((), generator=generator) < 0.5)
            pixels = torch.sigmoid(logits_var) if sigmoid else logits_var
            with accelerator.autocast():
                logits = logits_of(model(normalize(_jitter(pixels, shift, flip))))
            bn_loss = hooks.loss(config.first_bn_multiplier).to(device)
            if step == 0 and hooks.layers:
                initial_bn = float(hooks.loss(1.0).detach())
            ce = F.cross_entropy(logits.float(), targets)
            prior = (
                config.tv_weight * total_variation(pixels)
                + config.l2_weight * normalize(pixels).square().mean()
            )
            loss = config.ce_weight * ce + config.bn_weight * bn_loss + prior
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            if not sigmoid:
                with torch.no_grad():
                    logits_var.clamp_(0.0, 1.0)
            bar.update(task, advance=1, status=f"ce={ce.item():.3f} bn={float(bn_loss.detach()):.3f}")
    finally:
        release_optimizer(accelerator, optimizer)
    pixels = torch.sigmoid(logits_var.detach()) if sigmoid else logits_var.detach().clone()
    return pixels, initial_bn


@torch.no_grad()
def _evaluate_batch(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    normalize: Normalize,
    accelerator: Accelerator,
    hooks: _StatisticsHooks,
) -> tuple[float, float, torch.Tensor]:
    with accelerator.autocast():
        logits = logits_of(model(normalize(pixels.to(accelerator.device)))).float()
    bn_loss = float(hooks.loss(1.0))
    ce = F.cross_entropy(logits, labels.to(logits.device)).item()
    return bn_loss, ce, logits.argmax(1).cpu()


@torch.no_grad()
def _predict(
    model: nn.Module, pixels: torch.Tensor, normalize: Normalize, accelerator: Accelerator, batch_size: int
) -> torch.Tensor:
    out = []
    for start in range(0, len(pixels), batch_size):
        with accelerator.autocast():
            logits = logits_of(model(normalize(pixels[start : start + batch_size].to(accelerator.device))))
        out.append(logits.argmax(1).cpu())
    return torch.cat(out)
