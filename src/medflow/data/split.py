"""Stratified, grouped train/val/test split (+ optional grouped stratified K-fold).

Leakage rule: rows that share a ``group`` (patient / slide) **or** a ``pixel_hash`` (exact duplicate
pixels) form one connected component; a component never crosses splits or folds.

How rows are placed:
  * Official splits (``source_split`` non-empty, ``respect_source_split``) are kept. A component that
    spans two official splits goes to the most held-out one (test > val > train) so no duplicate
    leaks; the number of rows moved that way is reported. When the source has train but no val
    and/or no test, the missing ones are carved from the official train part at their ratios
    (e.g. ``val / (train + val)``).
  * Rows of ``data.extra_sources`` (``source_split`` ``extra``: labelled batches added by retraining)
    never move the other rows: those are split as if the extra rows did not exist, so val and test
    stay exactly as they were. An extra row goes to train, unless it shares a group or pixels with a
    val/test row: then its split is ``excluded`` (in no split, reported), as putting it in train
    would leak and putting it in val/test would change them.
  * Everything else is split by a seeded greedy: components, largest first (ties in seeded random
    order), each go to the split whose per-class deficit they fill best (least squared error of the
    class-normalised counts against ``ratio * class total``). scikit-learn's StratifiedGroupKFold
    uses the same greedy idea but only for equal-sized folds, so it would need 10 folds (and ≥ 10
    groups) to express 60:10:30.
  * ``folds > 1``: every row (all splits) also gets a ``fold`` from scikit-learn's
    StratifiedGroupKFold over the same components, for grouped K-fold cross-validation on the whole
    dataset; ``fold`` is -1 when folds are off.

:func:`run_split` stops (:class:`SplitError`) when a split would be empty or a class has no train row
(the model could never learn it), and warns when a class has no val or test row.
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
from medflow.data.manifest import EXCLUDED, EXTRA, SPLITS
from medflow.data.sources import SourceError
from medflow.io import atomic_write, atomic_write_csv, read_csv

_TEXT_COLUMNS = ("id", "path", "label", "group", "source_split", "sha256", "pixel_hash", "format",
                 "modality", "window")


class SplitError(SourceError):
    """The data cannot be split as configured (an empty split, a class with no train rows, too many
    folds): bad input, shown as one message, never retried."""


def read_manifest(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read manifest.csv (only those of ``columns`` it has, when given) keeping identifiers and labels
    as text (labels like '0' stay strings)."""
    return read_csv(path, columns, text=_TEXT_COLUMNS)


def _text(col: pd.Series) -> np.ndarray:
    """Stripped text per row, "" where missing (an object array of str)."""
    return np.array([v.strip() if isinstance(v, str) else "" if v is None or v is pd.NA or v != v else str(v).strip()
                     for v in col.tolist()], dtype=object)


