"""Report figures: matplotlib (Agg) -> PNG bytes -> ``data:`` URIs for a self-contained page."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def to_png(fig: Figure) -> bytes:
    """Render and close a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 6,
               colorbar: tuple[str, str] | None = None) -> bytes:
    """Grid of uint8 images (H×W×C, C = 1 or 3) with a caption over each; ``colorbar`` = (matplotlib colormap,
    label) adds a 0-1 colour bar under the grid (for heat-map overlays)."""
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.5 * nrows + (0.6 if colorbar else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        img = np.asarray(img)
        ax.imshow(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
    if colorbar:
        cmap, label = colorbar
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=axes.ravel().tolist(), orientation="horizontal",
                           fraction=0.04, pad=0.03, aspect=40)
        bar.set_ticks([0, 1], labels=["weak", "strong"])
        bar.set_label(label, fontsize=9)
    return to_png(fig)


def learning_curves(history: pd.DataFrame) -> bytes:
    """Loss and accuracy per epoch, training vs validation."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
    for ax, key in zip(axes, ("loss", "accuracy")):
        for col, label in ((key, "training"), (f"val_{key}", "validation")):
            if col in history:
                ax.plot(x, history[col], marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    return to_png(fig)


def confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Confusion matrix: counts, rows = true class, columns = predicted class."""
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if k > 3 else "horizontal"
    )
    return to_png(fig)


def roc(points: pd.DataFrame, auc: float | None) -> bytes:
    """ROC curve(s) from a table of class, fpr, tpr; the diagonal is a random guess."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    groups = list(points.groupby("class", sort=False))
    for cls, g in groups:
        ax.plot(g["fpr"], g["tpr"], label=f"{cls} vs rest" if len(groups) > 1 else str(cls))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="random guess")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    about = f"positive class: {groups[0][0]}" if len(groups) == 1 else "one class vs the rest"
    ax.set_title(f"ROC, {about}" + (f"\nAUC {auc:.3f}" if auc is not None else ""), fontsize=10)
    ax.legend(fontsize=8)
    return to_png(fig)


def reliability(table: pd.DataFrame, n_classes: int) -> bytes:
    """Reliability diagram: accuracy vs mean confidence per bin; the diagonal is perfect calibration. The
    confidence axis starts at 1/n_classes, the lowest top-class probability there can be (0.5 for two classes)."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    used = table[table["count"] > 0]
    width = float((table["upper"] - table["lower"]).iloc[0])
    ax.bar(used["lower"], used["accuracy"], width=width, align="edge", alpha=0.7, edgecolor="k", label="share correct")
    wrong = used[used["accuracy"] == 0]  # a zero-height bar would look like an empty bin
    ax.bar(wrong["lower"], [0.02] * len(wrong), width=width, align="edge", fill=False, edgecolor="tab:red",
           hatch="//", label="images, none correct" if len(wrong) else None)
    for lower, acc, n in zip(used["lower"], used["accuracy"], used["count"]):
        ax.annotate(f"{int(n)}", (lower + width / 2, acc), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
    ax.set_xlim(float(table["lower"][table["upper"] > 1 / n_classes].min()), 1)  # the bin holding 1/n_classes on
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("model confidence")
    ax.set_ylabel("share correct (number on bar: images in the bin)")
    ax.legend(fontsize=7, loc="upper left")
    return to_png(fig)


def grouped_bars(table: pd.DataFrame, ylabel: str) -> bytes:
    """Bars of each numeric column, grouped by the first column (e.g. class × split counts)."""
    idx = table.set_index(table.columns[0]).select_dtypes("number")
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(idx) + 2), 3.2))
    idx.plot.bar(ax=ax, rot=30 if len(idx) > 4 else 0)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    return to_png(fig)
