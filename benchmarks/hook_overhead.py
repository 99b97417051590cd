"""What the mask hooks cost: a plain forward+backward against the same with `NeuronMasks` attached.

All runs freeze the weights and backpropagate to the input (and, when hooked, to the masks), so the
only difference is the hooks. The masks run twice: as `NeuronMasks` attaches them (plain norms swap
their masked affine in, plain Linear projections compute ``x @ (W * s).T`` in one function) and as
plain forward hooks on every group (the fast paths off), so the gain of the fast paths is measured
side by side. Runs are interleaved (plain, fast, hooks only, plain, ...); the overhead is the median
of each round's ratio, because shared machines are noisy: quote the ratio, not the seconds.

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


class HooksOnly(NeuronMasks):
    swap_affine = False  # every group through the plain forward hook


def measure(name: str, batch_size: int, repeats: int, kinds: tuple[str, ...]) -> dict:
    """Median step times, and the median over repeats of each repeat's masked / plain ratio: the
    three steps of one repeat run back to back, so a slow spell of the machine cancels out."""
    torch.manual_seed(0)
    model = timm.create_model(**MODELS[name]).train().requires_grad_(False)
    groups = [g for g in hubdefend.discover(model, kinds=kinds) if g.kind in kinds]
    fast, hooks_only = NeuronMasks(groups), HooksOnly(groups)
    x, y = torch.rand(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    times: dict[str, list[float]] = {"plain": [], "fast": [], "hooks": []}
    for _ in range(2):  # warm-up
        step_seconds(model, x, y, None)
    for _ in range(repeats):
        times["plain"].append(step_seconds(model, x, y, None))
        for key, masks in (("fast", fast), ("hooks", hooks_only)):
            with masks.attached_to(model):
                times[key].append(step_seconds(model, x, y, masks))
    result = {key: statistics.median(values) for key, values in times.items()}
    for key in ("fast", "hooks"):
        ratios = [t / p for t, p in zip(times[key], times["plain"], strict=True)]
        result[f"{key}_overhead"] = statistics.median(ratios) - 1
    result["neurons"] = sum(g.num_neurons for g in groups)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,vit-6x192")
    parser.add_argument("--kinds", default=None, help="only these, e.g. mlp+attn,norm (default: all rows)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} at 32x32")
    print(
        "| model | neurons masked | plain fwd+bwd (ms) | masked (ms) | overhead | hooks only (ms) | overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        vit_kinds = (("norm",), ("mlp",), ("head",), ("attn",), ("mlp", "attn"))  # the last: the ViT default
        rows = vit_kinds if name.startswith("vit") else (("norm",),)
        if args.kinds:
            rows = [kinds for kinds in rows if "+".join(kinds) in args.kinds.split(",")]
        for kinds in rows:
            r = measure(name, args.batch_size, args.repeats, kinds)
            print(
                f"| {name} ({'+'.join(kinds)}) | {r['neurons']} | {r['plain'] * 1e3:.1f} | {r['fast'] * 1e3:.1f} "
                f"| {100 * r['fast_overhead']:+.1f}% | {r['hooks'] * 1e3:.1f} | {100 * r['hooks_overhead']:+.1f}% |"
            )


if __name__ == "__main__":
    main()
