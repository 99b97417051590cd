"""The one training-loop helper that every defense uses: device placement, mixed precision, several
processes and progress come from Accelerate here, so defenses only say what one step computes.

`MaskedModel` puts a frozen model and its `NeuronMasks` behind one ``forward`` so that Accelerate
(and DDP under ``accelerate launch``) sees the masks as the module's trainable parameters: every
process then ends with the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import torch
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from hubdefend.masks import NeuronMasks

Normalize = Callable[[torch.Tensor], torch.Tensor]


def logits_of(output) -> torch.Tensor:
    """Logits from a model output: a tensor, a transformers output (``.logits``) or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


class MaskedModel(nn.Module):
    """A frozen model with masks attached; only the masks (and perturbations) train.

    ``forward(pixels, mode)`` normalises the pixels, then runs the model ``"clean"`` (masks only),
    ``"perturbed"`` (masks plus ANP noise) or ``"both"`` (perturbed then clean, in one call, so that
    DDP sees one forward per backward).
    """

    def __init__(self, model: nn.Module, masks: NeuronMasks, normalize: Normalize) -> None:
        super().__init__()
        self.model = model
        self.masks = masks
        self.normalize = normalize

    def _run(self, x: torch.Tensor, perturbed: bool) -> torch.Tensor:
        self.masks.perturbing = perturbed
        try:
            return logits_of(self.model(x))
        finally:
            self.masks.perturbing = False

    def forward(
        self, pixels: torch.Tensor, mode: str = "clean"
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(pixels)
        if mode == "both":
            return self._run(x, True), self._run(x, False)
        return self._run(x, mode == "perturbed")


@contextmanager
def frozen(model: nn.Module, *, train_mode: bool) -> Iterator[nn.Module]:
    """Freeze ``model`` (and set train/eval mode) for the block; restore both afterwards."""
    requires_grad = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False).train(train_mode)
    try:
        yield model
    finally:
        for param, flag in zip(model.parameters(), requires_grad, strict=True):
            param.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def frozen_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Freeze ``model`` in eval mode on ``device`` for the block (inversion, synthesis and detection
    optimise inputs, not weights); restore flags, modes and device afterwards."""
    requires_grad = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    first = next(model.parameters(), None)
    device = first.device if first is not None else None
    model.requires_grad_(False).eval().to(device)
    try:
        yield model
    finally:
        if device is not None:
            model.to(device)
        for param, flag in zip(model.parameters(), requires_grad, strict=True):
            param.requires_grad_(flag)
        # Per module, since a caller may keep some submodules in eval mode inside a training model.
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode


def cycle(loader, num_steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``num_steps`` batches, going round the loader as often as needed (the references sample with
    replacement; cycling a seeded shuffled loader visits every image equally often)."""
    step = 0
    while step < num_steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            step += 1
            if step == num_steps:
                return
        if empty:
            return


def progress_bar(accelerator: Accelerator, *, enabled: bool) -> Progress:
    """A rich progress bar, silent on every process but the main one, or when not ``enabled``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not (enabled and accelerator.is_main_process),
        transient=True,
    )


def loader_for(data, *, batch_size: int, seed: int, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """A seeded DataLoader over a dataset of ``(pixels, label)`` pairs (a DataLoader passes through)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)


def run_steps(
    accelerator: Accelerator,
    loader,
    num_steps: int,
    step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
    *,
    description: str,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Call ``step(pixels, labels)`` for ``num_steps`` batches of ``loader`` with a progress bar.

    ``loader`` must already be prepared by ``accelerator``. Returns what each step reported.
    """
    history = []
    with progress_bar(accelerator, enabled=progress) as bar:
        task = bar.add_task(description, total=num_steps, status="")
        for pixels, labels in cycle(loader, num_steps):
            with accelerator.autocast():
                stats = step(pixels, labels)
            history.append(stats)
            bar.update(task, advance=1, status=" ".join(f"{k}={v:.3f}" for k, v in stats.items()))
    return history


def make_accelerator(
    accelerator: Accelerator | None = None, *, mixed_precision: str | None = None
) -> Accelerator:
    """The caller's accelerator, or a new one (``mixed_precision``: ``"no"``, ``"bf16"``, ``"fp16"``)."""
    if accelerator is not None:
        return accelerator
    return Accelerator(mixed_precision=mixed_precision or "no")


def release_optimizer(accelerator: Accelerator, optimizer) -> None:
    """Forget an optimizer ``accelerator.prepare`` registered, so that a loop that builds one per
    class or round (trigger inversion over 1000 classes) does not keep every one's state alive."""
    with suppress(AttributeError, ValueError):
        accelerator._optimizers.remove(optimizer)
