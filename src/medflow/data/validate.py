"""Data validation of the ingest outputs with Great Expectations 1.x (ephemeral context, pandas).

Four small tables are validated, each with its own expectation suite:
  * ``manifest`` (one row per image): required columns, non-null fields, unique id/row, label set,
    at least two classes, width/height within ``[min_side, max_side]``, channels allowed.
  * ``classes`` (one row per label): rows per class ≥ ``min_rows_per_class``; class size divided by
    the smallest class ≤ ``max_class_ratio`` (so largest/smallest is bounded).
  * ``hashes`` (one row per ``pixel_hash``): identical pixels never map to two labels (critical). Exact
    duplicates with the *same* label are legitimate (ingest keeps them, split keeps them in one
    split): their count is reported by an ``info`` expectation that never fails the stage.
  * ``ingest`` (one row): quarantined / found ≤ ``max_quarantine_share``.

Only ``critical`` expectations fail the stage. Results go to ``validation.json`` and a
self-contained ``validation.html`` (inline CSS, no external URL: GX Data Docs load CDN assets).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medflow.config import DataConfig, ValidateConfig
from medflow.data.manifest import MANIFEST_COLUMNS
from medflow.data.split import read_manifest
from medflow.io import atomic_write

REQUIRED = ["id", "path", "label", "group", "sha256", "pixel_hash", "width", "height", "channels",
            "row"]
MAX_OFFENDING = 20  # offending values listed per expectation (the count is always complete)


class ValidationFailed(RuntimeError):
    """Critical expectations failed; the message names each one and its offending values."""

    def __init__(self, failures: list[dict]):
        self.failures = failures
        lines = [(f"data validation failed ({len(failures)} critical expectation(s); thresholds are in params.yaml "
                  "under validate):")]
        for f in failures:
            lines.append(f"  - {f['table']}.{f['expectation']}"
                         f"{'(' + f['column'] + ')' if f['column'] else ''}: {f['description']}; "
                         f"observed {f['observed']}; offending {json.dumps(f['offending'])}")
        super().__init__("\n".join(lines))


def _tables(manifest: pd.DataFrame, quarantine_rows: int, summary: dict) -> dict[str, pd.DataFrame]:
    labels = manifest["label"] if "label" in manifest else pd.Series(dtype="string")
    per_class = labels.dropna().value_counts().sort_index()
    classes = pd.DataFrame({"label": per_class.index.astype(str), "rows": per_class.to_numpy()})
    classes["ratio_to_smallest"] = classes["rows"] / (classes["rows"].min() if len(classes) else 1)
    if {"pixel_hash", "label"} <= set(manifest):
        h = manifest.dropna(subset=["pixel_hash"]).groupby("pixel_hash")
        hashes = pd.DataFrame({"labels": h["label"].nunique(), "rows": h.size()}).reset_index()
    else:
        hashes = pd.DataFrame({"pixel_hash": [], "labels": [], "rows": []})
    found = int(summary.get("found", len(manifest) + quarantine_rows))
    quarantined = int(summary.get("quarantined", quarantine_rows))
    ingest = pd.DataFrame({"found": [found], "accepted": [len(manifest)], "quarantined": [quarantined],
                           "quarantine_share": [quarantined / found if found else 0.0]})
    return {"manifest": manifest, "classes": classes, "hashes": hashes, "ingest": ingest}


def _suites(cfg: ValidateConfig, expected: list[str] | None) -> dict[str, tuple[str | None, list]]:
    """Per table: (column naming offending rows, [expectations])."""
    import great_expectations.expectations as gxe

    manifest = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="the manifest has rows"),
        gxe.ExpectTableColumnsToMatchSet(column_set=MANIFEST_COLUMNS, exact_match=False,
                                         description="all manifest columns are present"),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"{c} is never empty") for c in REQUIRED],
        gxe.ExpectColumnValuesToBeUnique(column="id", description="ids are unique"),
        gxe.ExpectColumnValuesToBeUnique(column="row", description="pixel rows are unique"),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=2,
                                                    description="at least two classes"),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_side, max_value=cfg.max_side,
                                          description=f"width in [{cfg.min_side}, {cfg.max_side}]"),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_side, max_value=cfg.max_side,
                                          description=f"height in [{cfg.min_side}, {cfg.max_side}]"),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=list(cfg.allowed_channels),
                                        description=f"channels in {list(cfg.allowed_channels)}"),
    ]
    if expected:
        manifest += [
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(expected),
                                            description=f"labels are among {list(expected)}"),
            gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(expected),
                                                       description="every expected label is present"),
        ]
    classes = [
        gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=cfg.min_rows_per_class,
                                          description=f"at least {cfg.min_rows_per_class} rows per class"),
        gxe.ExpectColumnValuesToBeBetween(column="ratio_to_smallest", max_value=cfg.max_class_ratio,
                                          description=f"class size / smallest class ≤ {cfg.max_class_ratio}"),
    ]
    hashes = [
        gxe.ExpectColumnValuesToBeBetween(column="labels", max_value=1,
                                          description="an image (pixel hash) never has two labels"),
        gxe.ExpectColumnValuesToBeBetween(column="rows", max_value=1, severity="info",
                                          description="exact duplicates (same label; kept in one split)"),
    ]
    ingest = [
        gxe.ExpectColumnValuesToBeBetween(column="quarantine_share", max_value=cfg.max_quarantine_share,
                                          description=f"quarantined / found ≤ {cfg.max_quarantine_share}"),
    ]
    return {"manifest": ("id", manifest), "classes": ("label", classes), "hashes": ("pixel_hash", hashes),
            "ingest": (None, ingest)}


def _clean(v: Any) -> Any:
    """JSON-safe copy (numpy scalars -> Python, NaN/NA -> None)."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, np.ndarray)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def _errors(info: dict | None) -> list[str]:
    """Exception messages from a GX ``exception_info`` (flat, or keyed by metric)."""
    if not info:
        return []
    if "raised_exception" in info:
        return [str(info.get("exception_message"))] if info["raised_exception"] else []
    return sorted({m for v in info.values() if isinstance(v, dict) for m in _errors(v)})


