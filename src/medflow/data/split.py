"""Stratified, grouped train/val/test split (+ optional grouped stratified K-fold).

Leakage rule: rows that share a ``group`` (patient / slide) **or** a ``pixel_hash`` (exact duplicate
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
from medflow.io import atomic_write, atomic_write_csv, read_csv

_TEXT_COLUMNS = ("id", "path", "label", "group", "source_split", "sha256", "pixel_hash", "format",
                 "modality", "window")


def read_manifest(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read manifest.csv (only those of ``columns`` it has, when given) keeping identifiers and labels
    as text (labels like '0' stay strings)."""
    return read_csv(path, columns, text=_TEXT_COLUMNS)


def _text(col: pd.Series) -> np.ndarray:
    """Stripped text per row, "" where missing (an object array of str)."""
    return np.array([v.strip() if isinstance(v, str) else "" if v is None or v is pd.NA or v != v else str(v).strip()
                     for v in col.tolist()], dtype=object)


def _source(df: pd.DataFrame) -> np.ndarray:
    """Official split per row (lower-case train/val/test), "" where the source sets none."""
    if "source_split" not in df:
        return np.full(len(df), "", dtype=object)
    return np.array([s if s in SPLITS else "" for s in (v.lower() for v in _text(df["source_split"]))],
                    dtype=object)


def components(df: pd.DataFrame) -> np.ndarray:
    """Connected-component id per row: rows sharing a non-empty group or pixel_hash are linked."""
    n = len(df)
    rows, keys, offset = [], [], n  # bipartite graph rows <-> keys; nodes 0..n-1 are rows, n.. are keys
    for col in ("group", "pixel_hash"):
        if col not in df:
            continue
        values = _text(df[col])
        codes, uniques = pd.factorize(values)
        linked = values != ""
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
    # plain floats over each component's non-zero classes: the loop is sequential and its arrays tiny
    current, target, weight = current.tolist(), target.tolist(), weight.tolist()
    out: dict[int, str] = {}
    for c in order.tolist():
        present = [(j, v) for j, v in enumerate(counts[c].tolist()) if v]
        best, pick = float("inf"), 0
        for s, (cur, tgt) in enumerate(zip(current, target)):  # squared-error change if c joined split s
            delta = 0.0
            for j, v in present:
                delta += v * (2 * (cur[j] - tgt[j]) + v) * weight[j]
            if delta < best:
                best, pick = delta, s
        for j, v in present:
            current[pick][j] += v
        out[c] = names[pick]
    return out


def assign_splits(manifest_df: pd.DataFrame, cfg: SplitConfig, comp: np.ndarray | None = None) -> pd.DataFrame:
    """Return ``DataFrame[id, split, fold]`` (one row per manifest row, same order); ``comp`` is
    :func:`components` of the manifest when the caller has it already."""
    df = manifest_df.reset_index(drop=True)
    comp = components(df) if comp is None else comp
    split, fold = _assign(comp, _text(df["label"]), _source(df), cfg)
    return pd.DataFrame({"id": _text(df["id"]).astype(str), "split": split.astype(str), "fold": fold})


def _assign(comp: np.ndarray, labels: np.ndarray, source: np.ndarray,
            cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """Split name (object array) and fold (-1 when folds are off) per row, from each row's component,
    label and official split (:func:`_source`)."""
    y = labels.astype(str)
    if not cfg.respect_source_split:
        source = np.full(len(comp), "", dtype=object)

    # per component: the most held-out official split among its rows ("" = free)
    rank = {"": 0, "train": 1, "val": 2, "test": 3}
    comp_rank = np.zeros(int(comp.max()) + 1 if len(comp) else 0, dtype=int)
    np.maximum.at(comp_rank, comp, [rank[s] for s in source])
    split = np.array(list(rank), dtype=object)[comp_rank[comp]]

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

    fold = np.full(len(comp), -1, dtype=int)
    if cfg.folds > 1:
        n_groups = int(comp.max()) + 1 if len(comp) else 0
        if n_groups < cfg.folds:
            raise ValueError(f"split.folds={cfg.folds} needs at least that many independent groups "
                             f"(patients/slides after merging duplicates); found {n_groups}")
        if (pd.Series(y).value_counts() < cfg.folds).all():
            raise ValueError(f"split.folds={cfg.folds} exceeds the rows of every class")
        sgkf = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
        for k, (_, held) in enumerate(sgkf.split(np.zeros(len(comp)), y, groups=comp)):
            fold[held] = k
    return split, fold


def count_table(labels: pd.Series, splits: pd.Series) -> pd.DataFrame:
    """Per-class x per-split counts (classes sorted) with a ``total`` column and a ``total`` row."""
    codes, uniques = pd.factorize(np.asarray(labels, dtype=object))
    order = np.argsort(uniques.astype(str), kind="stable")
    names, label_index = uniques[order].astype(str), np.argsort(order)[codes]
    split_index = pd.Index(SPLITS).get_indexer(np.asarray(splits, dtype=object))
    counts = np.zeros((len(names), len(SPLITS)), dtype=np.int64)
    known = split_index >= 0
    np.add.at(counts, (label_index[known], split_index[known]), 1)
    table = pd.DataFrame(counts, index=pd.Index(names, name="label"), columns=list(SPLITS))
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def run_split(manifest_csv: str | Path, splits_csv: str | Path, counts_csv: str | Path,
              cfg: SplitConfig) -> dict:
    """Split the manifest; write ``splits_csv`` (id, split, fold) and the per-class count table."""
    df = read_manifest(manifest_csv, ["id", "label", "group", "pixel_hash", "source_split"])
    comp = components(df)
    labels, src = _text(df["label"]), _source(df)
    split, fold = _assign(comp, labels, src, cfg)
    out = pd.DataFrame({"id": _text(df["id"]).astype(str), "split": split.astype(str), "fold": fold})
    table = count_table(labels, split)
    atomic_write_csv(splits_csv, out)
    atomic_write(counts_csv, table.to_csv(index_label="label"))
    n = len(out)
    counts = {s: int((split == s).sum()) for s in SPLITS}
    official = set(src) - {""}
    carved = (src == "train") & (split == "val") & ("val" not in official)
    moved = (src != "") & (src != split) & ~carved
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
