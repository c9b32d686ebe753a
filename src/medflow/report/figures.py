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
        ax.set_title(title, fontsize=10)
    if colorbar:
        cmap, label = colorbar
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=axes.ravel().tolist(), orientation="horizontal",
                           fraction=0.04, pad=0.03, aspect=40)
        bar.set_ticks([0, 1], labels=["weak", "strong"])
        bar.set_label(label, fontsize=9)
    return to_png(fig)


def learning_curves(history: pd.DataFrame, kept_epoch: int | None = None) -> bytes:
    """Loss and accuracy per epoch, training vs validation; ``kept_epoch`` (the epoch whose weights were saved) is
    a dotted vertical line."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
    titles = {"loss": "Loss (error; lower is better)", "accuracy": "Accuracy (higher is better)"}
    for ax, key in zip(axes, ("loss", "accuracy")):
        for col, label in ((key, "training"), (f"val_{key}", "validation")):
            if col in history:
                ax.plot(x, history[col], marker=".", label=label)
        if kept_epoch is not None:
            ax.axvline(kept_epoch, ls=":", c="k", lw=1, label=f"saved weights (epoch {kept_epoch})")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend under both panels: none over the curves
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=9,
                   frameon=False)
    fig.tight_layout()
    return to_png(fig)


def confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """Confusion matrix: counts, rows = true class, columns = predicted class; each cell also gives its share of
    the row (of the images truly in that class)."""
    k = len(classes)
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.8 + 0.95 * k, 1.4 + 0.85 * k))
    disp = ConfusionMatrixDisplay(m, display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if k > 3 else "horizontal"
    )
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    for (i, j), text in np.ndenumerate(disp.text_):
        text.set_text(f"{m[i, j]}\n({share[i, j]:.0%})")
        text.set_fontsize(10 if k <= 4 else 8)
    ax.set_xlabel("model's answer")
    ax.set_ylabel("true class")
    return to_png(fig)


def roc(points: pd.DataFrame, auc: float | None, operating: tuple[float, float] | None = None) -> bytes:
    """ROC curve(s) from a table of class, fpr, tpr; the diagonal is a random guess. ``operating`` = (false positive
    rate, sensitivity) of the model's own decision rule, marked on a two-class curve."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    groups = list(points.groupby("class", sort=False))
    for cls, g in groups:
        ax.plot(g["fpr"], g["tpr"], label=f"{cls} vs rest" if len(groups) > 1 else str(cls))
    if operating is not None:
        fpr, tpr = operating
        ax.plot([fpr], [tpr], "o", ms=7, mfc="none", mec="tab:red", mew=1.8,
                label=f"model's answers (sens. {tpr:.2f}, spec. {1 - fpr:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="random guess")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    about = f"positive class: {groups[0][0]}" if len(groups) == 1 else "one class vs the rest"
    ax.set_title(f"ROC, {about}" + (f"\nAUC {auc:.3f}" if auc is not None else ""), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
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
    for lower, n in zip(used["lower"], used["count"]):  # at the foot of the bar: clear of the diagonal
        ax.annotate(f"n={int(n)}", (lower + width / 2, 0), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
    ax.set_xlim(float(table["lower"][table["upper"] > 1 / n_classes].min()), 1)  # the bin holding 1/n_classes on
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("model confidence (probability of its answer)")
    ax.set_ylabel("share of answers correct")
    ax.set_title("n = test images in the bin", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return to_png(fig)


def grouped_bars(table: pd.DataFrame, ylabel: str) -> bytes:
    """Bars of each numeric column, grouped by the first column (e.g. class × split counts), each labelled with its
    count; a single series has no legend."""
    idx = table.set_index(table.columns[0]).select_dtypes("number")
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(idx) + 2), 3.2))
    idx.plot.bar(ax=ax, rot=30 if len(idx) > 4 else 0, legend=idx.shape[1] > 1)
    for bars in ax.containers:
        ax.bar_label(bars, fontsize=8, padding=1)
    ax.margins(y=0.12)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    if idx.shape[1] > 1:
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return to_png(fig)
