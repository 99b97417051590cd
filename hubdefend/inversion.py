"""Neural Cleanse-style trigger reverse engineering (Wang et al., IEEE S&P 2019; reference code
bolunwang/backdoor, ``visualizer.py`` and ``mad_outlier_detection.py``).

For a class ``t``, find the smallest mask ``m`` (H x W) and pattern ``p`` (C x H x W) such that clean
images stamped as ``x' = (1 - m) * x + m * p`` are classified as ``t``: minimise
``CE(f(normalize(x')), t) + cost * |m|_1``. A class that needs an abnormally small mask is a backdoor
target: its L1 norm is a low-side outlier by the MAD anomaly index (> 2). CNP and MCLDef reuse the
same optimisation for one class, with their own settings (`InversionConfig.cnp`).

Triggers live on pixels in [0, 1]; the model's own normalization is applied after the stamp, as in
the reference ("mask operation in raw domain").

The data is not sharded across processes: under ``accelerate launch`` every process runs the same
seeded optimisation over all of the defender data and ends with the same trigger.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.progress import Progress, TaskID
from torch import nn

from hubdefend.errors import DataError
from hubdefend.training import frozen_on, logits_of, make_accelerator, progress_bar, release_optimizer

Normalize = Callable[[torch.Tensor], torch.Tensor]

# The reference maps masks and patterns into tanh space with arctanh((v - 0.5) * (2 - eps)); the
# eps keeps arctanh finite for a random init that touches 0 or 1.
_TANH_EPS = 1e-7


@dataclass(frozen=True)
class InversionConfig:
    """Settings of one trigger inversion; the defaults follow the Neural Cleanse reference.

    Reference values (``Visualizer`` class defaults and ``gtsrb_visualize_example.py``): Adam lr 0.1,
    betas (0.5, 0.9); mask and pattern through ``tanh / 2 + 0.5`` from a uniform random init; batch
    32; an "epoch" is ``NB_SAMPLE / BATCH_SIZE`` = 31 mini-batches; up to ``STEPS`` = 1000 epochs;
    ``INIT_COST`` 1e-3 with the cost reset to 0 until ``patience`` epochs reach the success threshold
    0.99; then, after ``patience`` (5 in the example, 10 in the class) epochs at or above it, the cost
    is multiplied by ``COST_MULTIPLIER`` (1.5 in the class, 2 in the example), after ``patience``
    epochs below it divided by ``COST_MULTIPLIER ** 1.5``; early stop once the best norm has not
    improved (by the factor ``early_stop_threshold``) for ``early_stop_patience`` (5 * patience = 25)
    epochs, but only after the cost went both up and down; the smallest mask seen at or above the
    threshold is kept, else the last one.

    Deviations of these defaults, all for CPU speed: ``epochs`` 40 instead of 1000;
    ``early_stop_patience`` 10 instead of 25; ``batch_size`` 128 instead of 32 (4x fewer optimizer
    steps per epoch: small steps are slow on shared CPUs; `neural_cleanse` restores 32); an epoch is one pass over the defender data
    (``batches_per_epoch=None``) rather than 31 batches drawn from an endless generator. Also by
    design: the success rate driving the schedule is counted over images whose label is not the
    target, when labels are known (the reference counts all images); the best mask is compared by
    its own L1 norm at the end of the epoch (the reference uses the epoch's mean norm).

    Attributes:
        lr: Adam learning rate.
        betas: Adam betas.
        init_cost: weight of the mask L1 term (the fixed lambda when ``cost_schedule`` is off).
        reset_cost_to_zero: start at cost 0 and switch to ``init_cost`` after ``patience`` successful
            epochs (reference default), so that a working trigger is found before it is shrunk.
        cost_schedule: adapt the cost to the success rate (Neural Cleanse); off: fixed ``init_cost``.
        cost_multiplier_up: factor applied after ``patience`` successful epochs.
        cost_multiplier_down: divisor applied after ``patience`` unsuccessful epochs.
        patience: epochs counted before the cost changes.
        success_threshold: success rate at which a reversed trigger counts as working.
        early_stop: stop once the best norm stalls (see ``early_stop_patience``).
        early_stop_threshold: an epoch improves the best norm only if it falls below this fraction
            of the previous best.
        early_stop_patience: epochs without improvement before stopping.
        epochs: most epochs to run.
        batches_per_epoch: batches per epoch drawn round-robin from the data; None: one pass.
        batch_size: batch size when ``data`` is a dataset (a DataLoader keeps its own).
        parametrization: ``"tanh"`` (Neural Cleanse: unconstrained variables through tanh) or
            ``"clip"`` (CNP: the values themselves, clamped to [0, 1] after each step).
        keep: ``"best"`` (smallest working mask, Neural Cleanse) or ``"last"`` (CNP).
    """

    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    reset_cost_to_zero: bool = True
    cost_schedule: bool = True
    cost_multiplier_up: float = 1.5
    cost_multiplier_down: float = 1.5**1.5
    patience: int = 5
    success_threshold: float = 0.99
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 10
    epochs: int = 40
    batches_per_epoch: int | None = None
    batch_size: int = 128
    parametrization: Literal["tanh", "clip"] = "tanh"
    keep: Literal["best", "last"] = "best"

    def __post_init__(self) -> None:
        if self.parametrization not in ("tanh", "clip"):
            raise DataError(f"parametrization={self.parametrization!r}: choose 'tanh' or 'clip'.")
        if self.keep not in ("best", "last"):
            raise DataError(f"keep={self.keep!r}: choose 'best' or 'last'.")
        if self.epochs < 1 or self.batch_size < 1 or (self.batches_per_epoch or 1) < 1:
            raise DataError("epochs, batch_size and batches_per_epoch must be at least 1.")

    @classmethod
    def neural_cleanse(cls, **overrides: Any) -> InversionConfig:
        """The reference's full budget: 1000 epochs of 31 batches of 32, early-stop patience 25."""
        return replace(
            cls(epochs=1000, batches_per_epoch=31, batch_size=32, early_stop_patience=25), **overrides
        )

    @classmethod
    def cnp(cls, **overrides: Any) -> InversionConfig:
        """CNP's inversion (``optimize_mask_CL.py``, ``inversion``): Adam lr 0.005 with PyTorch's
        default betas, fixed lambda 0.01, 20 epochs, batch 128, mask and pattern clamped to [0, 1]
        rather than tanh-parametrised, the last trigger kept. CNP's early stop (30 epochs without a
        new minimum) cannot fire within 20 epochs, so it is off. The reference draws 5 passes of the
        defender data with replacement per epoch; here an epoch is one pass unless
        ``batches_per_epoch`` says otherwise.
        """
        preset = cls(
            lr=0.005,
            betas=(0.9, 0.999),
            init_cost=0.01,
            reset_cost_to_zero=False,
            cost_schedule=False,
            early_stop=False,
            epochs=20,
            batch_size=128,
            parametrization="clip",
            keep="last",
        )
        return replace(preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, for reports."""
        return asdict(self)


@dataclass
class ReversedTrigger:
    """A reversed trigger for one class: ``x' = (1 - mask) * x + mask * pattern`` on pixels.

    Attributes:
        target: the class the trigger sends images to.
        mask: H x W, values in [0, 1], on the CPU.
        pattern: C x H x W, values in [0, 1], on the CPU.
        l1_norm: the mask's L1 norm (sum over H x W), Neural Cleanse's detection statistic.
        attack_success: share of the data (images not of ``target`` when labels are known) that the
            kept trigger sends to ``target``, measured after the optimisation.
        reached_threshold: whether any epoch reached the success threshold (else the last mask was
            kept, as the reference does).
        epochs_run: epochs run before the end or the early stop.
        final_cost: the cost (L1 weight) at the end of the optimisation.
    """

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    l1_norm: float
    attack_success: float
    reached_threshold: bool = True
    epochs_run: int = 0
    final_cost: float = 0.0

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on ``pixels`` (N x C x H x W or C x H x W, any device and float dtype).

        Raises:
            DataError: the images' size differs from the trigger's.
        """
        if tuple(pixels.shape[-3:]) != tuple(self.pattern.shape):
            raise DataError(
                f"The trigger is {tuple(self.pattern.shape)} (C x H x W) but the images are "
                f"{tuple(pixels.shape[-3:])}: resize the images to the size the trigger was reversed at."
            )
        mask = self.mask.to(device=pixels.device, dtype=pixels.dtype)
        pattern = self.pattern.to(device=pixels.device, dtype=pixels.dtype)
        return (1 - mask) * pixels + mask * pattern

    __call__ = apply

    def to_dict(self, *, include_tensors: bool = False) -> dict[str, Any]:
        """Summary as plain data; the mask and pattern as nested lists only when asked."""
        summary: dict[str, Any] = {
            "target": self.target,
            "l1_norm": self.l1_norm,
            "attack_success": self.attack_success,
            "reached_threshold": self.reached_threshold,
            "epochs_run": self.epochs_run,
            "final_cost": self.final_cost,
            "shape": list(self.pattern.shape),
        }
        if include_tensors:
            summary["mask"] = self.mask.tolist()
            summary["pattern"] = self.pattern.tolist()
        return summary


@dataclass
class InversionResult:
    """Triggers reversed for several classes and Neural Cleanse's outlier test on their norms.

    Attributes:
        classes: the classes inverted, in order.
        triggers: one `ReversedTrigger` per class.
        l1_norms: the masks' L1 norms.
        anomaly_index: MAD anomaly index of each norm (`mad_anomaly_index`).
        flagged: classes below the median norm with anomaly index > 2, most anomalous first.
        suspected_target: the most anomalous flagged class, or None.
        median: median of the norms.
        mad: the consistency-scaled MAD (1.4826 * median absolute deviation).
    """

    classes: list[int]
    triggers: list[ReversedTrigger]
    l1_norms: list[float]
    anomaly_index: list[float]
    flagged: list[int] = field(default_factory=list)
    suspected_target: int | None = None
    median: float = 0.0
    mad: float = 0.0

    def trigger_for(self, target: int) -> ReversedTrigger:
        """The reversed trigger of class ``target``."""
        return self.triggers[self.classes.index(target)]

    def to_dict(self, *, include_tensors: bool = False) -> dict[str, Any]:
        """Summary as plain data (anomaly indices are ``inf`` when the MAD is 0; see
        `mad_anomaly_index`)."""
        return {
            "classes": list(self.classes),
            "l1_norms": list(self.l1_norms),
            "anomaly_index": list(self.anomaly_index),
            "median": self.median,
            "mad": self.mad,
            "flagged": list(self.flagged),
            "suspected_target": self.suspected_target,
            "attack_success": [t.attack_success for t in self.triggers],
            "triggers": [t.to_dict(include_tensors=include_tensors) for t in self.triggers],
        }


def mad_anomaly_index(values: Sequence[float]) -> list[float]:
    """Neural Cleanse's anomaly index: ``|v - median| / (1.4826 * MAD)`` for each value.

    MAD is the median of ``|v - median|``; 1.4826 makes it a consistent estimator of the standard
    deviation under normality. When the MAD is 0 (most values equal), a value at the median gets 0
    and any other value ``inf``: the limit of the formula, where the reference would divide by zero.

    Args:
        values: one statistic per class (e.g. mask L1 norms).

    Returns:
        The anomaly index of each value, in order.

    Raises:
        DataError: ``values`` is empty.
    """
    numbers = [float(v) for v in values]
    if not numbers:
        raise DataError("mad_anomaly_index needs at least one value.")
    median = statistics.median(numbers)
    mad = 1.4826 * statistics.median(abs(v - median) for v in numbers)
    if mad == 0:
        return [0.0 if v == median else math.inf for v in numbers]
    return [abs(v - median) / mad for v in numbers]


def invert_trigger(
    model: nn.Module,
    data: Any,
    normalize: Normalize,
    target: int,
    *,
    config: InversionConfig | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    seed: int = 0,
) -> ReversedTrigger:
    """Reverse-engineer the smallest trigger that sends ``data`` to class ``target``.

    The model is frozen and put in eval mode for the optimisation; its ``requires_grad`` flags,
    train/eval mode and device are restored afterwards, and its weights are never changed.

    Args:
        model: the classifier; returns logits, or an object with ``.logits``.
        data: clean defender data: a Dataset of ``(pixels, label)`` pairs, a DataLoader or any
            re-iterable of ``(pixels, labels)`` batches (labels may be None; a bare pixel tensor per
            batch works too). Pixels are floats in [0, 1] at the model's input size.
        normalize: the model's own normalization, applied after the trigger.
        target: the class to reverse a trigger for.
        config: optimisation settings; default `InversionConfig()` (Neural Cleanse, CPU budget).
        accelerator: the Accelerate object that places tensors and runs mixed precision; built if
            None.
        progress: show a progress bar.
        seed: seeds the random init and the order of the batches (same seed, same trigger). A
            DataLoader of the caller's that has a generator of its own keeps its own order; one
            that shuffles with the global RNG is seeded here (the caller's RNG state is restored).

    Returns:
        The `ReversedTrigger`.

    Raises:
        DataError: ``data`` is empty or malformed, or ``target`` is not one of the model's classes.
    """
    config = config or InversionConfig()
    accelerator = make_accelerator(accelerator)
    batches = _Batches(data, batch_size=config.batch_size, seed=seed)
    with frozen_on(model, accelerator.device), progress_bar(accelerator, enabled=progress) as bar:
        task = bar.add_task(f"Inverting class {target}", total=config.epochs, status="")
        return _invert(model, batches, normalize, target, config, accelerator, seed, bar, task)


def invert_all_classes(
    model: nn.Module,
    data: Any,
    normalize: Normalize,
    num_classes: int,
    *,
    classes: Iterable[int] | None = None,
    config: InversionConfig | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    seed: int = 0,
) -> InversionResult:
    """Reverse a trigger for every class and flag low-norm outliers (Neural Cleanse detection).

    Every class starts from the same seeded init, so a class's trigger does not depend on which
    other classes are inverted. A class is flagged when its mask norm is below the median and its
    MAD anomaly index exceeds 2, as in the reference's ``outlier_detection``.

    Args:
        model: the classifier (see `invert_trigger`).
        data: clean defender data (see `invert_trigger`).
        normalize: the model's own normalization.
        num_classes: the model's number of classes.
        classes: invert only these classes (default: all); the outlier test runs over these.
        config: optimisation settings, shared by every class.
        accelerator: the Accelerate object; built if None.
        progress: show a progress bar.
        seed: seed of each class's inversion.

    Returns:
        The `InversionResult`.

    Raises:
        DataError: no classes to invert, a class outside ``0..num_classes-1``, or bad data.
    """
    config = config or InversionConfig()
    accelerator = make_accelerator(accelerator)
    chosen = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if not chosen:
        raise DataError("No classes to invert: give num_classes >= 1 or a non-empty classes list.")
    outside = [c for c in chosen if not 0 <= c < num_classes]
    if outside:
        raise DataError(f"Classes {outside} are outside 0..{num_classes - 1} (num_classes={num_classes}).")
    batches = _Batches(data, batch_size=config.batch_size, seed=seed)
    triggers = []
    with frozen_on(model, accelerator.device), progress_bar(accelerator, enabled=progress) as bar:
        overall = bar.add_task("Neural Cleanse", total=len(chosen), status="")
        for target in chosen:
            task = bar.add_task(f"  class {target}", total=config.epochs, status="")
            triggers.append(_invert(model, batches, normalize, target, config, accelerator, seed, bar, task))
            bar.remove_task(task)
            bar.update(overall, advance=1, status=f"last L1 {triggers[-1].l1_norm:.1f}")
    norms = [t.l1_norm for t in triggers]
    index = mad_anomaly_index(norms)
    median = statistics.median(norms)
    flagged = sorted(
        (c for c, norm, score in zip(chosen, norms, index, strict=True) if norm < median and score > 2),
        key=lambda c: -index[chosen.index(c)],
    )
    return InversionResult(
        classes=chosen,
        triggers=triggers,
        l1_norms=norms,
        anomaly_index=index,
        flagged=flagged,
        suspected_target=flagged[0] if flagged else None,
        median=median,
        mad=1.4826 * statistics.median(abs(n - median) for n in norms),
    )


class _Batches:
    """Re-iterable ``(pixels, labels or None)`` batches from any of the accepted data forms."""

    def __init__(self, data: Any, *, batch_size: int, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        if data is None:
            raise DataError("Trigger inversion needs clean images: pass data=... (a Dataset or DataLoader).")
        self.source: Iterable
        if isinstance(data, torch.utils.data.DataLoader):
            self.source = data
        elif _is_sample_dataset(data):
            # Shuffled like the reference's generator; seeded so that the same seed gives the same
            # batches, and a generator of our own leaves the caller's global RNG alone.
            self._generator = torch.Generator().manual_seed(seed)
            self.source = torch.utils.data.DataLoader(
                data, batch_size=batch_size, shuffle=True, generator=self._generator
            )
        elif iter(data) is data:
            self.source = list(data)  # a one-shot iterator: keep its batches for the later epochs
        else:
            self.source = data

    def restart(self) -> None:
        """Reseed our own shuffling, so that every inversion sees the same batch order."""
        if self._generator is not None:
            self._generator.manual_seed(self.seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for batch in self.source:
            if isinstance(batch, torch.Tensor):
                yield batch, None
                continue
            if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], torch.Tensor):
                raise DataError(
                    "Each batch must be a pixel tensor or a (pixels, labels) pair with pixels N x C x H x W; "
                    f"got {type(batch).__name__}."
                )
            pixels = batch[0]
            if pixels.dim() != 4:
                raise DataError(f"Batches must hold N x C x H x W pixels; got shape {tuple(pixels.shape)}.")
            labels = batch[1] if len(batch) > 1 else None
            yield pixels, None if labels is None else torch.as_tensor(labels)

    def endless(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        while True:
            empty = True
            for batch in self:
                empty = False
                yield batch
            if empty:
                raise DataError("The defender data is empty: trigger inversion needs clean images.")


def _is_sample_dataset(data: Any) -> bool:
    """True for an indexable collection of single ``(C x H x W pixels, label)`` samples."""
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return False
    if len(data) == 0:
        raise DataError("The defender data is empty: trigger inversion needs clean images.")
    first = data[0]
    pixels = first[0] if isinstance(first, (tuple, list)) else first
    return isinstance(pixels, torch.Tensor) and pixels.dim() == 3


def _to_free(values: torch.Tensor) -> torch.Tensor:
    """Unconstrained tanh-space variables for values in [0, 1], as the reference initialises them."""
    return torch.atanh((values - 0.5) * (2 - _TANH_EPS))


def _invert(
    model: nn.Module,
    batches: _Batches,
    normalize: Normalize,
    target: int,
    config: InversionConfig,
    accelerator: Accelerator,
    seed: int,
    bar: Progress,
    task: TaskID,
) -> ReversedTrigger:
    # Caller DataLoaders without a generator of their own shuffle with the global RNG: seed it here
    # (and give the caller's state back afterwards) so that the same seed gives the same trigger.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batches.restart()
        return _optimise(model, batches, normalize, target, config, accelerator, seed, bar, task)


def _optimise(
    model: nn.Module,
    batches: _Batches,
    normalize: Normalize,
    target: int,
    config: InversionConfig,
    accelerator: Accelerator,
    seed: int,
    bar: Progress,
    task: TaskID,
) -> ReversedTrigger:
    device = accelerator.device
    first_pixels, _ = next(iter(batches), (None, None))
    if first_pixels is None:
        raise DataError("The defender data is empty: trigger inversion needs clean images.")
    channels, height, width = first_pixels.shape[1:]
    batches.restart()  # the peek above must not shift the first epoch's order
    generator = torch.Generator().manual_seed(seed)
    # Uniform random mask and pattern, as both references start from.
    mask_init = torch.rand(1, height, width, generator=generator)
    pattern_init = torch.rand(channels, height, width, generator=generator)
    tanh = config.parametrization == "tanh"
    if tanh:
        mask_init, pattern_init = _to_free(mask_init), _to_free(pattern_init)
    mask_var = mask_init.to(device).requires_grad_(True)
    pattern_var = pattern_init.to(device).requires_grad_(True)

    def current() -> tuple[torch.Tensor, torch.Tensor]:
        if tanh:
            return torch.tanh(mask_var) / 2 + 0.5, torch.tanh(pattern_var) / 2 + 0.5
        return mask_var, pattern_var

    optimizer = accelerator.prepare_optimizer(
        torch.optim.Adam([mask_var, pattern_var], lr=config.lr, betas=config.betas), device_placement=False
    )
    cost = 0.0 if (config.reset_cost_to_zero and config.cost_schedule) else config.init_cost
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    best_norm = math.inf
    stall_reference = math.inf
    stalled = up_count = down_count = zero_count = 0
    went_up = went_down = False
    epochs_run = 0
    endless = batches.endless() if config.batches_per_epoch else None
    try:
        for _epoch in range(config.epochs):
            epoch_batches = (
                (next(endless) for _ in range(config.batches_per_epoch)) if endless else iter(batches)
            )
            hits = counted = 0
            for pixels, labels in epoch_batches:
                pixels = pixels.to(device=device, dtype=torch.float32)
                mask, pattern = current()
                with accelerator.autocast():
                    logits = logits_of(model(normalize((1 - mask) * pixels + mask * pattern)))
                _check_target(target, logits)
                wanted = torch.full((len(pixels),), target, device=device, dtype=torch.long)
                loss = F.cross_entropy(logits.float(), wanted) + cost * mask.abs().sum()
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
                if not tanh:
                    with torch.no_grad():
                        mask_var.clamp_(0, 1)
                        pattern_var.clamp_(0, 1)
                keep = _not_target(labels, target, len(pixels), device)
                hits += int((logits.detach().argmax(1)[keep] == target).sum())
                counted += int(keep.sum())
            epochs_run += 1
            success = hits / counted if counted else 0.0
            with torch.no_grad():
                mask, pattern = current()
                norm = float(mask.abs().sum())
                if success >= config.success_threshold and norm < best_norm:
                    best = (mask[0].detach().cpu().clone(), pattern.detach().cpu().clone(), norm)
                    best_norm = norm

            if config.early_stop and best is not None:
                # The reference's rule: the best norm must fall below a fraction of its previous
                # value to reset the count; with the schedule on, the cost must have gone both
                # up and down before stopping, so it has bracketed the right weight.
                stalled = stalled + 1 if best_norm >= config.early_stop_threshold * stall_reference else 0
                stall_reference = min(stall_reference, best_norm)
                bracketed = (went_up and went_down) or not config.cost_schedule
                if bracketed and stalled >= config.early_stop_patience:
                    bar.update(task, advance=1, status="early stop")
                    break

            if config.cost_schedule:
                succeeded = success >= config.success_threshold
                if cost == 0 and succeeded:
                    zero_count += 1
                    if zero_count >= config.patience:
                        cost = config.init_cost
                        up_count = down_count = 0
                        went_up = went_down = False
                else:
                    zero_count = 0
                up_count, down_count = (up_count + 1, 0) if succeeded else (0, down_count + 1)
                if up_count >= config.patience:
                    up_count, went_up = 0, True
                    cost *= config.cost_multiplier_up
                elif down_count >= config.patience:
                    down_count, went_down = 0, True
                    cost /= config.cost_multiplier_down
            bar.update(
                task,
                advance=1,
                status=f"success {success:.2f} L1 {norm:.1f} best {best_norm:.1f} cost {cost:.1e}",
            )
    finally:
        release_optimizer(accelerator, optimizer)

    reached = best is not None
    if best is None or config.keep == "last":
        with torch.no_grad():
            mask, pattern = current()
            best = (mask[0].detach().cpu().clone(), pattern.detach().cpu().clone(), float(mask.abs().sum()))
    trigger = ReversedTrigger(
        target=target,
        mask=best[0],
        pattern=best[1],
        l1_norm=best[2],
        attack_success=0.0,
        reached_threshold=reached,
        epochs_run=epochs_run,
        final_cost=cost,
    )
    trigger.attack_success = _attack_success(model, batches, normalize, trigger, accelerator)
    return trigger


def _check_target(target: int, logits: torch.Tensor) -> None:
    if not 0 <= target < logits.shape[-1]:
        raise DataError(
            f"Target class {target} is outside the model's {logits.shape[-1]} classes (0..{logits.shape[-1] - 1})."
        )


def _not_target(labels: torch.Tensor | None, target: int, size: int, device: torch.device) -> torch.Tensor:
    """Which images count for the success rate: those not labelled ``target`` (all when unlabelled)."""
    if labels is None or labels.dim() != 1 or len(labels) != size:
        return torch.ones(size, dtype=torch.bool, device=device)
    return labels.to(device) != target


@torch.no_grad()
def _attack_success(
    model: nn.Module,
    batches: _Batches,
    normalize: Normalize,
    trigger: ReversedTrigger,
    accelerator: Accelerator,
) -> float:
    """Share of one pass over the data (non-target images when labelled) sent to the target."""
    hits = counted = 0
    for pixels, labels in batches:
        pixels = pixels.to(device=accelerator.device, dtype=torch.float32)
        with accelerator.autocast():
            logits = logits_of(model(normalize(trigger.apply(pixels))))
        keep = _not_target(labels, trigger.target, len(pixels), accelerator.device)
        hits += int((logits.argmax(1)[keep] == trigger.target).sum())
        counted += int(keep.sum())
    return hits / counted if counted else 0.0