def _source(df: pd.DataFrame) -> np.ndarray:
    """Official split per row (lower-case train/val/test), ``extra`` for rows of ``data.extra_sources``,
    "" where the source sets none."""
    if "source_split" not in df:
        return np.full(len(df), "", dtype=object)
    return np.array([s if s in (*SPLITS, EXTRA) else "" for s in (v.lower() for v in _text(df["source_split"]))],
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
    return _assigned(df, components(df) if comp is None else comp, cfg, _text(df["label"]), _source(df))


def _assigned(df: pd.DataFrame, comp: np.ndarray, cfg: SplitConfig, labels: np.ndarray,
              source: np.ndarray) -> pd.DataFrame:
    """:func:`assign_splits` given the manifest's :func:`components`, :func:`_text` labels and :func:`_source`."""
    split, fold = _split_rows(df, comp, cfg, labels.astype(str), source)
    return pd.DataFrame({"id": _text(df["id"]).astype(str), "split": split.astype(str), "fold": fold})


def _split_rows(df: pd.DataFrame, comp: np.ndarray, cfg: SplitConfig, labels: np.ndarray,
                source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split name (object array) and fold (-1 when folds are off) per row of the manifest ``df``, whose
    :func:`components` are ``comp`` (``labels``, ``source``: its labels and official splits); extra rows as
    in the module docstring."""
    extra = source == EXTRA
    if not extra.any():
        return _assign(comp, labels, source, cfg), _folds(comp, labels, cfg)
    base = ~extra
    split = np.empty(len(df), dtype=object)
    split[base] = _assign(components(df[base].reset_index(drop=True)), labels[base], source[base], cfg)
    held_out = np.zeros(int(comp.max()) + 1, dtype=bool)  # components holding a val/test row
    held_out[comp[base][split[base] != "train"]] = True
    split[extra] = np.where(held_out[comp[extra]], EXCLUDED, "train")
    return split, _folds(comp, labels, cfg)


def _assign(comp: np.ndarray, labels: np.ndarray, source: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Split name per row (object array), from each row's component, label and official split
    (:func:`_source`, without ``extra``)."""
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
    missing = [s for s in ("val", "test") if s not in official]
    carve = (split == "train") & ~free
    if official and missing and carve.any() and not free.any():
        sub = pd.factorize(comp[carve])[0]
        names = ["train", *missing]
        total = sum(getattr(cfg, s) for s in names)
        picked = _greedy(sub, y[carve], names, [getattr(cfg, s) / total for s in names], cfg.seed)
        split[carve] = [picked[c] for c in sub]
    return split


def _folds(comp: np.ndarray, labels: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Grouped stratified fold per row over all rows (-1 everywhere when ``cfg.folds`` <= 1)."""
    y = labels.astype(str)
    fold = np.full(len(comp), -1, dtype=int)
    if cfg.folds > 1:
        n_groups = int(comp.max()) + 1 if len(comp) else 0
        if n_groups < cfg.folds:
            raise SplitError(f"split.folds={cfg.folds} needs at least that many independent groups "
                             f"(patients/slides after merging duplicates); found {n_groups}")
        if (pd.Series(y).value_counts() < cfg.folds).all():
            raise SplitError(f"split.folds={cfg.folds} exceeds the rows of every class")
        sgkf = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
        for k, (_, held) in enumerate(sgkf.split(np.zeros(len(comp)), y, groups=comp)):
            fold[held] = k
    return fold


def count_table(labels: pd.Series, splits: pd.Series) -> pd.DataFrame:
    """Per-class x per-split counts (classes sorted) with a ``total`` column and a ``total`` row; an
    ``excluded`` column too when rows have that split."""
    codes, uniques = pd.factorize(np.asarray(labels, dtype=object))
    order = np.argsort(uniques.astype(str), kind="stable")
    names, label_index = uniques[order].astype(str), np.argsort(order)[codes]
    splits = np.asarray(splits, dtype=object)
    columns = [*SPLITS, EXCLUDED] if (splits == EXCLUDED).any() else list(SPLITS)
    split_index = pd.Index(columns).get_indexer(splits)
    counts = np.zeros((len(names), len(columns)), dtype=np.int64)
    known = split_index >= 0
    np.add.at(counts, (label_index[known], split_index[known]), 1)
    counts = np.column_stack([counts, counts.sum(axis=1)])
    counts = np.vstack([counts, counts.sum(axis=0)])  # the totals computed in numpy: pandas' row append is slow
    return pd.DataFrame(counts, index=pd.Index([*names.tolist(), "total"], name="label"), columns=[*columns, "total"])


def _check_classes(table: pd.DataFrame, official: bool) -> list[str]:
    """Stop when a class of the :func:`count_table` has no train row; return a warning per class with no
    val or test row. ``official``: the source's own splits were kept."""
    classes = table.drop(index="total")

    def counts(c: str) -> str:
        return ", ".join(f"{s} {int(classes.loc[c, s])}" for s in SPLITS)

    more = "add images of it from more patients/slides (a patient/slide is never divided between splits)"
    untrained = classes.index[classes["train"] == 0].tolist()
    if untrained:
        fix = ("move some of its images (whole patients/slides) into train/, or set split.respect_source_split: "
               "false to re-split the official splits" if official else more)
        raise SplitError("split: " + "; ".join(f"class {c!r} has no training images ({counts(c)})" for c in untrained)
                         + f": the model could never learn {'it' if len(untrained) == 1 else 'them'}. To fix: "
                         f"{fix}, or remove the class from the source.")
    effect = {"val": "validation loss, early stopping and the kept epoch ignore it",
              "test": "its test metrics cannot be measured"}
    warnings = []
    for c in classes.index:
        missing = [s for s in ("val", "test") if classes.loc[c, s] == 0]
        if missing:
            fix = (f"move some of its images (whole patients/slides) into {' and '.join(m + '/' for m in missing)}, "
                   "or set split.respect_source_split: false" if official else more)
            warnings.append(f"split: WARNING class {c!r} has no {' or '.join(missing)} images ({counts(c)}): "
                            f"{'; '.join(effect[m] for m in missing)}. To fix: {fix}")
    return warnings


def run_split(manifest_csv: str | Path, splits_csv: str | Path, counts_csv: str | Path,
              cfg: SplitConfig) -> dict:
    """Split the manifest; write ``splits_csv`` (id, split, fold) and the per-class count table.
    Stops with a :class:`SplitError` when a split would be empty (training needs all three) or a class
    has no train row; warns when a class has no val or test row."""
    df = read_manifest(manifest_csv, ["id", "label", "group", "pixel_hash", "source_split"])
    comp, labels, src = components(df), _text(df["label"]), _source(df)
    out = _assigned(df, comp, cfg, labels, src)
    split = out["split"].to_numpy(dtype=object)
    n = len(out)
    counts = {s: int((split == s).sum()) for s in SPLITS}
    if n and (empty := [s for s in SPLITS if not counts[s]]):
        raise SplitError(
            f"split: no rows in {'/'.join(empty)} ({counts}, {int(comp.max()) + 1} independent groups "
            f"of patients/slides/duplicates). Every split needs rows: add data or groups, or change "
            f"split.train/val/test; with official splits, split.respect_source_split: false re-splits them")
    table = count_table(labels, split)
    class_warnings = _check_classes(table, bool(cfg.respect_source_split and set(src) - {"", EXTRA}))
    atomic_write_csv(splits_csv, out)
    atomic_write(counts_csv, table.to_csv(index_label="label"))
    official = set(src) - {"", EXTRA}
    carved = (src == "train") & np.isin(split, [s for s in ("val", "test") if s not in official])
    moved = (src != "") & (src != EXTRA) & (src != split) & ~carved
    extra = src == EXTRA
    excluded = int((split == EXCLUDED).sum())
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
    if extra.any():  # rows of data.extra_sources: in train, or excluded when linked to val/test rows
        summary |= {"extra_rows": int(extra.sum()), "excluded": excluded}
    ratio_text = ":".join(f"{counts[s]}" for s in SPLITS)
    print(f"split: {n} rows in {summary['components']} independent groups -> "
          f"train:val:test = {ratio_text}"
          + (f", {cfg.folds} grouped folds" if cfg.folds > 1 else ""), file=sys.stderr)
    for warning in class_warnings:
        print(warning, file=sys.stderr)
    if summary["moved_from_source_split"]:
        print(f"split: WARNING {summary['moved_from_source_split']} of {n} rows "
              f"({summary['moved_from_source_split'] / n:.0%}) moved off the source's official split: their "
              "patient/slide group or identical pixels span two official splits (check data.group_pattern; set "
              "split.respect_source_split: false to split afresh)", file=sys.stderr)
    if excluded:
        print(f"split: {excluded} of {int(extra.sum())} extra rows share a patient/slide or pixels with val/test "
              f"rows: split '{EXCLUDED}' in {splits_csv} (not trained on, so val/test stay as they were)",
              file=sys.stderr)
    return summary
