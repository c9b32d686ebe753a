"""medflow.io: the CSV writer and reader every stage shares, and the folder swap."""

from __future__ import annotations

import errno
import os

import numpy as np
import pandas as pd
import pytest

from medflow import io
from medflow.io import atomic_write_csv, read_csv, replace_dir


def test_csv_round_trip_keeps_text_as_text_and_empty_as_missing(tmp_path):
    df = pd.DataFrame({
        "id": ["a.png", "b.png", "c.png"], "label": ["0", "NA", "None"],  # labels that look like numbers/nulls
        "source_split": [None, "train", ""], "width": [10, 20, 30], "mean": [1.5, np.nan, 2.0],
        "grouped": [True, False, True], "modality": [None, None, None], "pixel_spacing": [None, None, None],
    })
    atomic_write_csv(tmp_path / "m.csv", df)
    text = ("id", "label", "source_split", "modality")
    back = read_csv(tmp_path / "m.csv", text=text)
    assert back["label"].tolist() == ["0", "NA", "None"]
    assert back["source_split"].isna().tolist() == [True, False, True]  # empty text is missing, as None was
    assert all(str(back[c].dtype) == "string" for c in text)
    assert back["width"].dtype == np.int64 and back["grouped"].dtype == bool
    assert back["mean"].dtype == np.float64 and np.isnan(back["mean"][1])
    assert back["pixel_spacing"].dtype == np.float64 and back["pixel_spacing"].isna().all()  # empty column
    # the same values pandas' own reader gives with the same text columns
    ref = pd.read_csv(tmp_path / "m.csv", dtype={c: "string" for c in text})
    pd.testing.assert_frame_equal(back.drop(columns="label"), ref.drop(columns="label"))

    only = read_csv(tmp_path / "m.csv", ["width", "id", "absent"], text=text)
    assert only.columns.tolist() == ["id", "width"]  # file order; absent columns skipped


def test_replace_dir_interrupted_at_the_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    dest, new = tmp_path / "processed", tmp_path / ".processed.tmp"
    dest.mkdir()
    (dest / "old.rec").write_text("old")
    new.mkdir()
    (new / "new.rec").write_text("new")
    real = os.replace

    def interrupted(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise KeyboardInterrupt  # Ctrl-C just as the new folder moves in
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, dest)
    assert (dest / "old.rec").read_text() == "old" and not new.exists()
    monkeypatch.setattr(io.os, "replace", real)
    new.mkdir()
    (new / "new.rec").write_text("new")
    replace_dir(new, dest)
    assert [p.name for p in dest.iterdir()] == ["new.rec"] and sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


@pytest.mark.parametrize("rows,columns", [
    ([{"id": "a/1.png", "n": 3, "x": 0.1, "ok": True, "note": None}, {"id": 'b,"2"', "n": 4, "x": 1e-9, "ok": False,
                                                                          "note": "é\nz"}], ["id", "n", "x", "ok", "note"]),
    ([{"n": 1, "s": "x"}, {"n": None, "s": None}], ["n", "s"]),  # integers with a gap: floats, as pandas writes them
    ([{"a": None}], ["a", "missing"]),  # a column no row has: empty
    ([{"a": 1}, {"a": 2.5}], ["a"]),
    ([], ["path", "reason", "detail"]),  # header only
])
def test_records_csv_bytes_equal_the_dataframe_path(rows: list, columns: list) -> None:
    import pandas as pd

    from medflow.io import csv_bytes, records_csv_bytes

    assert records_csv_bytes(rows, columns) == csv_bytes(pd.DataFrame(rows, columns=columns))


@pytest.mark.parametrize("fallocate", [True, False], ids=["posix_fallocate", "no-fallocate"])
def test_preallocate_gives_the_full_size_zero_filled_and_keeps_existing_bytes(tmp_path, monkeypatch, fallocate):
    if not fallocate:  # a platform without it (macOS), or a filesystem that refuses it
        def refuse(fd: int, offset: int, size: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", refuse)
    path = tmp_path / "f.bin"
    path.write_bytes(b"head")
    fd = os.open(path, os.O_WRONLY)
    try:
        io.preallocate(fd, 4096 + 7)
        os.pwrite(fd, b"xy", 100)
        io.preallocate(fd, 0)  # nothing to reserve: the file is left as it is
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 4096 + 7
    assert data[:4] == b"head" and data[100:102] == b"xy"
    assert data[4:100] == bytes(96) and data[102:] == bytes(len(data) - 102)


def test_preallocate_reports_a_full_disk(tmp_path, monkeypatch):
    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    fd = os.open(tmp_path / "f.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left on device: 3.0 MiB could not be reserved") as err:
            io.preallocate(fd, 3 << 20, tmp_path / "f.bin")
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "f.bin")
    finally:
        os.close(fd)
