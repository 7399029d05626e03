"""The evaluate stage's PNG figures, one function per figure.

matplotlib with the Agg backend: no display, no network, PNGs that open
anywhere. Each function takes plain data (arrays, tables, PIL images) and a
path, writes the PNG atomically and closes the figure (a long run must not
accumulate open figures).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from stages.lib.atomic import atomic_file  # noqa: E402

DPI = 110
MAX_INCHES = 24  # 120 breeds must still give a figure a viewer can open
GOOD, BAD, NEUTRAL = "#1a7f37", "#cf222e", "#333333"


@dataclass
class Thumb:
    """One gallery cell: the image, its caption, and whether its label is right
    (True / False where truth is known, None otherwise: neutral colour)."""

    image: Image.Image
    caption: str
    correct: bool | None = None


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def _label_size(n: int) -> float:
    """Tick label font size that keeps ``n`` labels legible without overlap."""
    return float(np.clip(300 / max(n, 1), 3, 9))


def confusion_figure(actual: Sequence[str], predicted: Sequence[str], classes: Sequence[str],
                     title: str, path: Path) -> None:
    """Confusion matrix, rows = true breed, normalised per row (so the diagonal
    is each breed's accuracy and frequent breeds do not dominate the colours);
    counts are written in the cells while they fit."""
    classes = list(classes)
    pos = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for a, p in zip(actual, predicted):
        counts[pos[a], pos[p]] += 1
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = min(MAX_INCHES, 2.5 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true breed's test images")
    size = _label_size(len(classes))
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=size)
    ax.set_yticks(range(len(classes)), classes, fontsize=size)
    if len(classes) <= 25:
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=size,
                        color="white" if share[i, j] > 0.5 else "black")
    acc = np.trace(counts) / max(1, counts.sum())
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title} (top-1 {acc:.3f}, {counts.sum()} images)")
    save_figure(fig, path)


def per_class_accuracy_figure(table: pd.DataFrame, models: Sequence[str], path: Path) -> None:
    """Horizontal bars of each breed's test accuracy (recall) per model,
    sorted by the last model's gain over the first, so that the breeds where
    the models differ sit at the ends."""
    cols = [f"{m}_recall" for m in models]
    df = table.dropna(subset=cols, how="all").copy()
    df["_gain"] = df[cols[-1]].fillna(0) - df[cols[0]].fillna(0)
    df = df.sort_values(["_gain", "breed"]).reset_index(drop=True)
    height = min(MAX_INCHES, 1.5 + 0.3 * len(df) * max(1, len(models) / 2))
    fig, ax = plt.subplots(figsize=(7, height))
    y = np.arange(len(df))
    width = 0.8 / len(models)
    for i, (model, col) in enumerate(zip(models, cols)):
        mean = np.nanmean(df[col]) if df[col].notna().any() else float("nan")
        ax.barh(y + (i - (len(models) - 1) / 2) * width, df[col].fillna(0), height=width,
                label=f"{model} (mean {mean:.3f})")
    ax.set_yticks(y, df["breed"], fontsize=_label_size(len(df)))
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy of the breed (recall)")
    ax.set_title(f"per-class accuracy, sorted by {models[-1]} - {models[0]}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def gallery_figure(rows: Sequence[tuple[str, Sequence[Thumb]]], title: str, path: Path,
                   columns: int) -> None:
    """A grid of thumbnails, one row per group (kept, each drop reason), with
    a caption under each image: green when its label is the true breed, red
    when not, dark grey when truth is unknown."""
    columns = max(1, columns)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns + 1.2, 2.0 * len(rows)), squeeze=False)
    for r, (name, thumbs) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
            if c < len(thumbs):
                t = thumbs[c]
                ax.imshow(np.asarray(t.image))
                colour = NEUTRAL if t.correct is None else GOOD if t.correct else BAD
                ax.set_xlabel(t.caption, fontsize=6, color=colour)
            elif c == 0:
                ax.text(0.5, 0.5, "(no image)", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
