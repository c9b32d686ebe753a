"""medflow.io: the CSV writer and reader every stage shares."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medflow.io import atomic_write_csv, read_csv


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
