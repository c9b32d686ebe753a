"""The manifest: one row per accepted image; the interface between every stage.

Columns (README documents them too):
  id           stable unique id (source-relative path, or ``file.npz:split:index``)
  path         path relative to the source root (npz: ``<file>.npz:<split>:<index>``)
  label        class name (string)
  group        patient / slide / eye-pair id; rows sharing it never cross splits
  source_split train|val|test when the source fixes it, ``extra`` for rows of ``data.extra_sources``
               (labelled batches added by retraining), else empty
  sha256       sha256 of the file's bytes, as ``sha256sum`` prints it (npz: of the array's bytes)
  pixel_hash   xxh3-128 of the decoded 8-bit pixels: exact duplicates share it, whatever the encoding
  format       png|jpeg|bmp|tiff|npz|dicom|...
  width height channels bytes   as found in the source (before conversion)
  bit_depth    8 or 16 as found
  mean std     grey-level statistics of the converted 8-bit image (0-255)
  sharpness    variance of the Laplacian of the grey image
  mean_r mean_g mean_b   per-channel means of the converted RGB image
  modality pixel_spacing slice_thickness window   DICOM only (empty otherwise)
  row          row index into pixels.npy
Quarantine columns: path, reason, detail.
"""

from __future__ import annotations

MANIFEST_COLUMNS = [
    "id", "path", "label", "group", "source_split", "sha256", "pixel_hash", "format",
    "width", "height", "channels", "bytes", "bit_depth",
    "mean", "std", "sharpness", "mean_r", "mean_g", "mean_b",
    "modality", "pixel_spacing", "slice_thickness", "window", "row",
]
QUARANTINE_COLUMNS = ["path", "reason", "detail"]
SPLITS = ("train", "val", "test")
EXTRA = "extra"  # source_split of rows from data.extra_sources: training data that never moves a split
EXCLUDED = "excluded"  # split of extra rows linked to val/test rows: in no split, so val/test stay fixed
