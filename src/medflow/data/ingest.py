"""Ingest: a source -> ``manifest.csv``, ``quarantine.csv``, ``pixels.npy``, ``ingest_summary.json``.

Each image is read once and decoded once: its bytes give the ``sha256`` (what ``sha256sum`` prints for
the file; npz: of the array's bytes) and the decode gives its pixel hash, statistics and the resized
model input, which is written straight into ``pixels.npy`` (chunk by chunk, so memory
does not grow with the dataset). Chunks of records run on ``ingest.workers`` threads (OpenCV and
hashing release the GIL); a chunk of same-shaped 8-bit arrays (MedMNIST) is converted and measured
as one batch. ``pixels.npy`` has one row per record that reached decoding: the manifest's ``row``
column points into it, and rows of records quarantined after decoding are left unreferenced. Every
unusable input lands in the quarantine table with a reason, and ``found = accepted + quarantined``
is printed and stored. Identical pixels (same ``pixel_hash``) under two different labels are all
quarantined (``conflicting_labels``); identical pixels under one label are kept. Images without a
patient/slide id (each then its own group) and a single group holding every image are warned about.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medflow.concurrency import ordered_map
from medflow.config import DataConfig, IngestConfig
from medflow.data.images import (
    STATS,
    BadImage,
    batch_stats,
    check_dimensions,
    decode_any,
    decode_array,
    image_stats,
    pixel_hash,
    to_model_input,
)
from medflow.data.manifest import EXTRA, MANIFEST_COLUMNS, QUARANTINE_COLUMNS
from medflow.data.sources import (
    Record,
    SourceError,
    detect_format,
    extra_records,
    list_records,
    natural_key,
)
from medflow.io import atomic_write, atomic_write_json, preallocate, records_csv_bytes
from medflow.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")
# (manifest fields, group from the file itself, model input) or a (reason, detail) problem
Result = tuple[dict[str, Any] | None, str | None, np.ndarray | None, tuple[str, str] | None]
META_FIELDS = ("modality", "pixel_spacing", "slice_thickness", "window")  # manifest columns of DICOM metadata
NO_META = dict.fromkeys(META_FIELDS)


def process_record(rec: Record, data: DataConfig, cfg: IngestConfig) -> Result:
    """Decode one record once; return its manifest fields and model input, or its problem."""
    try:
        if rec.array is not None:
            raw = np.ascontiguousarray(rec.array).data  # what an array's sha256 is of
            dec = decode_array(rec.array, max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_side=cfg.max_side)
            nbytes = rec.array.nbytes
        else:
            assert rec.file is not None
            with open(rec.file, "rb") as f:
                raw = f.read()
            dec, nbytes = decode_any(raw, rec.file, data, cfg), len(raw)
    except BadImage as e:
        return None, None, None, (e.reason, e.detail)
    except FileNotFoundError as e:
        return None, None, None, ("missing_file", str(e))
    except Exception as e:  # an input no decoder anticipated must still be quarantined, not lost
        return None, None, None, ("unreadable", f"{type(e).__name__}: {e}")
    fields: dict[str, Any] = {
        "sha256": hashlib.sha256(raw).hexdigest(), "pixel_hash": pixel_hash(dec.rgb), "format": dec.format,
        "width": dec.width, "height": dec.height, "channels": dec.channels, "bytes": nbytes,
        "bit_depth": dec.bit_depth, **image_stats(dec.rgb),
        **({k: dec.meta.get(k) for k in META_FIELDS} if dec.meta else NO_META),
    }
    return fields, dec.meta.get("patient_id"), to_model_input(dec.rgb, cfg.image_size, cfg.channels), None


def process_array_batch(recs: Sequence[Record], cfg: IngestConfig) -> list[Result] | None:
    """:func:`process_record` for a chunk of same-shaped uint8 grey or RGB arrays, as one batch;
    None when the chunk is anything else (or its shape is out of bounds): then each record goes alone."""
    first = recs[0].array
    if first is None or first.dtype != np.uint8 or not (first.ndim == 2 or first.ndim == 3 and first.shape[2] in (1, 3)):
        return None
    if any(r.array is None or r.array.shape != first.shape or r.array.dtype != first.dtype for r in recs):
        return None
    height, width = first.shape[:2]
    try:
        check_dimensions(width, height, max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_side=cfg.max_side)
    except BadImage:
        return None
    batch = np.stack([r.array for r in recs]).reshape(len(recs), height, width, -1)  # type: ignore[misc]
    channels = batch.shape[3]
    rgb = np.repeat(batch, 3, axis=3) if channels == 1 else batch
    stats = batch_stats(rgb)
    same = {"format": "npz", "width": width, "height": height, "channels": 1 if first.ndim == 2 else channels,
            "bytes": first.nbytes, "bit_depth": 8, **NO_META}
    # sha256 of each stacked row: the same bytes as its array's, as process_record hashes them
    return [({"sha256": hashlib.sha256(arr).hexdigest(), "pixel_hash": pixel_hash(img), **same,
              **dict(zip(STATS, row.tolist()))}, None, to_model_input(img, cfg.image_size, cfg.channels), None)
            for arr, img, row in zip(batch, rgb, stats)]


def ordered_chunks(fn: Callable[[int, Sequence[T]], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``fn(start, items[start:start+k])`` for consecutive chunks on a thread pool, results in input
    order, with a bounded number of chunks in flight."""
    chunk = max(1, min(64, len(items) // (workers * 16)))
    return ordered_map(lambda start: fn(start, items[start:start + chunk]), range(0, len(items), chunk), workers,
                       depth=workers * 4, name="ingest")


def _drop_conflicts(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Quarantine every copy of pixels seen under >1 label."""
    first: dict[str, str] = {}
    clashing = set()
    for r in rows:  # one dict lookup per row: label sets are built only for the (rare) clashing pixels
        if first.setdefault(r["pixel_hash"], r["label"]) != r["label"]:
            clashing.add(r["pixel_hash"])
    if not clashing:
        return rows, []
    labels: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["pixel_hash"] in clashing:
            labels[r["pixel_hash"]].add(r["label"])
    kept: list[dict[str, Any]] = []
    dropped = []
    for r in rows:
        clash = labels.get(r["pixel_hash"], ())
        if len(clash) > 1:
            detail = f"identical pixels (pixel_hash {r['pixel_hash'][:12]}) appear under labels {sorted(clash)}"
            dropped.append({"path": r["path"], "reason": "conflicting_labels", "detail": detail})
            continue
        kept.append(r)
    return kept, dropped


def reconciliation_line(found: int, accepted: int, quarantined: int, by_reason: dict[str, int]) -> str:
    """``found N = accepted A + quarantined Q (reason: n, ...)``."""
    line = f"found {found} = accepted {accepted} + quarantined {quarantined}"
    return line + (" (" + ", ".join(f"{k}: {v}" for k, v in by_reason.items()) + ")" if by_reason else "")


def grouping_warnings(rows: Sequence[dict[str, Any]], fmt: str, data: DataConfig) -> list[str]:
    """Warnings about the patient/slide groups of the accepted ``rows``: images with no id (each its own
    group, so one patient's images may be split apart) and one id shared by every image."""
    n, out = len(rows), []
    arrays = [r for r in rows if fmt == "npz" and r["source_split"] != EXTRA]  # an .npz has no ids at all
    if arrays:
        out.append(f"ingest: note: an .npz holds no patient/slide ids, so its {len(arrays)} images are split as "
                   "independent images (its official train/val/test split is kept; a missing one is carved from "
                   "train)")
    ungrouped = sum(not r["grouped"] for r in rows) - len(arrays)
    if ungrouped:
        why = [f"data.group_pattern {data.group_pattern!r} matches "
               + ("no file name at all" if ungrouped == n else "none of their file names")
               if data.group_pattern else "data.group_pattern is not set"]
        if fmt == "csv" and data.csv.group_column:  # the column replaces the pattern for the CSV's rows
            why = [f"their data.csv.group_column {data.csv.group_column!r} is empty"]
        if fmt == "dicom":
            why.append("they have no PatientID")
        out.append(
            f"ingest: WARNING {ungrouped} of {n} images have no patient/slide id ({'; '.join(why)}): each is "
            "its own group, so images of one patient or slide may land in different splits (e.g. train and "
            "test) and test scores come out too optimistic. To fix: set data.group_pattern to a regex on the "
            "file name stem whose named group 'group' is the patient/slide id, or for a CSV "
            "data.csv.group_column; DICOM files take their PatientID when the pattern does not match")
    groups = {r["group"] for r in rows}
    if n > 1 and len(groups) == 1 and not any(not r["grouped"] for r in rows):
        out.append(f"ingest: WARNING all {n} images share one patient/slide id {next(iter(groups))!r}: they form "
                   "one group, which is never divided between train, val and test, so the split stage will stop "
                   "(an anonymised DICOM PatientID does this); set data.group_pattern to take the id from the file "
                   "names")
    return out


def ingest(source: str | Path, out_dir: str | Path, data: DataConfig, cfg: IngestConfig, *,
           extra_sources: Sequence[str] = (), extra_root: str | Path = ".", progress: bool = True,
           warn_groups: bool = True) -> dict[str, Any]:
    """Ingest ``source`` (plus the class folders matching the ``extra_sources`` globs under ``extra_root``,
    train split only) into ``out_dir``; return the summary written to ``ingest_summary.json``.
    ``warn_groups``: print :func:`grouping_warnings` (off for data that is never split, e.g. a monitored batch)."""
    source, out_dir = Path(source), Path(out_dir)
    fmt = detect_format(source) if data.format == "auto" else data.format
    records = list_records(source, fmt, data) + extra_records(list(extra_sources), data.group_pattern, extra_root)
    if not records:
        raise SourceError(f"{source}: no images found (format {fmt})")
    out_dir.mkdir(parents=True, exist_ok=True)
    quarantine = [{"path": r.path, "reason": r.problem[0], "detail": r.problem[1]} for r in records if r.problem]
    todo = [r for r in records if not r.problem]
    pixels_tmp = out_dir / "pixels.npy.tmp"
    shape = (len(todo), cfg.image_size, cfg.image_size, cfg.channels)
    with open(pixels_tmp, "wb") as f:  # header only: rows are written in place, chunk by chunk
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        offset = f.tell()
    row_bytes = int(np.prod(shape[1:]))
    fd = os.open(pixels_tmp, os.O_WRONLY)
    preallocate(fd, offset + len(todo) * row_bytes, pixels_tmp)
    buffers = threading.local()

    def work(start: int, part: Sequence[Record]) -> list[tuple[dict[str, Any] | None, str | None,
                                                                  tuple[str, str] | None]]:
        results = process_array_batch(part, cfg) or [process_record(rec, data, cfg) for rec in part]
        if len(getattr(buffers, "block", ())) < len(part):  # one block per thread, reused: no page faults
            buffers.block = np.empty((len(part), *shape[1:]), np.uint8)
        block = buffers.block[:len(part)]
        for i, (_, _, small, _) in enumerate(results):
            block[i] = 0 if small is None else small  # rows of failed records are zero
        os.pwrite(fd, block.data, offset + start * row_bytes)  # GIL released
        return [(fields, group, problem) for fields, group, _, problem in results]

    rows: list[dict[str, Any]] = []
    bar = progress_bar(total=len(todo), desc="ingest", unit="img", enabled=progress)
    try:
        index = 0
        for results in ordered_chunks(work, todo, cfg.workers):
            for fields, file_group, problem in results:
                rec = todo[index]
                if problem is not None:
                    quarantine.append({"path": rec.path, "reason": problem[0], "detail": problem[1]})
                else:
                    group = rec.group or file_group
                    rows.append({"id": rec.path, "path": rec.path, "label": rec.label, "group": group or rec.path,
                                 "grouped": group is not None, "source_split": rec.source_split,
                                 **(fields or {}), "row": index})
                index += 1
            bar.update(len(results))
    finally:
        bar.close()
        os.close(fd)
    rows, conflicts = _drop_conflicts(rows)
    quarantine += conflicts

    quarantine.sort(key=lambda q: (natural_key(q["path"]), q["reason"]))
    by_reason = dict(sorted(Counter(q["reason"] for q in quarantine).items()))
    if len(records) != len(rows) + len(quarantine):
        raise RuntimeError(f"ingest lost images: {len(records)} found, {len(rows)} + {len(quarantine)} accounted")
    line = reconciliation_line(len(records), len(rows), len(quarantine), by_reason)
    per_class = Counter(r["label"] for r in rows)
    classes = list(data.labels) if data.labels else sorted(per_class, key=natural_key)
    summary = {
        "source": str(source), "format": fmt,
        "found": len(records), "accepted": len(rows), "quarantined": len(quarantine), "by_reason": by_reason,
        "classes": classes,
        "per_class": {c: per_class.get(c, 0) for c in [*classes, *sorted(set(per_class) - set(classes))]},
        "groups": len({r["group"] for r in rows}), "ungrouped": sum(not r["grouped"] for r in rows),
        "source_splits": dict(sorted(Counter(r["source_split"] for r in rows if r["source_split"]).items())),
        "image_size": cfg.image_size, "channels": cfg.channels, "reconciliation": line,
    }
    atomic_write(out_dir / "manifest.csv", records_csv_bytes(rows, MANIFEST_COLUMNS))
    atomic_write(out_dir / "quarantine.csv", records_csv_bytes(quarantine, QUARANTINE_COLUMNS))
    os.replace(pixels_tmp, out_dir / "pixels.npy")
    atomic_write_json(out_dir / "ingest_summary.json", summary)
    print(line, file=sys.stderr)
    for warning in grouping_warnings(rows, fmt, data) if warn_groups else ():
        print(warning, file=sys.stderr)
    return summary
