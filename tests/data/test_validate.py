"""Validation (Great Expectations) of the ingest outputs: pass/fail, messages, JSON + offline HTML."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medflow.config import DataConfig, ValidateConfig
from medflow.data.manifest import MANIFEST_COLUMNS, QUARANTINE_COLUMNS
from medflow.data.validate import ValidationFailed, validate


def good_manifest(n_per_class: int = 25, labels=("Parasitized", "Uninfected")) -> pd.DataFrame:
    rows = []
    for k, label in enumerate(labels):
        for i in range(n_per_class):
            r = len(rows)
            rows.append({c: "" for c in MANIFEST_COLUMNS} | {
                "id": f"{label}/img{i}.png", "path": f"{label}/img{i}.png", "label": label,
                "group": f"slide{r // 4}", "sha256": f"{r:064x}", "pixel_hash": f"{r:032x}", "format": "png",
                "width": 100 + i, "height": 90, "channels": 3, "bytes": 1000, "bit_depth": 8, "row": r})
    return pd.DataFrame(rows)


def write_inputs(tmp_path: Path, manifest: pd.DataFrame, quarantined: int = 1) -> tuple[Path, Path, Path]:
    m, q, s = tmp_path / "manifest.csv", tmp_path / "quarantine.csv", tmp_path / "ingest_summary.json"
    manifest.to_csv(m, index=False)
    pd.DataFrame([{"path": f"bad{i}.png", "reason": "corrupt", "detail": "x"} for i in range(quarantined)],
                 columns=QUARANTINE_COLUMNS).to_csv(q, index=False)
    s.write_text(json.dumps({"found": len(manifest) + quarantined, "accepted": len(manifest),
                             "quarantined": quarantined, "by_reason": {"corrupt": quarantined} if quarantined else {}}))
    return m, q, s


def run(tmp_path, manifest, cfg=ValidateConfig(), data=DataConfig(), quarantined=1):
    return validate(*write_inputs(tmp_path, manifest, quarantined), tmp_path / "out", cfg, data)


def test_valid_manifest_passes_and_writes_offline_html(tmp_path, capsys):
    df = good_manifest()
    df.loc[1, "pixel_hash"] = df.loc[0, "pixel_hash"]  # exact duplicate, same label: allowed, reported
    summary = run(tmp_path, df, data=DataConfig(labels=["Parasitized", "Uninfected"]))
    assert summary["success"] is True and summary["failed"] == []
    assert summary["rows"] == 50 and summary["classes"] == {"Parasitized": 25, "Uninfected": 25}
    assert summary["duplicate_hashes"] == 1
    assert summary["quarantine_share"] == pytest.approx(1 / 51, abs=1e-6)
    result = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert result["success"] is True and result["statistics"]["failed"] == 0
    dup = [r for r in result["results"] if r["table"] == "hashes" and r["column"] == "rows"][0]
    assert dup["severity"] == "info" and dup["success"] is False
    assert dup["offending"] == [{"rows": 2, "pixel_hash": df.loc[0, "pixel_hash"]}]
    html = (tmp_path / "out" / "validation.html").read_text()
    assert "PASSED" in html and "expect_column_values_to_be_in_set" in html.replace("<wbr>", "")
    assert html.count("<tr>") == len(result["results"]) + 1
    first_row = html.split("<tbody>")[1].split("</tr>")[0]
    assert "FAIL" in first_row and "exact duplicates" in first_row  # the one unmet (info) expectation comes first
    assert re.search(r"Checked (the images of .*)?manifest\s<code>.*manifest.csv</code>\)? on \d{4}-\d\d-\d\d \d\d:\d\d UTC",
                     html)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)  # nothing fetched online
    assert "http" not in html
    assert "validate: PASSED" in capsys.readouterr().err


BAD = {
    "unknown label": (lambda d: d.assign(label=d["label"].where(d.index != 3, "Malaria")),
                      {"labels": ["Parasitized", "Uninfected"]}, {},
                      "expect_column_values_to_be_in_set", "Malaria"),
    "missing class": (lambda d: d, {"labels": ["Parasitized", "Uninfected", "Babesia"]}, {},
                      "expect_column_distinct_values_to_contain_set", "Babesia"),
    "null label": (lambda d: d.assign(label=d["label"].where(d.index != 5, None)), {}, {},
                   "expect_column_values_to_not_be_null", "img5.png"),
    "too small": (lambda d: d.assign(width=d["width"].where(d.index != 7, 4)), {}, {},
                  "expect_column_values_to_be_between", '"width": 4'),
    "channels": (lambda d: d.assign(channels=d["channels"].where(d.index != 9, 5)), {}, {},
                 "expect_column_values_to_be_in_set", '"channels": 5'),
    "label conflict": (lambda d: d.assign(pixel_hash=d["pixel_hash"].where(d.index != 30, d.loc[2, "pixel_hash"])), {}, {},
                       "expect_column_values_to_be_between", '"labels": 2'),
    "duplicate id": (lambda d: d.assign(id=d["id"].where(d.index != 4, d.loc[0, "id"])), {}, {},
                     "expect_column_values_to_be_unique", "Parasitized/img0.png"),
    "few rows": (lambda d: d, {}, {"min_rows_per_class": 30},
                 "expect_column_values_to_be_between", '"label": "Parasitized"'),
    "imbalance": (lambda d: d[(d["label"] == "Parasitized") | (d.index >= 45)], {}, {"max_class_ratio": 4.0,
                  "min_rows_per_class": 1}, "expect_column_values_to_be_between", '"ratio_to_smallest": 5.0'),
    "missing column": (lambda d: d.drop(columns=["sharpness"]), {}, {},
                       "expect_table_columns_to_match_set", "sharpness"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_failures_name_the_expectation_and_offending_values(tmp_path, case):
    mutate, data_kw, cfg_kw, expectation, offending = BAD[case]
    with pytest.raises(ValidationFailed) as err:
        run(tmp_path, mutate(good_manifest()), ValidateConfig(**cfg_kw), DataConfig(**data_kw))
    failed = [f for f in err.value.failures if f["expectation"] == expectation]
    assert failed, str(err.value)
    assert expectation in str(err.value) and offending in str(err.value)
    assert any(offending in json.dumps(f["offending"]) for f in failed)
    result = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert result["success"] is False and result["statistics"]["failed"] == len(err.value.failures)
    assert "FAILED" in (tmp_path / "out" / "validation.html").read_text()


def test_quarantine_share_above_threshold_fails(tmp_path):
    with pytest.raises(ValidationFailed, match="quarantine_share") as err:
        run(tmp_path, good_manifest(), ValidateConfig(max_quarantine_share=0.05), quarantined=10)
    assert err.value.failures[0]["offending"] == [pytest.approx(10 / 60)]
    ok = run(tmp_path, good_manifest(), ValidateConfig(max_quarantine_share=0.2), quarantined=10)
    assert ok["quarantine_share"] == pytest.approx(10 / 60, abs=1e-6)


def test_validate_and_split_do_not_import_tensorflow():
    code = ("import sys, medflow.data.validate, medflow.data.split, medflow.data.shards; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
