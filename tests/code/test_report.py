"""The HTML report: every section present, figures embedded, nothing external, graceful when inputs are missing."""

from __future__ import annotations

import base64
import html as htmllib
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medflow import promote
from medflow.config import parse_params
from medflow.evaluate import calibration_table, compute_metrics, roc_table
from medflow.io import sha256_file
from medflow.layout import Layout
from medflow.report import build_report, figures
from medflow.report.build import _cell
from medflow.report.figures import image_grid

CLASSES = ["Parasitized", "Uninfected"]
MODELS = ["basic_cnn", "tiny_net"]


class Collector(HTMLParser):
    """Ids, image sources, links and resource references of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.hrefs: list[str] = []
        self.resources: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag in {"script", "link", "iframe", "object", "embed", "source"}:
            self.resources.append((tag, a.get("src") or a.get("href") or ""))


def parse(path: Path) -> tuple[str, Collector]:
    html = path.read_text(encoding="utf-8")
    c = Collector()
    c.feed(html)
    return html, c


def params():
    return parse_params({
        "models": {m: {"architecture": "basic_cnn"} for m in MODELS},
        "active_models": MODELS,
        "evaluate": {"gradcam_per_class": 2, "misclassified_max": 4, "positive_class": "Parasitized"},
    })


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fabricate_project(root: Path) -> Layout:
    """Every stage output the report reads, in the documented formats."""
    lay = Layout(root)
    write(lay.ingest_summary, json.dumps({
        "found": 402, "accepted": 400, "quarantined": 2, "by_reason": {"corrupt": 1, "empty_file": 1},
        "classes": CLASSES, "per_class": {"Parasitized": 200, "Uninfected": 200}, "groups": 37, "ungrouped": 0}))
    write(lay.validation_dir / "validation.json", json.dumps({
        "success": True, "statistics": {"evaluated": 2, "failed": 0, "successful": 2}, "rows": 400,
        "results": [{"table": "manifest", "expectation": "expect_column_values_to_not_be_null", "column": "label",
                     "severity": "critical", "success": True, "kwargs": {"column": "label"}, "offending": []},
                    {"table": "classes", "expectation": "expect_column_min_to_be_between", "column": "rows",
                     "severity": "critical", "success": True, "kwargs": {}, "offending": []}]}))
    write(lay.validation_dir / "validation.html", "<html></html>")
    write(lay.split_counts, "label,train,val,test,total\nParasitized,120,20,60,200\n"
                            "Uninfected,120,20,60,200\ntotal,240,40,120,400\n")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    images = rng.integers(0, 255, (60, 16, 16, 3), dtype=np.uint8)
    rows = []
    for k, name in enumerate(MODELS):
        hist = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.6, 0.4], "accuracy": [0.5, 0.7, 0.8],
                             "val_loss": [0.8, 0.6, 0.5], "val_accuracy": [0.55, 0.7, 0.75], "lr": [1e-3] * 3})
        write(lay.model_dir(name) / "history.csv", hist.to_csv(index=False))
        kept = {"kept": "last", "kept_epoch": 3, "ema": 0.99} if k == 0 else {"kept": "best", "kept_epoch": 3, "ema": None}
        run = {"epochs_run": 3, "epochs_planned": 3 + 2 * k, "stopped_early": k == 1, "best_epoch": 3, "input_size": 16}
        write(lay.model_dir(name) / "train_summary.json", json.dumps({"model": name, **kept, **run}))
        logits = rng.normal(size=(60, 2)) + (2.0 - k) * np.eye(2)[y]
        proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        m = compute_metrics(y, proba, CLASSES, bootstrap=20, bins=10, seed=0, groups=[f"s{i // 3}" for i in range(60)])
        flat = {key: m[key] for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")}
        write(lay.metrics(name), json.dumps(flat))
        ev = lay.eval_dir(name)
        write(ev / "details.json", json.dumps({"model": name, "classes": CLASSES, **m}))
        write(ev / "roc.csv", roc_table(y, proba, CLASSES, positive=0).to_csv(index=False))
        write(ev / "calibration.csv", calibration_table(y, proba, 10).to_csv(index=False))
        wrong = np.flatnonzero(proba.argmax(1) != y)[:4]
        write(ev / "misclassified.csv", pd.DataFrame({"id": [f"cell_{i}.png" for i in wrong],
                                                       "label": y[wrong]}).to_csv(index=False))
        (ev / "misclassified.png").write_bytes(image_grid(list(images[wrong]), ["x"] * len(wrong)))
        (ev / "gradcam.png").write_bytes(image_grid(list(images[:4]), ["g"] * 4, ncols=4))
        rows.append({"model": name, **flat})
    table = pd.DataFrame(rows).sort_values("macro_f1", ascending=False)
    write(lay.comparison, table.to_csv(index=False))
    best = table.iloc[0]
    write(lay.champion, json.dumps({
        "model": best["model"], "model_path": f"models/{best['model']}/model.keras", "classes": CLASSES,
        "image_size": 16, "channels": 3, "ordered": False, "metric": "macro_f1",
        "metrics": {k: float(best[k]) for k in ("accuracy", "macro_f1")}, "data_hash": "a" * 64,
        "params_hash": "b" * 64, "version": f"{best['model']}-12345678", "created": "2025-01-01T00:00:00+00:00",
        "runner_up": {"model": table.iloc[1]["model"], "metric": "macro_f1", "difference": 0.0123,
                      "ci95": [-0.02, 0.05], "share_a_better": 0.71}}))
    write(lay.monitoring / "history.csv", "time,batch,verdict,drift_share,champion_version,report,simulated\n"
                                          "2025-01-02T00:00:00,batch-1,ok,0.0,old-00000000,batch-1/report.html,"
                                          "True\n")
    write(lay.monitoring / "batch-1" / "report.html", "<html></html>")
    return lay


def _fmt3(x: float) -> str:
    return f"{x:.3f}"


def section(path: Path, name: str) -> str:
    """One section of the page, whitespace collapsed."""
    return " ".join(path.read_text().split(f'id="{name}"', 1)[1].split("</section>", 1)[0].split())


OLD = "old_cnn-00000001"  # a version deployed before this run


def deploy(lay: Layout, old: bool = False) -> str:
    """Promote this run's champion, or (``old``) an earlier version scoring macro F1 0.99, with medflow.promote;
    returns the deployed version."""
    model = lay.root / "models" / "deployed.keras"
    write(model, "old" if old else "champion")
    candidate = {**promote.load_candidate(lay.root), "model_path": "models/deployed.keras",
                 "model_sha256": sha256_file(model)}
    if old:
        candidate |= {"model": "old_cnn", "version": OLD, "metrics": {**candidate["metrics"], "macro_f1": 0.99}}
    return promote.promote(lay.root, candidate, reason="macro_f1 improves by +0.0100")


def test_report_has_every_section_embedded_and_offline(tmp_path):
    lay = fabricate_project(tmp_path)
    out = build_report(lay, params())
    assert out == lay.report
    html, page = parse(out)

    expected = {"data", "validation", "splits", "comparison", "monitoring"}
    for m in MODELS:
        expected |= {f"model-{m}", f"misclassified-{m}", f"gradcam-{m}"}
    assert expected <= set(page.ids)
    assert len(page.ids) == len(set(page.ids))  # ids are unique

    # Self-contained: every image is an inline PNG, no external resource, no URL anywhere.
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    for src in page.imgs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.resources == []
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    # Links are in-page anchors or local files next to the report.
    assert all(h.startswith("#") or not h.startswith(("/", "file:")) for h in page.hrefs)
    assert "monitoring/batch-1/report.html" in page.hrefs
    monitoring = html.split('id="monitoring"', 1)[1].split("</section>", 1)[0]
    assert "<th>Model checked</th>" in monitoring and "old-00000000 (not the current champion)" in monitoring
    assert "<th>Simulated batch</th>" in monitoring and "<td>yes</td>" in monitoring
    assert "validation/validation.html" in page.hrefs

    # Per model: learning curves, confusion, ROC, calibration, misclassified grid, Grad-CAM = 6 figures.
    # Plus the class bar chart (data) and split chart.
    assert len(page.imgs) == 6 * len(MODELS) + 2
    champion = json.loads(lay.champion.read_text())["model"]
    assert f"Champion: <strong>{champion}</strong>" in html
    assert "Not available yet" not in html
    # which weights each saved model holds (train_summary.json)
    sections = {m: html.split(f'id="model-{m}"', 1)[1].split("<section", 1)[0] for m in MODELS}
    plain = " ".join(sections[MODELS[0]].split())
    assert "averaged over the recent training steps (moving average, momentum 0.99) after epoch 3 (the last" in plain
    assert "uses the weights after epoch 3 (the lowest validation loss)" in " ".join(sections[MODELS[1]].split())
    # training ran out of epochs while validation still improved: said so; not after an early stop
    assert ("Ran 3 of 3 planned epochs; lowest validation loss at epoch 3. <strong>Validation was still improving at "
            "the last epoch") in plain
    assert "Ran 3 of 5 planned epochs (stopped early)" in " ".join(sections[MODELS[1]].split())
    assert "still improving" not in sections[MODELS[1]]
    text = " ".join(html.split())
    # intervals resample the 20 slides; the ROC names its positive class; mistakes can be looked up by file
    assert "bootstrap resampling of the 20 patient/slide groups" in text
    assert "ROC curve for Parasitized." in text and "how many <em>Parasitized</em> images are found" in text
    assert "<summary>File names of these images</summary>" in text and "cell_" in html.split(f'id="misclassified-{MODELS[0]}"')[1].split("</section>")[0]
    # the champion's lead with its paired interval, which spans 0 here; the comparison shows each interval
    runner = json.loads(lay.champion.read_text())["runner_up"]["model"]
    assert (f"its lead over the runner-up, <strong>{runner}</strong>, is +0.012 (95% interval -0.020 to +0.050, paired "
            "bootstrap on the same test images): <strong>the test set cannot tell these two models apart</strong>") in text
    comparison = html.split('id="comparison"', 1)[1].split("</section>", 1)[0]
    ci = json.loads((lay.eval_dir(champion) / "details.json").read_text())["ci95"]["macro_f1"]
    assert "<th>Macro F1 95% interval</th>" in comparison and f'<td class="ci">{ci[0]:.3f} – {ci[1]:.3f}</td>' in comparison
    assert ">Macro F1</th>" in comparison and "macro_f1" not in comparison.split("<tbody>")[0]
    assert "not a clinical validation" in text
    # the summary gives the champion's interval, names every model whose interval overlaps it, and says when the
    # champion's validation loss was still falling at its last epoch
    summary = " ".join(html.split('id="summary"', 1)[1].split("</section>", 1)[0].split())
    assert (f"it has the highest Macro F1 of the 2 trained models on the test set: "
            f"{_fmt3(json.loads(lay.champion.read_text())['metrics']['macro_f1'])} (95% interval {ci[0]:.3f} – "
            f"{ci[1]:.3f}), measured on 60 test images from 20 patients/slides.") in summary
    # and points the reader to the champion's mistakes and heat maps
    assert f'<a href="#misclassified-{champion}">' in summary and f'<a href="#gradcam-{champion}">' in summary
    other = json.loads((lay.eval_dir(runner) / "details.json").read_text())["ci95"]["macro_f1"]
    overlaps = other[0] <= ci[1] and other[1] >= ci[0]
    assert (f"The 95% interval of {runner} overlaps the champion's" in summary) == overlaps
    train = json.loads((lay.model_dir(champion) / "train_summary.json").read_text())
    improving = not train["stopped_early"] and train["best_epoch"] == train["epochs_run"]
    assert ("its validation loss was still falling at its last epoch (3)" in summary) == improving
    # sensitivity / specificity for evaluate.positive_class, counted from the confusion matrix, with intervals
    mine = json.loads((lay.eval_dir(champion) / "details.json").read_text())
    (tp, fn), (fp, tn) = mine["confusion"]
    se, sp = mine["per_class_ci95"]["Parasitized"]["recall"], mine["per_class_ci95"]["Uninfected"]["recall"]
    assert (f"it finds {tp} of the {tp + fn} <em>Parasitized</em> test images (sensitivity {tp / (tp + fn):.3f}, 95% "
            f"interval {se[0]:.3f} – {se[1]:.3f}; it misses {fn} of them) and correctly calls {tn} of the {fp + tn} "
            f"<em>Uninfected</em> images "
            f"Uninfected (specificity {tn / (fp + tn):.3f}, 95% interval {sp[0]:.3f} – {sp[1]:.3f})") in summary
    per_class = sections[champion].split("Per-class results", 1)[1]
    assert "<th>recall 95% interval</th>" in per_class and f"{se[0]:.3f} – {se[1]:.3f}" in per_class
    details = json.loads((lay.eval_dir(runner) / "details.json").read_text())
    details["ci95"]["macro_f1"] = [ci[0] - 0.1, ci[0] + 0.01] if not overlaps else [ci[1] + 0.01, ci[1] + 0.1]
    (lay.eval_dir(runner) / "details.json").write_text(json.dumps(details))
    summary = " ".join(build_report(lay, params()).read_text().split('id="summary"', 1)[1].split("</section>")[0].split())
    assert (f"The 95% interval of {runner} overlaps the champion's" in summary) == (not overlaps)


def test_report_degrades_gracefully_without_inputs(tmp_path):
    lay = Layout(tmp_path)
    html, page = parse(build_report(lay, params()))
    assert {"data", "validation", "splits", "comparison", "monitoring"} <= set(page.ids)
    for m in MODELS:  # active models get their sections, each saying what to run
        assert {f"model-{m}", f"misclassified-{m}", f"gradcam-{m}"} <= set(page.ids)
        assert f"medflow train {m}" in html and f"medflow evaluate {m}" in html
    for command in ("medflow ingest", "medflow validate", "medflow split", "medflow compare", "medflow monitor"):
        assert command in html
    assert page.imgs == []


@pytest.mark.parametrize("long", [False, True])
def test_split_counts_wide_or_long(tmp_path, long):
    lay = Layout(tmp_path)
    if long:
        text = "label,split,count\nA,train,3\nA,test,1\nB,train,4\nB,test,2\n"
    else:
        text = "label,train,test\nA,3,1\nB,4,2\n"
    write(lay.split_counts, text)
    html, page = parse(build_report(lay, params()))
    section = html.split('id="splits"', 1)[1].split("</section>", 1)[0]
    assert '<td>B</td><tdclass="num">4</td><tdclass="num">2</td>' in section.replace("\n", "").replace(" ", "")
    assert 'src="data:image/png;base64,' in section


@pytest.mark.parametrize("case", ["none", "same", "refused", "undecided"])
def test_summary_names_the_deployed_model_and_what_became_of_this_runs_best(tmp_path, case):
    lay = fabricate_project(tmp_path)
    champ = json.loads(lay.champion.read_text())
    model, version, f1 = champ["model"], champ["version"], _fmt3(champ["metrics"]["macro_f1"])
    if case != "none":
        deploy(lay, old=case != "same")
    if case == "refused":  # the promotion rule keeps the better deployed model and records why
        decision = promote.decide_and_promote(lay.root, promote.retrain_config(params()))["decision"]
        assert not decision["promote"]
    summary = section(build_report(lay, params()), "summary")
    comparison = section(lay.report, "comparison")
    deployed = promote.load_registry(lay.root)["history"][-1]["at"][:10] if case != "none" else None
    best = f"</p> <ul> <li><strong>Ranking:</strong> it has the highest Macro F1 of the 2 trained models on the test set: {f1} ("
    if case == "none":
        assert (f'<div class="champion"> <p>Recommended model (the <strong>champion</strong>): <strong>{model}</strong> '
                f"(version <code>{version}</code>), not deployed yet: <code>medflow promote</code> deploys it.{best}") in summary
        assert "Model in production" not in summary and "In production now" not in comparison
    elif case == "same":
        assert (f'<div class="champion"> <p>Model in production (the <strong>champion</strong>, this run\'s best model): '
                f"<strong>{model}</strong> (version <code>{version}</code>, deployed {deployed}: macro_f1 improves by "
                f"+0.0100).{best}") in summary
        assert "Recommended" not in summary and "production stays" not in summary
        assert f"In production now: <code>{version}</code>, this champion." in comparison
    else:
        assert (f'<p class="champion">Model in production: <strong>old_cnn</strong> (version <code>{OLD}</code>, '
                f"Macro F1 0.990 on its test set, deployed {deployed}: macro_f1 improves by +0.0100). The prediction "
                "service and monitoring use it.</p>") in summary
        fate = (f"was not promoted: {htmllib.escape(decision['reason'])}" if case == "refused" else
                "has not been through the promotion rule yet (<code>medflow promote</code> deploys it only if it "
                "beats production)")
        assert (f'<p class="note">This run\'s best model, <strong>{model}</strong> (version <code>{version}</code>, '
                f"Macro F1 {f1}), {fate}; production stays <code>{OLD}</code> (0.990).</p>") in summary
        assert (f'<div class="best-of-run"> <p>This run\'s best model (the <strong>champion</strong>): <strong>{model}'
                f"</strong> (version <code>{version}</code>).{best}") in summary
        assert "Recommended" not in summary and f"In production now: <code>{OLD}</code>." in comparison


def test_monitoring_flags_rows_checked_with_another_model_than_the_deployed_one(tmp_path):
    lay = fabricate_project(tmp_path)
    champ = json.loads(lay.champion.read_text())["version"]
    deploy(lay, old=True)
    with open(lay.monitoring / "history.csv", "a") as f:
        f.write(f"2025-01-03T00:00:00,batch-2,ok,0.0,{OLD},batch-2/report.html,False\n"
                f"2025-01-04T00:00:00,batch-3,ok,0.0,{champ},batch-3/report.html,False\n")
    monitoring = section(build_report(lay, params()), "monitoring")
    assert f"<td>{OLD}</td>" in monitoring  # the deployed model: no flag
    assert "<td>old-00000000 (not the deployed model)</td>" in monitoring
    assert f"<td>{champ} (not the deployed model)</td>" in monitoring  # this run's best, but not deployed
    assert "rows of another model describe that model, not the deployed model." in monitoring
    assert "current champion" not in monitoring


def test_a_batch_that_could_not_be_checked_is_a_red_row_with_its_reason_and_files(tmp_path):
    """A `failed` history line (written by medflow.monitor.run.record_failure, the monitoring flow's) is a red
    "could not be checked" row: reason and where the files are, no figures, no report link, no model flag."""
    import re

    from medflow.monitor.run import NoUsableImage, record_failure

    lay = fabricate_project(tmp_path)
    deploy(lay, old=True)
    reason = "no usable image (found 3 = accepted 0 + quarantined 3 (no_label: 3))"
    record_failure(lay.monitoring, "week2", NoUsableImage(f"data/batches/incoming/week2: {reason}; ...", reason, 3),
                   "moved to data/batches/failed/week2 (see week2.error.txt there)")
    html, page = parse(build_report(lay, params()))
    monitoring = section(lay.report, "monitoring")
    rows = re.findall(r"<tr( class=\"\w+\")?>(.*?)</tr>", monitoring)
    cells = [(cls, re.findall(r"<td[^>]*>(.*?)</td>", r)) for cls, r in rows[1:]]  # after the header row
    assert [(cls, c[0]) for cls, c in cells] == [("", "batch-1"), (' class="failed"', "week2")]
    failed = cells[1][1]
    assert failed[2:] == ["could not be checked", "", "", "", "", "",
                          f"{reason}; moved to data/batches/failed/week2 (see week2.error.txt there)", ""]
    assert cells[0][1][7] == "old-00000000 (not the deployed model)"  # ok rows are still flagged
    assert "Red rows: batches that could not be checked" in monitoring and "tr.failed td {" in html
    assert [h for h in page.hrefs if h.startswith("monitoring/")] == ["monitoring/batch-1/report.html"]


def test_sections_name_their_numbers_for_a_reader(tmp_path):
    """Readable labels instead of file keys, the n behind each figure, the champion's section first and tagged."""
    lay = fabricate_project(tmp_path)
    html, _ = parse(build_report(lay, params()))
    data, validation, splits = (section(lay.report, s) for s in ("data", "validation", "splits"))
    assert "<th>patients/slides (groups)</th>" in data and "<th>images without a patient/slide id</th>" in data
    # the check list folds away when every check passed; its columns say what was checked and whether it passed
    assert "<details><summary>Checks (2;" in validation and "<th>passed</th>" in validation
    assert "<th>checks run</th>" in validation and "expect_column" in validation.split("<th>passed</th>")[1]
    assert '<th class="num">training</th>' in splits and '<th class="num">validation</th>' in splits
    assert "<th>class</th>" in splits
    champion = json.loads(lay.champion.read_text())["model"]
    other = next(m for m in MODELS if m != champion)
    assert html.index(f'id="model-{champion}"') < html.index(f'id="model-{other}"')  # ranked order
    assert f'<h2>Model: {champion} <span class="tag">champion</span></h2>' in html
    assert f"<h2>Model: {other}</h2>" in html
    model = section(lay.report, f"model-{champion}")
    assert "the validation curves are measured on the 40 validation images" in model
    assert "The dotted line marks the epoch whose weights were saved." in model
    assert '<th class="num">F1</th>' in model and '<th class="num">test images</th>' in model
    assert "Red circle: where the model works now" in model
    details = json.loads((lay.eval_dir(champion) / "details.json").read_text())
    wrong = details["n"] - sum(details["confusion"][i][i] for i in range(2))
    assert f"The model got {wrong} of the 60 test images wrong" in section(lay.report, f"misclassified-{champion}")


def test_monitoring_rows_give_batch_size_and_readable_times(tmp_path):
    lay = fabricate_project(tmp_path)
    write(lay.monitoring / "history.csv", "time,batch,verdict,n_images,drift_share,champion_version,report\n"
                                          "2025-01-02T10:18:08+00:00,batch-1,drift,100,0.4,old-00000000,"
                                          "batch-1/report.html\n")
    monitoring = section(build_report(lay, params()), "monitoring")
    assert '<th class="num">Images</th>' in monitoring and '<td class="num">100</td>' in monitoring
    assert '<td class="ci">2025-01-02 10:18</td>' in monitoring
    assert "<td>not recorded</td>" in monitoring  # a line from before medflow recorded simulated batches
    assert "What each verdict asks of you." in monitoring


def test_large_counts_get_thousands_separators():
    assert _cell(3415593) == "3,415,593" and _cell(np.int64(127458)) == "127,458"
    assert _cell(400) == 400 and _cell(2025) == 2025 and _cell(0.5) == "0.500" and _cell(True) == "yes"


def _figure(monkeypatch, draw):
    """The matplotlib figure a figures.* function draws (instead of its PNG)."""
    seen = []
    monkeypatch.setattr(figures, "to_png", lambda fig: seen.append(fig) or b"")
    draw()
    return seen[0]


def test_figures_label_their_axes_and_counts(monkeypatch):
    ax = _figure(monkeypatch, lambda: figures.confusion([[52, 8], [2, 58]], CLASSES)).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("model's answer", "true class")
    assert [t.get_text() for t in ax.texts] == ["52\n(87%)", "8\n(13%)", "2\n(3%)", "58\n(97%)"]  # share of the row

    points = pd.DataFrame({"class": ["Parasitized"] * 3, "fpr": [0, 0.05, 1], "tpr": [0, 0.9, 1]})
    ax = _figure(monkeypatch, lambda: figures.roc(points, 0.97, operating=(0.05, 0.9))).axes[0]
    assert "model's answers (sens. 0.90, spec. 0.95)" in [t.get_text() for t in ax.get_legend().get_texts()]

    y = np.array([0, 1] * 30)
    proba = np.column_stack([np.linspace(0.05, 0.95, 60), 1 - np.linspace(0.05, 0.95, 60)])
    ax = _figure(monkeypatch, lambda: figures.reliability(calibration_table(y, proba, 10), 2)).axes[0]
    assert ax.get_ylabel() == "share of answers correct" and ax.get_xlabel().startswith("model confidence")
    assert all(t.get_text().startswith("n=") for t in ax.texts) and ax.texts

    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.6, 0.4], "val_loss": [0.8, 0.6, 0.5],
                            "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.55, 0.7, 0.75]})
    fig = _figure(monkeypatch, lambda: figures.learning_curves(history, kept_epoch=2))
    assert [a.get_title() for a in fig.axes] == ["Loss (error; lower is better)", "Accuracy (higher is better)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["training", "validation", "saved weights (epoch 2)"]

    ax = _figure(monkeypatch, lambda: figures.grouped_bars(pd.DataFrame({"class": CLASSES, "images": [200, 180]}),
                                                            "images")).axes[0]
    assert ax.get_legend() is None and sorted(t.get_text() for t in ax.texts) == ["180", "200"]  # counts on the bars
