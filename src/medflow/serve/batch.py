"""`medflow predict`: batched predictions for files, folders, CSV lists and DICOM files -> one CSV."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.config import CsvSource, DataConfig, IngestConfig
from medflow.data.images import BadImage, load_image_file
from medflow.data.sources import csv_files, natural_key
from medflow.io import atomic_write_csv
from medflow.progress import progress_bar
from medflow.serve.predictor import Predictor


def expand_inputs(paths: Iterable[str | Path], data_cfg: DataConfig) -> list[Path]:
    """Files as given; folders recursively (sorted, hidden entries skipped); a ``.csv``/``.tsv`` list by its
    image column, resolved as ``medflow ingest`` resolves it (:func:`_csv_list`). Paths that do not exist are
    kept so that they are reported as ``missing_file``.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.suffix.lower() in (".csv", ".tsv") and p.is_file():
            out += _csv_list(p, data_cfg.csv)
        else:
            out.append(p)
    return out


def _csv_list(csv_path: Path, csv_cfg: CsvSource) -> list[Path]:
    """The files a CSV/TSV list names, resolved by ingest's own reader (:func:`medflow.data.sources.csv_files`;
    no label column needed); one path per distinct file, in ingest's (natural) order; empty names skipped."""
    _, files = csv_files(csv_path, csv_cfg)
    return [csv_path.parent / rel for rel in sorted({rel for name, rel in files if name}, key=natural_key)]


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _load(path: Path, predictor: Predictor) -> tuple[np.ndarray, list[str]] | BadImage:
    """The model input for one file and its warnings (:meth:`Predictor.warnings`), or the reason it cannot
    be read (never raises)."""
    try:
        decoded = load_image_file(path, predictor.data_cfg, predictor.ingest_cfg)
        return predictor.model_input(decoded.rgb), predictor.warnings(decoded)
    except BadImage as e:
        return e
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, never fatal
        return BadImage("unreadable", f"{type(e).__name__}: {e}")


def predict_paths(
    paths: Iterable[str | Path],
    out_csv: str | Path,
    *,
    champion_json: str | Path,
    data_cfg: DataConfig,
    ingest_cfg: IngestConfig,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every image under ``paths``; write ``out_csv`` (atomically) and return a summary.

    CSV columns: file, status (ok|error), reason, detail, predicted, confidence, warnings, one ``p_<class>``
    per class, model_version. ``warnings`` says, "; "-joined, how an image differs from the model's training
    images (:mod:`medflow.serve.profile`; empty when it matches or the record has no input profile); the
    summary counts those rows (``unlike_training_data``). Files that cannot be read get status ``error`` with
    a reason code (as in the ingest quarantine) instead of stopping the run. Decoding runs on
    ``ingest_cfg.workers`` threads; the model sees ``batch_size`` images per call.
    """
    predictor = Predictor(champion_json, data_cfg, ingest_cfg)
    if predictor.profile is None:
        print(f"note: {champion_json} has no input_profile (written before `medflow compare` recorded one): "
              "inputs are not checked against the training images", file=sys.stderr)
    files = expand_inputs(paths, data_cfg)
    prob_cols = [f"p_{c}" for c in predictor.classes]
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(ingest_cfg.workers) as pool, progress_bar(
        total=len(files), unit="img", desc="predict", enabled=progress
    ) as bar:
        for chunk in _chunks(files, max(1, batch_size)):
            loaded = list(pool.map(lambda f: _load(f, predictor), chunk))
            good = [x[0] for x in loaded if not isinstance(x, BadImage)]
            proba = iter(predictor.probabilities(np.stack(good)) if good else [])
            for path, x in zip(chunk, loaded):
                row: dict[str, Any] = {"file": str(path), "model_version": predictor.version}
                if isinstance(x, BadImage):
                    row.update(status="error", reason=x.reason, detail=x.detail)
                else:
                    p = next(proba)
                    k = int(p.argmax())
                    row.update(status="ok", predicted=predictor.classes[k], confidence=float(p[k]),
                               warnings="; ".join(x[1]), **dict(zip(prob_cols, map(float, p))))
                rows.append(row)
            bar.update(len(chunk))

    columns = ["file", "status", "reason", "detail", "predicted", "confidence", "warnings", *prob_cols,
               "model_version"]
    df = pd.DataFrame(rows, columns=columns)
    out_csv = atomic_write_csv(out_csv, df)
    ok = df["status"] == "ok"
    return {
        "files": len(df),
        "predicted": int(ok.sum()),
        "failed": int((~ok).sum()),
        "by_reason": dict(Counter(df.loc[~ok, "reason"])),
        "per_class": {c: int(n) for c, n in df.loc[ok, "predicted"].value_counts().items()},
        # predicted images unlike the training images: their prediction may be meaningless
        "unlike_training_data": int((ok & (df["warnings"].fillna("") != "")).sum()),
        "input_checked": predictor.profile is not None,
        "model_version": predictor.version,
        "out_csv": str(out_csv),
    }