def _record(table: str, res: Any, indexed: bool) -> dict:
    cfg = res.expectation_config
    r = res.result or {}
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "column")}
    offending: list = []
    if "unexpected_count" in r:
        observed: Any = f"{r['unexpected_count']} of {r.get('element_count', '?')} unexpected"
        offending = (r.get("unexpected_index_list") if indexed else None) or r.get("unexpected_list") or []
        count = r["unexpected_count"]
    elif "partial_missing_list" in r:  # distinct values must contain a set
        observed = f"{r.get('missing_count', 0)} missing"
        offending = r["partial_missing_list"]
        count = r.get("missing_count", len(offending))
    else:
        observed = r.get("observed_value")
        mismatched = (r.get("details") or {}).get("mismatched") or {}
        offending = mismatched.get("missing", []) if isinstance(mismatched, dict) else list(mismatched)
        count = len(offending)
    errors = _errors(res.exception_info)
    if errors:
        observed = "error: " + "; ".join(errors)
    return _clean({
        "table": table, "expectation": cfg.type, "column": cfg.kwargs.get("column") or "",
        "description": cfg.description or "", "severity": cfg.severity.value,
        "success": bool(res.success), "kwargs": kwargs, "observed": observed,
        "offending_count": count, "offending": list(offending)[:MAX_OFFENDING],
    })


