"""Ingest: a source -> ``manifest.csv``, ``quarantine.csv``, ``pixels.npy``, ``ingest_summary.json``.

Each image is read once and decoded once; from that decode come its pixel hash, statistics and
the resized model input, which is written straight into ``pixels.npy`` (a memory map, so memory
does not grow with the dataset). Decoding runs on ``ingest.workers`` threads (OpenCV releases the
GIL). Every unusable input lands in the quarantine table with a reason, and
``found = accepted + quarantined`` is printed and stored. Identical pixels under two different
labels are all quarantined (``conflicting_labels``); identical pixels under one label are kept.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from medflow.config import DataConfig, IngestConfig
from medflow.data.images import (
    BadImage,
    decode_any,
    decode_array,
    image_stats,
    pixel_sha256,
    to_model_input,
)
from medflow.data.manifest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS
from medflow.data.sources import (
    Record,
    SourceError,
    detect_format,
    extra_records,
    list_records,
    natural_key,
)
from medflow.io import atomic_write_csv, atomic_write_json

T = TypeVar("T")
R = TypeVar("R")
# (manifest fields, group from the file itself, model input) or a (reason, detail) problem
Result = tuple[dict[str, Any] | None, str | None, np.ndarray | None, tuple[str, str] | None]


def process_record(rec: Record, data: DataConfig, cfg: IngestConfig) -> Result:
    """Decode one record once; return its manifest fields and model input, or its problem."""
    limits = dict(max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_side=cfg.max_side)
    try:
        if rec.array is not None:
            dec, nbytes = decode_array(rec.array, **limits), rec.array.nbytes
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
        "sha256": pixel_sha256(dec.rgb), "format": dec.format, "width": dec.width, "height": dec.height,
        "channels": dec.channels, "bytes": nbytes, "bit_depth": dec.bit_depth, **image_stats(dec.rgb),
        **{k: dec.meta.get(k) for k in ("modality", "pixel_spacing", "slice_thickness", "window")},
    }
    return fields, dec.meta.get("patient_id"), to_model_input(dec.rgb, cfg.image_size, cfg.channels), None


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``map`` on a thread pool, in input order, with a bounded number of chunks in flight."""
    chunk = max(1, min(64, len(items) // (workers * 8)))
    run = lambda part: [fn(x) for x in part]  # noqa: E731
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
        pending: deque = deque()
        for start in range(0, len(items), chunk):
            pending.append(pool.submit(run, items[start:start + chunk]))
            if len(pending) >= workers * 4:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def shrink_npy(path: Path, n_rows: int) -> None:
    """Keep the first ``n_rows`` of an .npy in place (numpy pads headers so the length is unchanged)."""
    fmt = np.lib.format
    with open(path, "r+b") as f:
        version = fmt.read_magic(f)
        read, write = ((fmt.read_array_header_1_0, fmt.write_array_header_1_0) if version == (1, 0)
                       else (fmt.read_array_header_2_0, fmt.write_array_header_2_0))
        shape, fortran, dtype = read(f)
        offset = f.tell()
        if shape[0] == n_rows:
            return
        f.seek(0)
        write(f, {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran, "shape": (n_rows, *shape[1:])})
        if f.tell() != offset:
            raise RuntimeError(f"{path}: .npy header changed length while shrinking")
        f.truncate(offset + n_rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _drop_conflicts(rows: list[dict[str, Any]], pixels: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Quarantine every copy of pixels seen under >1 label; compact the kept rows of ``pixels``."""
    labels: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        labels[r["sha256"]].add(r["label"])
    kept: list[dict[str, Any]] = []
    dropped = []
    for r in rows:
        clash = labels[r["sha256"]]
        if len(clash) > 1:
            detail = f"identical pixels (sha256 {r['sha256'][:12]}) appear under labels {sorted(clash)}"
            dropped.append({"path": r["path"], "reason": "conflicting_labels", "detail": detail})
            continue
        if r["row"] != len(kept):
            pixels[len(kept)] = pixels[r["row"]]
            r["row"] = len(kept)
        kept.append(r)
    return kept, dropped


def reconciliation_line(found: int, accepted: int, quarantined: int, by_reason: dict[str, int]) -> str:
    """``found N = accepted A + quarantined Q (reason: n, ...)``."""
    line = f"found {found} = accepted {accepted} + quarantined {quarantined}"
    return line + (" (" + ", ".join(f"{k}: {v}" for k, v in by_reason.items()) + ")" if by_reason else "")


def ingest(source: str | Path, out_dir: str | Path, data: DataConfig, cfg: IngestConfig, *,
           extra_sources: Sequence[str] = (), extra_root: str | Path = ".", progress: bool = True) -> dict[str, Any]:
    """Ingest ``source`` (plus the class folders matching the ``extra_sources`` globs under ``extra_root``,
    train split only) into ``out_dir``; return the summary written to ``ingest_summary.json``."""
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
    pixels = np.lib.format.open_memmap(pixels_tmp, mode="w+", dtype=np.uint8, shape=shape)
    offset, row_bytes = pixels.offset, int(np.prod(shape[1:]))
    fd = os.open(pixels_tmp, os.O_WRONLY)

    def work(item: tuple[int, Record]) -> tuple[dict[str, Any] | None, str | None, tuple[str, str] | None]:
        index, rec = item
        fields, file_group, small, problem = process_record(rec, data, cfg)
        if small is not None:  # rows of failed records are compacted away below
            os.pwrite(fd, small.data, offset + index * row_bytes)  # no page faults, GIL released
        return fields, file_group, problem

    rows: list[dict[str, Any]] = []
    results = ordered_map(work, list(enumerate(todo)), cfg.workers)
    for index, (rec, (fields, file_group, problem)) in enumerate(tqdm(
        zip(todo, results), total=len(todo), desc="ingest", unit="img", disable=not progress, file=sys.stderr
    )):
        if problem is not None:
            quarantine.append({"path": rec.path, "reason": problem[0], "detail": problem[1]})
            continue
        group = rec.group or file_group
        rows.append({"id": rec.path, "path": rec.path, "label": rec.label, "group": group or rec.path,
                     "grouped": group is not None, "source_split": rec.source_split, **(fields or {}),
                     "row": index})
    os.close(fd)
    rows, conflicts = _drop_conflicts(rows, pixels)
    quarantine += conflicts
    del pixels  # unmapped without msync: the page cache serves the renamed file
    shrink_npy(pixels_tmp, len(rows))

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
    atomic_write_csv(out_dir / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    atomic_write_csv(out_dir / "quarantine.csv", pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS))
    os.replace(pixels_tmp, out_dir / "pixels.npy")
    atomic_write_json(out_dir / "ingest_summary.json", summary)
    print(line, file=sys.stderr)
    return summary
