"""How far can PRUNING alone go on a benchmark model? An oracle that no defender has.

The oracle ranks neurons with the attack's own triggered images: by how far a neuron's mean value
on triggered images departs from its mean on the same images clean (the largest departure over
positions: tokens or pixels, so that the few positions the trigger covers are not averaged away).
It then masks the top k and measures BA and ASR on other test images. What this greedy oracle
cannot reach with a neuron kind, a defense that ranks that kind from clean data is unlikely to
reach: it bounds what to expect and tells which neuron kind to try.

    python benchmarks/oracle_pruning.py                                   # the ViT: mlp, norm, head, attn
    python benchmarks/oracle_pruning.py --models resnet18-badnets --kinds norm
"""

from __future__ import annotations

import argparse

import torch
from models import RECIPES, get_model

from hubdefend import discover
from hubdefend.data import load_data, materialize
from hubdefend.masks import NeuronMasks
from hubdefend.preprocess import Preprocessing
from hubdefend.triggers import parse_trigger

COUNTS = (0, 1, 4, 16, 32, 64, 80, 96, 128, 256, 512, 1024)


def hooked_means(model, groups, normalize, pixels) -> dict[str, torch.Tensor]:
    """Each group's hooked value (what its mask scales), averaged over the images: positions x neurons."""
    means, handles = {}, []

    def keep(group, value):
        value = value.detach().movedim(group.channel_dim, -1).mean(0)
        means[group.name] = value.reshape(-1, value.shape[-1])

    for group in groups:
        point = model.get_submodule(group.hook_point)
        if group.hook_on == "input":
            handles.append(point.register_forward_pre_hook(lambda m, args, g=group: keep(g, args[0])))
        else:
            handles.append(point.register_forward_hook(lambda m, args, out, g=group: keep(g, out)))
    try:
        with torch.no_grad():
            model(normalize(pixels))
    finally:
        for handle in handles:
            handle.remove()
    return means


def oracle_ranking(model, groups, normalize, clean, triggered) -> list[tuple[int, int]]:
    """(group index, neuron) pairs, the largest triggered-vs-clean departure first."""
    before = hooked_means(model, groups, normalize, clean)
    after = hooked_means(model, groups, normalize, triggered)
    scored = []
    for index, group in enumerate(groups):
        departure = (after[group.name] - before[group.name]).abs().amax(0)
        departure = departure.view(group.num_neurons, group.neuron_width).sum(1)
        scored += [(value, index, neuron) for neuron, value in enumerate(departure.tolist())]
    return [(index, neuron) for _, index, neuron in sorted(scored, reverse=True)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=["vit6-badnets"], choices=list(RECIPES))
    parser.add_argument("--kinds", nargs="*", default=["mlp", "norm", "head", "attn"])
    parser.add_argument("--counts", nargs="*", type=int, default=list(COUNTS))
    parser.add_argument("--images", type=int, default=1000, help="test images: half rank, half measure")
    args = parser.parse_args()
    print("| model | kind | neurons | pruned | BA | ASR |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        backdoored = get_model(name, progress=False)
        model, trigger = backdoored.model.eval(), parse_trigger(backdoored.record["trigger"])
        preprocessing = Preprocessing.from_timm(model)
        pixels, labels = materialize(load_data("fmnist:test", preprocessing, limit=args.images))
        half = len(pixels) // 2
        measure_x, measure_y = pixels[half:], labels[half:]
        outside = measure_y != trigger.target
        measure_triggered = trigger.apply(measure_x[outside])

        def predict(x, model=model, normalize=preprocessing.normalize):
            with torch.no_grad():
                return model(normalize(x)).argmax(1)

        for kind in args.kinds:
            groups = [g for g in discover(model, kinds=(kind,)) if g.kind == kind]
            if not groups:
                continue
            ranking = oracle_ranking(
                model, groups, preprocessing.normalize, pixels[:half], trigger.apply(pixels[:half])
            )
            masks = NeuronMasks(groups)
            with masks.attached_to(model):
                for count in [c for c in args.counts if c <= len(ranking)]:
                    with torch.no_grad():
                        for mask in masks.mask:
                            mask.fill_(1.0)
                        for index, neuron in ranking[:count]:
                            masks.mask[index][neuron] = 0.0
                    ba = (predict(measure_x) == measure_y).float().mean().item()
                    asr = (predict(measure_triggered) == trigger.target).float().mean().item()
                    print(
                        f"| {name} | {kind} | {len(ranking)} | {count} | {ba * 100:.1f} | {asr * 100:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
