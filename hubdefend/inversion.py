"""Neural Cleanse-style trigger reverse engineering (Wang et al., S&P 2019; reference
bolunwang/backdoor): for a class, the smallest mask + pattern that sends clean images there.

x' = (1 - m) * x + m * p with m, p through tanh/2 + 0.5; loss CE(f(x'), t) + cost * |m|_1; Adam lr
0.1, betas (0.5, 0.9); the cost starts at 1e-3 and adapts (x1.5 up after `patience` epochs of
success, /1.5**1.5 down after `patience` epochs without); the best (smallest) mask that reaches the
success threshold is kept. A target class has an abnormally small mask: MAD anomaly index > 2.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hubdefend.training import frozen, loader_for, logits_of, make_accelerator


@dataclass(frozen=True)
class InversionConfig:
    """Reference defaults, except ``epochs`` (reference: up to the early stop, mini-batches of 32
    over the data): a CPU-sized default, named as a deviation."""

    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_multiplier_up: float = 1.5
    cost_multiplier_down: float = 1.5**1.5
    patience: int = 5
    early_stop_patience: int = 10
    success_threshold: float = 0.99
    epochs: int = 30
    batch_size: int = 128
    schedule: bool = True

    @classmethod
    def cnp(cls) -> InversionConfig:
        """CNP's variant: Adam lr 0.005, fixed lambda 0.01, 20 epochs, no cost schedule."""
        return cls(lr=0.005, init_cost=0.01, epochs=20, schedule=False)


@dataclass
class ReversedTrigger:
    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    l1_norm: float
    attack_success: float

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(pixels)
        return (1 - mask) * pixels + mask * self.pattern.to(pixels)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "l1_norm": round(self.l1_norm, 4),
            "attack_success": round(self.attack_success, 4),
        }


def invert_trigger(
    model,
    data,
    normalize,
    target: int,
    *,
    config: InversionConfig | None = None,
    accelerator=None,
    progress: bool = True,
    seed: int = 0,
) -> ReversedTrigger:
    """Reverse a trigger for ``target`` from clean ``data``; labels are only used to skip target images."""
    config = config or InversionConfig()
    accelerator = make_accelerator(accelerator)
    generator = torch.Generator().manual_seed(seed)
    sample, _ = next(iter(loader_for(data, batch_size=1, seed=seed, shuffle=False)))
    channels, height, width = sample.shape[1:]
    mask_param = (torch.rand(1, height, width, generator=generator) * 0.2 - 2.0).requires_grad_(True)
    pattern_param = (torch.rand(channels, height, width, generator=generator) * 2 - 1).requires_grad_(True)
    loader = loader_for(data, batch_size=config.batch_size, seed=seed)
    device = accelerator.device
    best = None
    cost = config.init_cost
    up = down = stale = 0
    with frozen(model, train_mode=False):
        model.to(device)
        mask_param.data, pattern_param.data = mask_param.data.to(device), pattern_param.data.to(device)
        optimizer = torch.optim.Adam([mask_param, pattern_param], lr=config.lr, betas=config.betas)
        for _ in range(config.epochs):
            hits = total = 0
            for pixels, labels in loader:
                pixels = pixels.to(device)
                mask = torch.tanh(mask_param) / 2 + 0.5
                pattern = torch.tanh(pattern_param) / 2 + 0.5
                triggered = (1 - mask) * pixels + mask * pattern
                with accelerator.autocast():
                    logits = logits_of(model(normalize(triggered)))
                wanted = torch.full((len(pixels),), target, device=device)
                loss = F.cross_entropy(logits, wanted) + cost * mask.abs().sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                keep = torch.as_tensor(labels, device=device) != target
                hits += (logits.argmax(1)[keep] == target).sum().item()
                total += int(keep.sum())
            success = hits / max(1, total)
            with torch.no_grad():
                mask = torch.tanh(mask_param) / 2 + 0.5
                l1 = mask.abs().sum().item()
                if success >= config.success_threshold and (best is None or l1 < best[2]):
                    best = (
                        mask.detach().cpu().clone(),
                        (torch.tanh(pattern_param) / 2 + 0.5).detach().cpu().clone(),
                        l1,
                        success,
                    )
                    stale = 0
                else:
                    stale += 1
            if best is not None and stale >= config.early_stop_patience:
                break
            if config.schedule:
                up, down = (up + 1, 0) if success >= config.success_threshold else (0, down + 1)
                if up >= config.patience:
                    cost, up = cost * config.cost_multiplier_up, 0
                elif down >= config.patience:
                    cost, down = cost / config.cost_multiplier_down, 0
    if best is None:  # never reached the threshold: keep the last mask, with its success
        mask = (torch.tanh(mask_param) / 2 + 0.5).detach().cpu()
        best = (mask, (torch.tanh(pattern_param) / 2 + 0.5).detach().cpu(), mask.sum().item(), success)
    return ReversedTrigger(target, best[0][0], best[1], best[2], best[3])


def mad_anomaly_index(values: Sequence[float]) -> list[float]:
    """|v - median| / (1.4826 * MAD) for each value (Neural Cleanse's anomaly index)."""
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values) * 1.4826
    return [abs(v - median) / mad if mad > 0 else 0.0 for v in values]


@dataclass
class InversionResult:
    triggers: list[ReversedTrigger]
    l1_norms: list[float]
    anomaly_index: list[float]
    suspected_target: int | None
    flagged: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "l1_norms": [round(v, 3) for v in self.l1_norms],
            "anomaly_index": [round(v, 3) for v in self.anomaly_index],
            "flagged": self.flagged,
            "suspected_target": self.suspected_target,
            "attack_success": [round(t.attack_success, 3) for t in self.triggers],
        }


def invert_all_classes(
    model,
    data,
    normalize,
    num_classes: int,
    *,
    classes=None,
    config=None,
    accelerator=None,
    progress: bool = True,
    seed: int = 0,
) -> InversionResult:
    """Reverse a trigger for every class; flag low-norm outliers (anomaly index > 2)."""
    classes = list(range(num_classes)) if classes is None else list(classes)
    triggers = [
        invert_trigger(
            model, data, normalize, c, config=config, accelerator=accelerator, progress=progress, seed=seed
        )
        for c in classes
    ]
    norms = [t.l1_norm for t in triggers]
    index = mad_anomaly_index(norms)
    median = statistics.median(norms)
    flagged = [c for c, n, a in zip(classes, norms, index, strict=True) if n < median and a > 2]
    suspected = max(flagged, key=lambda c: index[classes.index(c)]) if flagged else None
    return InversionResult(triggers, norms, index, suspected, flagged)
