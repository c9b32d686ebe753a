"""Where every stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class OutOfDate(RuntimeError):
    """A stage's input is missing or no longer matches what was made from it; the message names the command to run."""


def require(path: Path, run: str) -> Path:
    """``path``, or :class:`OutOfDate` saying it is not there yet and that ``run`` makes it."""
    if not Path(path).exists():
        raise OutOfDate(f"{path} not found: run `{run}` first (or `dvc repro`)")
    return Path(path)


def batch_name(source: Path) -> str:
    """A batch's folder (or file stem) name with anything but letters, digits, ``_ . -`` replaced by ``_``."""
    name = source.stem if source.is_file() else source.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "batch"


def free_name(name: str, *parents: Path) -> str:
    """``name``, or ``name-1``, ``name-2`` ... : the first taken in none of ``parents`` (nothing is overwritten)."""
    free, n = name, 1
    while any((parent / free).exists() for parent in parents):
        free, n = f"{name}-{n}", n + 1
    return free


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    # ingest
    @property
    def interim(self) -> Path:
        return self.root / "data" / "interim"

    @property
    def manifest(self) -> Path:
        return self.interim / "manifest.csv"

    @property
    def quarantine(self) -> Path:
        return self.interim / "quarantine.csv"

    @property
    def pixels(self) -> Path:
        """Decoded, colour-converted, resized images (uint8 .npy, row-aligned with the manifest)."""
        return self.interim / "pixels.npy"

    @property
    def ingest_summary(self) -> Path:
        return self.interim / "ingest_summary.json"

    # validate
    @property
    def validation_dir(self) -> Path:
        return self.root / "reports" / "validation"

    # split
    @property
    def splits(self) -> Path:
        return self.root / "data" / "interim" / "splits.csv"

    @property
    def split_counts(self) -> Path:
        return self.root / "reports" / "split_counts.csv"

    # preprocess
    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    # embeddings / models / evaluation
    @property
    def embeddings(self) -> Path:
        return self.root / "data" / "embeddings"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def metrics(self, name: str) -> Path:
        return self.root / "reports" / "metrics" / f"{name}.json"

    def eval_dir(self, name: str) -> Path:
        return self.root / "reports" / "eval" / name

    @property
    def comparison(self) -> Path:
        return self.root / "reports" / "comparison.csv"

    @property
    def champion(self) -> Path:
        return self.root / "models" / "champion.json"

    @property
    def deployed_champion(self) -> Path:
        """The record of the deployed model (``models/production``, set by promote/rollback), else the last
        run's champion: what serve, predict and monitor use unless told otherwise."""
        record = self.root / "models" / "production" / "champion.json"
        return record if record.exists() else self.champion

    @property
    def report(self) -> Path:
        return self.root / "reports" / "index.html"

    @property
    def monitoring(self) -> Path:
        return self.root / "reports" / "monitoring"
