"""Every defense on every benchmark model, plus "no defense": BA, ASR, neurons pruned, time, memory.

The operating point is chosen automatically from clean data (the defender split of Fashion-MNIST
train); beside it, the best point of the sweep by test ASR (BA drop <= 2 points) is shown for
reference only: no defender could choose it. Passes over the data are printed so that cost can be
compared across machines.

    python benchmarks/defenses.py                                  # the whole table
    python benchmarks/defenses.py --models resnet18-badnets --defenses anp --eval-limit 2000
    python benchmarks/defenses.py --models resnet18-badnets --defenses shap --defender-images 10

Data-free defenses get no data unless --defender-images asks for some; a few-shot defense given
fewer than 20 images gets a class-stratified draw of them, none held out (its own rule chooses).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from models import MODELS_DIR, RECIPES, get_model

from hubdefend.data import defender_split, load_data
from hubdefend.defenses import get_defense, list_defenses
from hubdefend.neurons import NEURON_KINDS
from hubdefend.planning import DEFAULT_BA_BUDGET
from hubdefend.preprocess import Preprocessing
from hubdefend.sanitize import MIN_DEFENDER_IMAGES, sanitize

DEFENDER_IMAGES = {"anp": 500, "rnp": 500, "cnp": 1000}  # DEFENSES.md: 1% (ANP, RNP), 2% unlabelled (CNP)
RESULTS = Path(__file__).parent / "results"


def best_reference_point(sweep: list[dict], ba_before: float) -> dict | None:
    """The sweep point with the lowest test ASR within 2 BA points (test-set leakage: reference only)."""
    allowed = [
        p
        for p in sweep
        if p.get("ba") is not None and p.get("asr") is not None and p["ba"] >= ba_before - 0.02
    ]
    return min(allowed, key=lambda p: (p["asr"], p["neurons_pruned"])) if allowed else None


def passes(report: dict) -> str:
    """Passes over the defender data the defense made (forward + backward), from its config."""
    options, n = report["options"], max(1, report["data"]["defender_images"])
    if report["defense"] == "anp":
        return f"{options['iterations'] * options['batch_size'] / n:.0f}"
    if report["defense"] == "rnp":
        return f"{report['notes'].get('unlearning_steps', 0) * options['batch_size'] / n + options['recovering_epochs']:.0f}"
    return "-"


def run(model_name: str, defense: str, args) -> dict:
    backdoored = get_model(model_name, progress=not args.quiet)
    record = backdoored.record
    preprocessing = Preprocessing.from_timm(backdoored.model)
    train = load_data("fmnist:train", preprocessing)
    # The factory trains on the first `train_limit` images: the defender's come from the rest.
    train = torch.utils.data.Subset(train, range(record["recipe"]["train_limit"], len(train)))
    test = load_data("fmnist:test", preprocessing, limit=args.eval_limit)
    size = args.defender_images or DEFENDER_IMAGES.get(defense, 500)
    options = dict(json.loads(args.options)) if args.options else {}
    # Data-free defenses get no data at all (their own rule is the operating point), unless
    # --defender-images asks for some.
    defense_cls = get_defense(defense)
    data_free = not defense_cls.needs_data and args.defender_images is None
    few_shot = defense_cls.few_shot and size < MIN_DEFENDER_IMAGES
    if few_shot:  # a stratified handful, all the defense's: none can be held out, its own rule chooses
        train, _ = defender_split(train, n=size, val_n=0, seed=args.seed)
    result = sanitize(
        backdoored.model,
        None if data_free else train,
        defense=defense,
        trigger=record["trigger"],
        eval_data=test,
        # 20% of the defender's images is the held-out validation split
        defender_size=None if data_free or few_shot else int(size / 0.8),
        eval_sweep=True,
        progress=not args.quiet,
        seed=args.seed,
        kinds=tuple(args.kinds) if args.kinds else None,
        ba_budget=args.ba_budget,
        **options,
    )
    report = result.report.to_dict()
    RESULTS.mkdir(exist_ok=True)
    suffix = "".join(f"-{kind}" for kind in args.kinds or ())
    (RESULTS / f"{model_name}-{defense}{suffix}.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--defenses", nargs="*", default=list_defenses())
    parser.add_argument("--defender-images", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None, help="use the first N test images")
    parser.add_argument("--options", default=None, help="JSON object of defense options")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds", nargs="*", choices=NEURON_KINDS, help="neuron kinds (default: the model's)"
    )
    parser.add_argument(
        "--ba-budget",
        type=float,
        default=DEFAULT_BA_BUDGET,
        help="clean accuracy the automatic point may spend",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    for name in args.defenses:
        get_defense(name)
    print(
        "| model | defense | defender images | BA | ASR | neurons pruned | rule | reference best (BA/ASR/pruned) "
        "| time (s) | passes | peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        record = get_model(model_name, progress=not args.quiet).record
        print(
            f"| {model_name} | none | - | {record['ba'] * 100:.2f} | {record['asr'] * 100:.2f} | 0 | - | - | - | - | - |",
            flush=True,
        )
        for defense in args.defenses:
            report = run(model_name, defense, args)
            best = best_reference_point(report["sweep"], report["ba_before"])
            best_text = (
                "-"
                if best is None
                else f"{best['ba'] * 100:.2f}/{best['asr'] * 100:.2f}/{best['neurons_pruned']}"
            )
            label = defense if not args.kinds else f"{defense} ({', '.join(report['neuron_kinds'])})"
            print(
                f"| {model_name} | {label} | {report['data']['defender_images'] + report['data']['validation_images']} "
                f"| {report['ba_after'] * 100:.2f} | {report['asr_after'] * 100:.2f} | "
                f"{report['neurons_pruned']}/{report['neurons_total']} | {report['operating_point']['rule']} | {best_text} | "
                f"{report['seconds']:.0f} | {passes(report)} | {report['peak_memory_mb']:.0f} |",
                flush=True,
            )
    print(f"\nmodels cached in {MODELS_DIR}; per-run reports in {RESULTS}")


if __name__ == "__main__":
    main()
