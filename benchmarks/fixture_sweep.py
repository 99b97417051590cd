"""Each defense at the automatic operating point on the test suite's ResNet-18 fixture, with the
whole sweep (BA and ASR measured at every point for reference; the choice never sees them).

    python benchmarks/fixture_sweep.py                 # anp, rnp, cnp at the efficacy tests' budgets
    python benchmarks/fixture_sweep.py --defenses anp --full   # the papers' default budgets
    python benchmarks/fixture_sweep.py --defenses anp --options '{"train_mode": false}' --seed 1

The fixture is trained once (about 50 s on 2 cores) and cached under benchmarks/models/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hubdefend  # noqa: E402
from hubdefend import example  # noqa: E402
from hubdefend.data import load_data  # noqa: E402
from hubdefend.factory import AttackRecipe, make_backdoored  # noqa: E402
from hubdefend.preprocess import Preprocessing  # noqa: E402
from hubdefend.sanitize import sanitize  # noqa: E402
from hubdefend.triggers import parse_trigger  # noqa: E402
from tests.test_defenses import EFFICACY_OPTIONS, FAST_OPTIONS  # noqa: E402

FOLDER = Path(__file__).parent / "models" / "fixture-resnet18-badnets"


def fixture():
    if (FOLDER / "backdoor.json").exists():
        return hubdefend.load(str(FOLDER)).model, json.loads((FOLDER / "backdoor.json").read_text())
    # Trained with 2 threads, as tests/conftest.py does: the thread count changes the float sums, and
    # with 1 thread (OMP_NUM_THREADS=1) this recipe does not plant the backdoor (ASR 4.7%).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        made = make_backdoored(
            AttackRecipe(**{**example.RECIPE, "architecture": "resnet18"}), FOLDER, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return made.model, made.record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--defenses", default="anp,rnp,cnp")
    parser.add_argument("--full", action="store_true", help="the papers' default budgets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="JSON object of options for every defense")
    args = parser.parse_args()
    model, record = fixture()
    preprocessing = Preprocessing.from_timm(model)
    defender = torch.utils.data.Subset(load_data("fmnist:train", preprocessing), range(50000, 50625))
    test = load_data("fmnist:test", preprocessing, limit=2000)
    trigger = parse_trigger(record["trigger"])
    print(f"fixture: BA {record['ba']:.3f} ASR {record['asr']:.3f}")
    rows = []
    for name in args.defenses.split(","):
        started = time.perf_counter()
        options = {} if args.full else EFFICACY_OPTIONS.get(name, FAST_OPTIONS.get(name, {}))
        options = {**options, **json.loads(args.options)}
        result = sanitize(
            model, defender, defense=name, trigger=trigger, eval_data=test, seed=args.seed,
            eval_sweep=True, progress=False, **options,
        )  # fmt: skip
        report = result.report
        print(f"\n{name} {options}: sweep (neurons, defender accuracy, reversed ASR, BA, ASR)")
        for point in report.sweep:
            print(
                f"  {point['neurons_pruned']:4d}  {point['val_accuracy']:.3f}  {point.get('reversed_asr') or 0:.3f}"
                f"  {point['ba']:.3f}  {point['asr']:.3f}"
            )
        rows.append((name, report, time.perf_counter() - started))
    print("\n| defense | neurons pruned | protected | BA before -> after | ASR before -> after | seconds |")
    print("|---|---|---|---|---|---|")
    for name, report, seconds in rows:
        protected = sum(len(v) for v in report.protected.values())
        print(
            f"| {name} | {report.neurons_pruned} | {protected} | {report.ba_before:.3f} -> {report.ba_after:.3f} "
            f"| {report.asr_before:.3f} -> {report.asr_after:.3f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
