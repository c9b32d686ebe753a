"""Stratified, grouped train/val/test split (+ optional grouped stratified K-fold).

Leakage rule: rows that share a ``group`` (patient / slide) **or** a ``sha256`` (exact duplicate
pixels) form one connected component; a component never crosses splits or folds.

How rows are placed:
  * Official splits (``source_split`` non-empty, ``respect_source_split``) are kept. A component that
    spans two official splits goes to the most held-out one (test > val > train) so no duplicate
    leaks; the number of rows moved that way is reported. When the source has train but no val,
    val is carved from the official train part at ``val / (train + val)``.
  * Everything else is split by a seeded greedy: components, largest first (ties in seeded random
    order), each go to the split whose per-class deficit they fill best (least squared error of the
    class-normalised counts against ``ratio * class total``). scikit-learn's StratifiedGroupKFold
    uses the same greedy idea but only for equal-sized folds, so it would need 10 folds (and ≥ 10
    groups) to express 60:10:30.
  * ``folds > 1``: every row (all splits) also gets a ``fold`` from scikit-learn's
    StratifiedGroupKFold over the same components, for grouped K-fold cross-validation on the whole
    dataset; ``fold`` is -1 when folds are off.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from medflow.config import SplitConfig
from medflow.data.manifest import SPLITS
from medflow.io import atomic_write, atomic_write_csv

_TEXT_COLUMNS = ("id", "path", "label", "group", "source_split", "sha256", "format",
                 "modality", "window")


def read_manifest(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read manifest.csv (only those of ``columns`` it has, when given) keeping identifiers and labels
    as text (labels like '0' stay strings); parsed by pyarrow's multithreaded reader."""
    usecols = None
    if columns is not None:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        wanted = set(columns)
        usecols = [c for c in header if c in wanted]
    return pd.read_csv(path, engine="pyarrow", dtype={c: "string" for c in _TEXT_COLUMNS}, usecols=usecols)


def _text(col: pd.Series) -> pd.Series:
    return col.astype("string").fillna("").str.strip()


def _source(df: pd.DataFrame) -> np.ndarray:
    """Official split per row (lower-case train/val/test), "" where the source sets none."""
    if "source_split" not in df:
        return np.full(len(df), "", dtype=object)
    src = _text(df["source_split"]).str.lower()
    return src.where(src.isin(SPLITS), "").to_numpy(dtype=object)


def components(df: pd.DataFrame) -> np.ndarray:
    """Connected-component id per row: rows sharing a non-empty group or sha256 are linked."""
    n = len(df)
    rows, keys, offset = [], [], n  # bipartite graph rows <-> keys; nodes 0..n-1 are rows, n.. are keys
    for col in ("group", "sha256"):
        if col not in df:
            continue
        values = _text(df[col])
        codes, uniques = pd.factorize(values)
        linked = (values != "").to_numpy(dtype=bool)
        rows.append(np.flatnonzero(linked))
        keys.append(codes[linked] + offset)
        offset += len(uniques)
    r, k = (np.concatenate(rows), np.concatenate(keys)) if rows else (np.zeros(0, int), np.zeros(0, int))
    graph = coo_matrix((np.ones(len(r)), (r, k)), shape=(offset, offset))
    _, component = connected_components(graph, directed=False)
    return pd.factorize(component[:n])[0]


def _greedy(comp: np.ndarray, y: np.ndarray, names: list[str], ratios: list[float],
            seed: int) -> dict[int, str]:
    """Assign each component to one of ``names`` approximating ``ratios`` per class."""
    classes, yi = np.unique(y, return_inverse=True)
    n_comp = comp.max() + 1 if len(comp) else 0
    counts = np.zeros((n_comp, len(classes)))
    np.add.at(counts, (comp, yi), 1)
    totals = counts.sum(axis=0)
    weight = 1.0 / np.maximum(totals, 1)
    target = np.outer(ratios, totals)  # (splits, classes)
    current = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_comp)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    out: dict[int, str] = {}
    for c in order:
        v = counts[c]
        delta = ((v * (2 * (current - target) + v)) * weight).sum(axis=1)
        s = int(np.argmin(delta))
        current[s] += v
        out[int(c)] = names[s]
    return out


