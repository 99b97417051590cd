"""Backdoor detection (`hubdefend scan MODEL`, with or without --data) on a population of small models.

    python benchmarks/detection.py                        # 10 clean + 10 backdoored, scanned without data
    python benchmarks/detection.py --clean 20 --backdoored 20 --json rows.json   # the larger population
    python benchmarks/detection.py --clean 4 --backdoored 4   # a smaller population while iterating
    python benchmarks/detection.py --make-only            # just train (and cache) the population
    python benchmarks/detection.py --data fmnist:test     # with 500 clean images (scan --data)

Population i is the same model in every size (sizes only add models), so the 10 + 10 default is
the first half of the 20 + 20 one.

Every model is the bundled example's recipe (timm ``test_resnet``, 4000 Fashion-MNIST images at
32x32, about 15 s each on 2 cores) with its own seed. Clean models are trained with
``poison_rate=0``; backdoored ones alternate BadNets (3x3 white patch, corner and target varied) and
Blended (random-noise pattern at alpha 0.2, pattern seed and target varied), 10% poisoning. Models
are cached under ``benchmarks/models/detection/`` (gitignored) and reused when the recipe matches.

Without --data the detectors see no data; with it, 500 clean images of the given split. They never
see the record or the population: the threshold is a p-value, not a number fitted here. Printed: a
markdown table (AUROC of the anomaly index, detection rate at the detector's own threshold and at 5%
FPR, false positives, target accuracy, seconds per model) and one line per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hubdefend import example  # noqa: E402
from hubdefend.factory import AttackRecipe, make_backdoored  # noqa: E402

FOLDER = Path(__file__).parent / "models" / "detection"
CORNERS = ("br", "tl", "tr", "bl")


def recipes(n_clean: int, n_backdoored: int) -> list[tuple[str, AttackRecipe]]:
    """(name, recipe) of the population: deterministic, so the cache is reused across runs."""
    base = AttackRecipe(**example.RECIPE)
    population = []
    for i in range(n_clean):
        population.append((f"clean-{i:02d}", replace(base, poison_rate=0.0, seed=100 + i)))
    for i in range(n_backdoored):
        target = (3 * i + 1) % base.num_classes
        if i % 2 == 0:
            trigger = f"badnets:size=3,corner={CORNERS[(i // 2) % len(CORNERS)]},target={target}"
            name = f"badnets-{i:02d}"
        else:
            trigger = f"blended:alpha=0.2,pattern=noise,seed={i},target={target}"
            name = f"blended-{i:02d}"
        population.append((name, replace(base, trigger=trigger, seed=200 + i)))
    return population


def make_population(n_clean: int, n_backdoored: int) -> list[tuple[str, Path, dict]]:
    made = []
    for name, recipe in recipes(n_clean, n_backdoored):
        folder = FOLDER / name
        started = time.perf_counter()
        result = make_backdoored(recipe, folder, progress=False)
        took = time.perf_counter() - started
        if took > 2:
            print(
                f"trained {name}: BA {result.record['ba']:.3f} ASR {result.record['asr']:.3f} ({took:.0f} s)"
            )
        made.append((name, folder, result.record))
    return made


def auroc(negatives: list[float], positives: list[float]) -> float:
    """P(score of a backdoored model > score of a clean one), ties counted half."""
    if not negatives or not positives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def rate_at_fpr(negatives: list[float], positives: list[float], fpr: float) -> float:
    """Detection rate with the threshold at the highest clean score allowed by ``fpr``."""
    ranked = sorted(negatives, reverse=True)
    allowed = int(fpr * len(ranked))  # this many clean models may score above the threshold
    threshold = ranked[allowed] if allowed < len(ranked) else float("-inf")
    return sum(p > threshold for p in positives) / max(1, len(positives))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clean", type=int, default=10)
    parser.add_argument("--backdoored", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="the scan's seed")
    parser.add_argument("--make-only", action="store_true")
    parser.add_argument(
        "--data", help="clean images for scan (a data spec); default: none, the data-free path"
    )
    parser.add_argument("--json", type=Path, help="also write every model's result here")
    args = parser.parse_args()

    population = make_population(args.clean, args.backdoored)
    if args.make_only:
        return
    from hubdefend.scan import VERDICT_SUSPECTED, scan

    rows = []
    for name, folder, record in population:
        started = time.perf_counter()
        result = scan(str(folder), data=args.data, seed=args.seed, progress=False)
        seconds = time.perf_counter() - started
        backdoored = record["recipe"]["poison_rate"] > 0
        rows.append(
            {
                "name": name,
                "backdoored": backdoored,
                "target": record["target"] if backdoored else None,
                "ba": record["ba"],
                "asr": record["asr"] if backdoored else None,
                "flagged": result.verdict == VERDICT_SUSPECTED,
                "suspected_target": result.suspected_target,
                "top_class": result.detection.get("top_class"),
                "anomaly_index": result.anomaly_index,
                "p_value": result.detection.get("p_value"),
                "seconds": seconds,
            }
        )
        row = rows[-1]
        print(
            f"{name:12s} BA {row['ba']:.3f} ASR {row['asr'] if backdoored else float('nan'):.3f} "
            f"target {row['target']} top {row['top_class']} index {row['anomaly_index']:.2f} "
            f"p {row['p_value'] if row['p_value'] is not None else float('nan'):.2g} {'FLAGGED' if row['flagged'] else '-'} ({seconds:.1f} s)",
            flush=True,
        )
    negatives = [r["anomaly_index"] for r in rows if not r["backdoored"]]
    positives = [r["anomaly_index"] for r in rows if r["backdoored"]]
    bad = [r for r in rows if r["backdoored"]]
    detected = sum(r["flagged"] for r in bad)
    false_pos = sum(r["flagged"] for r in rows if not r["backdoored"])
    target_ok = sum(r["top_class"] == r["target"] for r in bad)
    print()
    print(
        "| models (clean/backdoored) | AUROC | detected at threshold | FP at threshold | detected at 5% FPR | target right | s/model |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {len(negatives)}/{len(positives)} | {auroc(negatives, positives):.3f} | "
        f"{detected}/{len(bad)} | {false_pos}/{len(negatives)} | {rate_at_fpr(negatives, positives, 0.05):.2f} | "
        f"{target_ok}/{len(bad)} | {sum(r['seconds'] for r in rows) / len(rows):.1f} |"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
