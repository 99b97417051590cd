"""PNG figures for a cleaned model's folder: neurons pruned per layer, the score distribution with
the operating point, and BA/ASR before and after. Drawn from the `Report` and the scores only."""

from __future__ import annotations

from pathlib import Path

from hubdefend.report import Report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: Report, scores: dict[str, list[float]] | None, folder: str | Path) -> list[Path]:
    """Write the figures into ``folder``; returns their paths."""
    plt = _pyplot()
    folder = Path(folder)
    written = []

    per_layer = report.pruned_per_layer
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.3 * len(per_layer) + 1)))
    if per_layer:
        names = list(per_layer)
        ax.barh(names, [per_layer[n] for n in names], color="#c0392b")
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no neuron pruned", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("neurons pruned")
    ax.set_title(f"{report.defense}: {report.neurons_pruned} of {report.neurons_total} neurons pruned")
    written.append(_save(fig, folder / "pruned_per_layer.png"))

    if scores:
        values = [v for layer in scores.values() for v in layer]
        ranked = sorted(values)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(values, bins=50, color="#2c3e50")
        if 0 < report.neurons_pruned <= len(ranked):
            ax.axvline(
                ranked[report.neurons_pruned - 1], color="#c0392b", linestyle="--", label="operating point"
            )
            ax.legend()
        ax.set_yscale("log")
        ax.set_xlabel("neuron score (lower = pruned first)")
        ax.set_ylabel("neurons")
        ax.set_title("score distribution")
        written.append(_save(fig, folder / "score_distribution.png"))

    metrics = [
        (label, before, after)
        for label, before, after in (
            ("BA", report.ba_before, report.ba_after),
            ("ASR", report.asr_before, report.asr_after),
            ("reversed-trigger ASR", report.reversed_asr_before, report.reversed_asr_after),
        )
        if before is not None and after is not None
    ]
    if metrics:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        positions = range(len(metrics))
        ax.bar(
            [p - 0.2 for p in positions],
            [m[1] * 100 for m in metrics],
            width=0.4,
            label="before",
            color="#7f8c8d",
        )
        ax.bar(
            [p + 0.2 for p in positions],
            [m[2] * 100 for m in metrics],
            width=0.4,
            label="after",
            color="#27ae60",
        )
        ax.set_xticks(list(positions), [m[0] for m in metrics])
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.legend()
        ax.set_title("before and after the defense")
        written.append(_save(fig, folder / "ba_asr.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path