def assign_splits(manifest_df: pd.DataFrame, cfg: SplitConfig, comp: np.ndarray | None = None) -> pd.DataFrame:
    """Return ``DataFrame[id, split, fold]`` (one row per manifest row, same order); ``comp`` is
    :func:`components` of the manifest when the caller has it already."""
    df = manifest_df.reset_index(drop=True)
    comp = components(df) if comp is None else comp
    y = _text(df["label"]).to_numpy(dtype=str)
    source = _source(df) if cfg.respect_source_split else np.full(len(df), "", dtype=object)

    # per component: the most held-out official split among its rows ("" = free)
    rank = {"": 0, "train": 1, "val": 2, "test": 3}
    comp_rank = pd.Series([rank[s] for s in source]).groupby(comp).max()
    by_rank = {v: k for k, v in rank.items()}
    comp_split = comp_rank.map(by_rank)
    split = comp_split.reindex(comp).to_numpy(dtype=object)

    free = split == ""
    if free.any():
        sub = pd.factorize(comp[free])[0]
        picked = _greedy(sub, y[free], list(SPLITS), [cfg.train, cfg.val, cfg.test], cfg.seed)
        split[free] = [picked[c] for c in sub]
    official = set(source) - {""}
    carve = (split == "train") & ~free
    if official and "val" not in official and carve.any() and not free.any():
        sub = pd.factorize(comp[carve])[0]
        picked = _greedy(sub, y[carve], ["train", "val"], [cfg.train / (cfg.train + cfg.val),
                                                          cfg.val / (cfg.train + cfg.val)], cfg.seed)
        split[carve] = [picked[c] for c in sub]

    fold = np.full(len(df), -1, dtype=int)
    if cfg.folds > 1:
        n_groups = int(comp.max()) + 1 if len(comp) else 0
        if n_groups < cfg.folds:
            raise ValueError(f"split.folds={cfg.folds} needs at least that many independent groups "
                             f"(patients/slides after merging duplicates); found {n_groups}")
        if (pd.Series(y).value_counts() < cfg.folds).all():
            raise ValueError(f"split.folds={cfg.folds} exceeds the rows of every class")
        sgkf = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
        for k, (_, held) in enumerate(sgkf.split(np.zeros(len(df)), y, groups=comp)):
            fold[held] = k
    return pd.DataFrame({"id": _text(df["id"]).to_numpy(dtype=str), "split": split.astype(str),
                         "fold": fold})


def count_table(labels: pd.Series, splits: pd.Series) -> pd.DataFrame:
    """Per-class x per-split counts with a ``total`` column and a ``total`` row."""
    table = pd.crosstab(labels.rename("label"), splits.rename("split"))
    table = table.reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def run_split(manifest_csv: str | Path, splits_csv: str | Path, counts_csv: str | Path,
              cfg: SplitConfig) -> dict:
    """Split the manifest; write ``splits_csv`` (id, split, fold) and the per-class count table."""
    df = read_manifest(manifest_csv, ["id", "label", "group", "sha256", "source_split"])
    comp = components(df)
    out = assign_splits(df, cfg, comp)
    table = count_table(_text(df["label"]), out["split"])
    atomic_write_csv(splits_csv, out)
    atomic_write(counts_csv, table.to_csv(index_label="label"))
    n = len(out)
    counts = {s: int((out["split"] == s).sum()) for s in SPLITS}
    src = _source(df)
    official = set(src) - {""}
    carved = (src == "train") & (out["split"] == "val") & ("val" not in official)
    moved = (src != "") & (src != out["split"]) & ~carved
    summary = {
        "rows": n,
        "components": int(comp.max()) + 1 if n else 0,
        "counts": counts,
        "ratios": {s: round(c / n, 4) if n else 0.0 for s, c in counts.items()},
        "source_split_used": bool(cfg.respect_source_split and official),
        # rows moved off their official split because a group/duplicate spanned two splits
        "moved_from_source_split": int(moved.sum()) if cfg.respect_source_split else 0,
        "folds": cfg.folds if cfg.folds > 1 else 0,
    }
    ratio_text = ":".join(f"{counts[s]}" for s in SPLITS)
    print(f"split: {n} rows in {summary['components']} independent groups -> "
          f"train:val:test = {ratio_text}"
          + (f", {cfg.folds} grouped folds" if cfg.folds > 1 else ""), file=sys.stderr)
    return summary
