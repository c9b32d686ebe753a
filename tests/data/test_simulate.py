"""The batch simulator: held-out originals, each shift's measurable effect, class-prior shift, label
shuffling, and batches that the real ingest reads."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medflow.config import DataConfig, IngestConfig, SplitConfig
from medflow.monitor.simulate import (
    SHIFTS,
    SIMULATED_MARKER,
    apply_shift,
    held_out,
    make_batch,
    simulate_batch,
)

MALARIA = Path(__file__).resolve().parents[2] / "data" / "raw" / "malaria-cells-400"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    assert MALARIA.is_dir(), f"embedded malaria sample missing at {MALARIA} (shipped in the repository)"
    from medflow.data.ingest import ingest
    from medflow.data.split import run_split

    out = tmp_path_factory.mktemp("sim")
    data, cfg = DataConfig(source=str(MALARIA)), IngestConfig(image_size=32)
    ingest(MALARIA, out, data, cfg, progress=False)
    run_split(out / "manifest.csv", out / "splits.csv", out / "counts.csv", SplitConfig())
    images, labels = held_out(MALARIA, out / "manifest.csv", out / "splits.csv", data, cfg)
    return SimpleNamespace(out=out, data=data, cfg=cfg, images=images, labels=labels)


def _read(batch: Path) -> list[tuple[str, np.ndarray]]:
    files = sorted(p for p in batch.rglob("*") if p.is_file() and p.name != SIMULATED_MARKER)
    return [(p.parent.name, cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)) for p in files]


def _digest(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode()).hexdigest()


def test_held_out_are_the_test_rows_at_original_resolution(source: SimpleNamespace) -> None:
    manifest = pd.read_csv(source.out / "manifest.csv", dtype={"id": str})
    test = manifest.merge(pd.read_csv(source.out / "splits.csv", dtype={"id": str}), on="id").query("split == 'test'")
    assert len(source.images) == len(test) > 0
    assert Counter(source.labels) == Counter(test["label"])
    sizes = {im.shape[:2] for im in source.images}
    assert len(sizes) > 5 and all(im.dtype == np.uint8 and im.shape[2] == 3 for im in source.images)
    assert sorted((im.shape[1], im.shape[0]) for im in source.images) == sorted(zip(test["width"], test["height"]))


def test_no_shift_writes_the_original_pixels(source: SimpleNamespace, tmp_path: Path) -> None:
    info = simulate_batch(source.images, source.labels, tmp_path / "b", shift="none", n=40, seed=1)
    written = _read(tmp_path / "b")
    originals = {_digest(im): lab for im, lab in zip(source.images, source.labels)}
    assert info["n"] == len(written) == 40
    assert all(originals[_digest(rgb)] == lab for lab, rgb in written)  # lossless PNG, right class folder
    assert sum(info["per_class"].values()) == 40
    assert not (tmp_path / "b" / SIMULATED_MARKER).exists()  # images from elsewhere: not marked


def test_strength_zero_is_identity() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for shift in SHIFTS:
        assert np.array_equal(apply_shift(rgb, shift, 0.0, np.random.default_rng(0)), rgb)


def _stats(rgb: np.ndarray) -> dict[str, float]:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return {"mean": grey.mean(), "std": grey.std(), "sharp": cv2.Laplacian(grey, cv2.CV_64F).var(),
            "rgb": rgb.reshape(-1, 3).mean(axis=0)}


@pytest.mark.parametrize("shift", ["stain", "brightness", "contrast", "blur", "noise", "resolution"])
def test_each_pixel_shift_moves_its_statistic(source: SimpleNamespace, shift: str) -> None:
    rng = np.random.default_rng(0)
    before = [_stats(im) for im in source.images[:30]]
    after = [_stats(apply_shift(im, shift, 1.0, rng)) for im in source.images[:30]]
    b, a = pd.DataFrame(before), pd.DataFrame(after)
    if shift == "brightness":
        assert (a["mean"] - b["mean"]).min() > 20
    elif shift == "contrast":
        assert (a["std"] < 0.5 * b["std"]).all()
    elif shift == "blur":
        assert (a["sharp"] < 0.5 * b["sharp"]).all()
    elif shift == "noise":
        assert (a["sharp"] > 2 * b["sharp"]).all()
    elif shift == "stain":
        delta = np.abs(np.stack(a["rgb"]) - np.stack(b["rgb"])).mean(axis=0)
        assert delta.max() > 10  # colour moved; geometry untouched
        assert all(apply_shift(im, shift, 1.0, rng).shape == im.shape for im in source.images[:5])
    elif shift == "resolution":
        shifted = [apply_shift(im, shift, 1.0, rng) for im in source.images[:30]]
        assert all(s.shape[0] < im.shape[0] and s.shape[1] < im.shape[1]
                   for s, im in zip(shifted, source.images[:30]) if min(im.shape[:2]) > 16)


def test_jpeg_writes_jpeg_files(source: SimpleNamespace, tmp_path: Path) -> None:
    simulate_batch(source.images, source.labels, tmp_path / "j", shift="jpeg", strength=1.0, n=20, seed=0)
    files = [p for p in (tmp_path / "j").rglob("*") if p.is_file() and p.name != SIMULATED_MARKER]
    assert len(files) == 20 and all(p.suffix == ".jpg" and p.read_bytes()[:2] == b"\xff\xd8" for p in files)


def test_prior_shift_and_label_shuffle(source: SimpleNamespace, tmp_path: Path) -> None:
    full = simulate_batch(source.images, source.labels, tmp_path / "p1", shift="prior", strength=1.0, n=50, seed=3)
    assert len(full["per_class"]) == 1 and sum(full["per_class"].values()) == 50
    none = simulate_batch(source.images, source.labels, tmp_path / "p0", shift="prior", strength=0.0, n=60, seed=3)
    assert len(none["per_class"]) == 2 and min(none["per_class"].values()) > 15
    clean = simulate_batch(source.images, source.labels, tmp_path / "c", n=60, seed=5)
    shuffled = simulate_batch(source.images, source.labels, tmp_path / "s", n=60, seed=5, shuffle_labels=True)
    assert clean["per_class"] == shuffled["per_class"]  # same images, labels permuted
    originals = {_digest(im): lab for im, lab in zip(source.images, source.labels)}
    wrong = sum(originals[_digest(rgb)] != lab for lab, rgb in _read(tmp_path / "s"))
    assert wrong >= 15


def test_seeded_and_refuses_to_overwrite(source: SimpleNamespace, tmp_path: Path) -> None:
    simulate_batch(source.images, source.labels, tmp_path / "a", shift="noise", n=10, seed=7)
    simulate_batch(source.images, source.labels, tmp_path / "b", shift="noise", n=10, seed=7)
    assert [_digest(x) for _, x in _read(tmp_path / "a")] == [_digest(x) for _, x in _read(tmp_path / "b")]
    with pytest.raises(FileExistsError):
        simulate_batch(source.images, source.labels, tmp_path / "a", n=10)
    with pytest.raises(ValueError, match="unknown shift"):
        simulate_batch(source.images, source.labels, tmp_path / "x", shift="sepia", n=10)


def test_real_ingest_reads_a_simulated_batch(source: SimpleNamespace, tmp_path: Path) -> None:
    from medflow.data.ingest import ingest

    info = make_batch(MALARIA, source.out / "manifest.csv", source.out / "splits.csv", tmp_path / "batch",
                      source.data, source.cfg, shift="resolution", strength=0.5, n=30, seed=2)
    assert json.loads((tmp_path / "batch" / SIMULATED_MARKER).read_text()) == info  # the pipeline's own images
    summary = ingest(tmp_path / "batch", tmp_path / "ing", source.data, source.cfg, progress=False)
    assert summary["accepted"] == info["n"] == 30 and summary["quarantined"] == 0
    assert summary["per_class"] == info["per_class"]