def run_expectations(tables: dict[str, pd.DataFrame], cfg: ValidateConfig,
                     expected: list[str] | None) -> list[dict]:
    """Validate each table with its Great Expectations suite; one record per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("medflow")
    records = []
    for table, (index_col, expectations) in _suites(cfg, expected).items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table).get_batch(
            batch_parameters={"dataframe": tables[table]})
        suite = gx.ExpectationSuite(name=table, expectations=expectations)
        fmt: dict[str, Any] = {"result_format": "COMPLETE"}
        indexed = bool(index_col and index_col in tables[table])
        if indexed:  # offending rows are named by this column (id, label, pixel_hash)
            fmt["unexpected_index_column_names"] = [index_col]
        result = batch.validate(suite, result_format=fmt)
        records += [_record(table, r, indexed) for r in result.results]
    return records


def render_html(result: dict) -> str:
    """A self-contained HTML page (inline CSS, no external resources) of the validation result."""
    from datetime import datetime, timezone

    from jinja2 import Environment
    from markupsafe import Markup, escape

    template = Environment(autoescape=True).from_string(_HTML)
    order = sorted(result["results"], key=lambda e: (e["success"], e["severity"] != "critical"))  # failures first
    return template.render(r=result, results=order, dumps=lambda v: json.dumps(v, ensure_ascii=False),
                           wbr=lambda name: Markup("_<wbr>").join(escape(part) for part in str(name).split("_")),
                           when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def validate(manifest_csv: str | Path, quarantine_csv: str | Path, summary_json: str | Path,
             out_dir: str | Path, cfg: ValidateConfig, data: DataConfig) -> dict:
    """Validate the ingest outputs; write ``validation.json`` + ``validation.html`` in ``out_dir``.

    Raises ``ValidationFailed`` (after writing both files) when a critical expectation fails.
    """
    manifest = read_manifest(manifest_csv)
    quarantine_rows = len(pd.read_csv(quarantine_csv)) if Path(quarantine_csv).exists() else 0
    summary = json.loads(Path(summary_json).read_text()) if Path(summary_json).exists() else {}
    expected = cfg.expected_labels or data.labels
    tables = _tables(manifest, quarantine_rows, summary)
    records = run_expectations(tables, cfg, expected)
    failed = [r for r in records if not r["success"] and r["severity"] == "critical"]
    dup = next(r for r in records if r["table"] == "hashes" and r["column"] == "rows")
    ingest = tables["ingest"].iloc[0]
    result = {
        "success": not failed,
        "statistics": {"evaluated": len(records), "failed": len(failed),
                       "successful": sum(r["success"] for r in records)},
        "source": summary.get("source"), "manifest": str(manifest_csv),
        "rows": len(manifest),
        "classes": {str(k): int(v) for k, v in zip(tables["classes"]["label"], tables["classes"]["rows"])},
        "duplicate_hashes": int(dup["offending_count"]),
        "quarantine_share": round(float(ingest["quarantine_share"]), 6),
        "by_reason": summary.get("by_reason", {}),
        "results": records,
    }
    out_dir = Path(out_dir)
    atomic_write(out_dir / "validation.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write(out_dir / "validation.html", render_html(result))
    unmet = len(records) - result["statistics"]["successful"]
    print(f"validate: {'PASSED' if not failed else 'FAILED'}: {result['statistics']['successful']} of "
          f"{len(records)} expectations met" + (f", {unmet} not met ({len(failed)} critical)" if unmet else "")
          + f"; {len(manifest)} rows, {len(result['classes'])} classes, "
          f"{result['duplicate_hashes']} duplicate hashes, quarantine share "
          f"{result['quarantine_share']:.3f}", file=sys.stderr)
    if failed:
        raise ValidationFailed(failed)
    return {k: result[k] for k in ("success", "rows", "classes", "duplicate_hashes", "quarantine_share")} | {
        "evaluated": len(records), "failed": [f"{r['table']}.{r['expectation']}" for r in failed]}


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>medflow data validation</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.9em}
td{overflow-wrap:break-word}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}
.ok{color:#176317;font-weight:bold}.fail{color:#b00020;font-weight:bold}.info{color:#8a6d00;font-weight:bold}
code{font-size:.85em;overflow-wrap:break-word}
.tech{color:#555;font-size:.85em}
td:nth-child(2){min-width:12em}
.banner{padding:.6em 1em;border-radius:4px;display:inline-block}
.banner.ok{background:#e4f4e4}.banner.fail{background:#fde4e7}
</style></head><body>
<h1>Data validation</h1>
<p class="banner {{ 'ok' if r.success else 'fail' }}">{{ 'PASSED' if r.success else 'FAILED' }}:
{{ r.statistics.successful }} of {{ r.statistics.evaluated }} expectations met
({{ r.statistics.failed }} critical failure(s))</p>
<p>Checked {% if r.source %}the images of <code>{{ r.source }}</code> ({% endif %}manifest
<code>{{ r.manifest }}</code>{% if r.source %}){% endif %} on {{ when }}, with the thresholds of
<code>params.yaml</code> <code>validate:</code>. A critical failure stops the pipeline; an info line only reports.
{% if not r.success %}Failures are listed first.{% endif %}</p>
<p>{{ r.rows }} rows; classes {{ dumps(r.classes) }}; {{ r.duplicate_hashes }} duplicated pixel hashes;
quarantine share {{ '%.3f' % r.quarantine_share }} {{ dumps(r.by_reason) if r.by_reason else '' }}</p>
<div class="scroll"><table><thead><tr><th>result</th><th>meaning</th><th>observed</th><th>offending values</th>
<th>severity</th><th>table</th><th>column</th><th>Great Expectations expectation</th></tr></thead><tbody>
{% for e in results %}<tr>
<td class="{{ 'ok' if e.success else ('fail' if e.severity == 'critical' else 'info') }}">
{{ 'pass' if e.success else 'FAIL' }}</td>
<td>{{ e.description }}</td>
<td>{{ e.observed if e.observed is string else dumps(e.observed) }}</td>
<td>{% if e.offending %}<code>{{ dumps(e.offending) }}</code>{% if e.offending_count > e.offending|length %}
… ({{ e.offending_count }} in all){% endif %}{% endif %}</td>
<td>{{ e.severity }}</td><td class="tech">{{ e.table }}</td><td class="tech">{{ wbr(e.column) }}</td>
<td class="tech"><code>{{ wbr(e.expectation) }}</code></td>
</tr>{% endfor %}
</tbody></table></div></body></html>
"""
