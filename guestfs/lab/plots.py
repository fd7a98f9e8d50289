"""PNG plots of experiment results; matplotlib is optional (``plot`` extra).

Each function returns the written path, or ``None`` when matplotlib is not installed (the CSV
and JSON written by the experiment hold the same numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: Path,
    title: str,
    xlabel: str,
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    ylabel: str = "hit ratio (%)",
    logx: bool = True,
    percent: bool = True,
) -> Path | None:
    """Several named (x, y) series on one axis; y given as fractions is shown in percent
    (``percent=False``: y as given, e.g. seconds or MiB)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in curves.items():
        if len(xs) == 0:
            continue
        ax.plot(list(xs), [100 * y if percent else y for y in ys], marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    if logx:
        # linear up to the smallest positive size, so a 0 ("no tmem") point sits next to the rest
        positive = [x for xs, _ in curves.values() for x in xs if x > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(path: Path, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str) -> Path | None:
    """Grouped bars: one group per label, one bar per series."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(series), 1)
    for offset, (name, values) in enumerate(series.items()):
        xs = [i + offset * width for i in range(len(labels))]
        ax.bar(xs, list(values), width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], list(labels), rotation=20, fontsize=8)
    # counts start at 0; an all-zero result (e.g. no collisions) still gets a readable axis
    tallest = max((v for values in series.values() for v in values), default=0)
    ax.set_ylim(0, max(1.0, 1.15 * tallest))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
