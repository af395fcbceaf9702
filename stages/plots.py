"""Plots people would rather look at than read; written as PNG files next to a stage's outputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers, CI or Ray workers
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict[str, float]], path: Path, title: str, keys: list[str] | None = None) -> Path | None:
    """One panel per metric in `keys` (default: every train/ and rl/ metric) against the step."""
    if not history:
        return None
    keys = keys or sorted({k for row in history for k in row if k.startswith(("train/loss", "rl/", "eval/"))})
    keys = [k for k in keys if any(k in row for row in history)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(row["step"], row[key]) for row in history if key in row]
        ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
