"""What the mask hooks cost: a plain forward+backward against the same with `NeuronMasks` attached.

Both runs freeze the weights and backpropagate to the input (and, when hooked, to the masks), so the
only difference is the hooks. Runs are interleaved (plain, hooked, plain, ...) and the median is
reported, because shared machines are noisy; quote the ratio, not the seconds.

    python benchmarks/hook_overhead.py
    python benchmarks/hook_overhead.py --models resnet18 --batch-size 64 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import hubdefend
from hubdefend.masks import NeuronMasks

MODELS = {
    "resnet18": dict(model_name="resnet18", num_classes=10),
    "vit-6x192": dict(
        model_name="vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=6,
        num_heads=3,
        num_classes=10,
    ),  # fmt: skip
}


def step_seconds(model, x, y, masks: NeuronMasks | None) -> float:
    started = time.perf_counter()
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if masks is not None:
        for mask in masks.mask:
            mask.grad = None
    return time.perf_counter() - started


def measure(name: str, batch_size: int, repeats: int, kinds: tuple[str, ...]) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model = timm.create_model(**MODELS[name]).train().requires_grad_(False)
    groups = [g for g in hubdefend.discover(model, kinds=kinds) if g.kind in kinds]
    masks = NeuronMasks(groups)
    x, y = torch.rand(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    plain, hooked = [], []
    for _ in range(2):  # warm-up
        step_seconds(model, x, y, None)
    for _ in range(repeats):
        plain.append(step_seconds(model, x, y, None))
        with masks.attached_to(model):
            hooked.append(step_seconds(model, x, y, masks))
    return statistics.median(plain), statistics.median(hooked), sum(g.num_neurons for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,vit-6x192")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} at 32x32")
    print("| model | neurons masked | plain fwd+bwd (ms) | hooked fwd+bwd (ms) | overhead |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        vit_kinds = (("norm",), ("mlp",), ("head",), ("attn",), ("mlp", "attn"))  # the last: the ViT default
        for kinds in vit_kinds if name.startswith("vit") else (("norm",),):
            plain, hooked, neurons = measure(name, args.batch_size, args.repeats, kinds)
            print(
                f"| {name} ({'+'.join(kinds)}) | {neurons} | {plain * 1e3:.1f} | {hooked * 1e3:.1f} "
                f"| {100 * (hooked / plain - 1):+.1f}% |"
            )


if __name__ == "__main__":
    main()
