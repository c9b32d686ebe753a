"""Batch monitoring end to end on the embedded malaria sample at 32 px: real ingest of simulated batches,
a tiny champion trained for a few epochs, Evidently drift + classification reports, verdicts."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medflow.config import DataConfig, IngestConfig, SplitConfig, parse_params
from medflow.monitor import MonitorConfig

ROOT = Path(__file__).resolve().parents[2]
MALARIA = ROOT / "data" / "raw" / "malaria-cells-400"
BACKBONE = ROOT / "models" / "pretrained" / "efficientnet_lite0_imagenet_notop.keras"
SIZE = 32
BATCH = 80
pytestmark = pytest.mark.xdist_group("monitor")  # one worker builds the session champion once


def champion_model(backbone_path: Path, classes: list[str], x: np.ndarray, y: np.ndarray):
    """The model contract in miniature: Input -> Resizing(64) -> frozen EfficientNet-Lite0 (the repo's vendored
    ImageNet weights) -> 'features' -> GAP -> Dense 'embedding' -> Dense softmax 'probs'. Only the head is
    trained, on pooled features computed once (a few seconds)."""
    import keras

    keras.utils.set_random_seed(0)
    backbone = keras.models.load_model(backbone_path, compile=False)
    backbone.trainable = False
    inputs = keras.Input(x.shape[1:], dtype="float32")
    feats = keras.layers.Activation("linear", name="features")(backbone(keras.layers.Resizing(64, 64)(inputs)))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(feats)
    emb_layer = keras.layers.Dense(16, activation="relu", name="embedding")
    probs_layer = keras.layers.Dense(len(classes), activation="softmax", name="probs")
    model = keras.Model(inputs, probs_layer(emb_layer(pooled)))
    head_in = keras.Input(pooled.shape[1:])
    head = keras.Model(head_in, probs_layer(emb_layer(head_in)))
    head.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    head.fit(keras.Model(inputs, pooled).predict(x, verbose=0), y, epochs=60, batch_size=32, verbose=0)
    return model  # shares the trained head layers


def build_project(root: Path, source: Path, data: DataConfig, ingest_cfg: IngestConfig) -> SimpleNamespace:
    """Ingest + split ``source``, train the tiny champion, evaluate it on test, write models/champion.json."""
    from medflow.data.ingest import ingest
    from medflow.data.split import run_split
    from medflow.evaluate import compute_metrics
    from medflow.monitor.features import ReferenceData

    interim = root / "data" / "interim"
    summary = ingest(source, interim, data, ingest_cfg, progress=False)
    run_split(interim / "manifest.csv", interim / "splits.csv", root / "reports" / "split_counts.csv", SplitConfig())
    classes = summary["classes"]
    manifest = pd.read_csv(interim / "manifest.csv", dtype={"id": str, "label": str})
    splits = pd.read_csv(interim / "splits.csv", dtype={"id": str})
    df = manifest.merge(splits, on="id")
    pixels = np.load(interim / "pixels.npy")

    def xy(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = df[df["split"] == split]
        return pixels[part["row"]].astype("float32"), part["label"].map(classes.index).to_numpy()

    model = champion_model(BACKBONE, classes, *xy("train"))
    (root / "models" / "tiny").mkdir(parents=True)
    model.save(root / "models" / "tiny" / "model.keras")
    xt, yt = xy("test")
    metrics = compute_metrics(yt, model.predict(xt, verbose=0), classes, bootstrap=0)
    champion = {"model": "tiny", "model_path": "models/tiny/model.keras", "classes": classes,
                "image_size": ingest_cfg.image_size, "channels": ingest_cfg.channels, "ordered": False,
                "metric": "macro_f1", "metrics": metrics, "data_hash": "x", "params_hash": "y",
                "version": "tiny-test0001", "created": "2025-01-01T00:00:00+00:00"}
    (root / "models" / "champion.json").write_text(json.dumps(champion))
    return SimpleNamespace(root=root, source=source, champion=root / "models" / "champion.json", metrics=metrics,
                           reference=ReferenceData(interim / "manifest.csv", interim / "pixels.npy", interim / "splits.csv"),
                           classes=classes, data=data, ingest=ingest_cfg)


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    for need in (MALARIA, BACKBONE):
        assert need.exists(), f"asset shipped in the repository is missing: {need}"
    # group_pattern None: every cell its own group, so train and test are random halves of one
    # population and a clean batch (random test images) must not alarm.
    data = DataConfig(source=str(MALARIA), group_pattern=None)
    p = build_project(tmp_path_factory.mktemp("monitor"), MALARIA, data, IngestConfig(image_size=SIZE, workers=2))
    from medflow.monitor.simulate import held_out

    p.images, p.labels = held_out(p.source, p.reference.manifest, p.reference.splits, p.data, p.ingest)
    p.params = parse_params({"data": {"source": str(MALARIA), "group_pattern": None}, "ingest": {"image_size": SIZE},
                             "evaluate": {"positive_class": "Parasitized"}})
    return p


def monitor(project: SimpleNamespace, out_root: Path, name: str, **sim) -> dict:
    """Simulate batch ``name`` beside ``out_root`` and monitor it into ``out_root``."""
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import simulate_batch

    batch = out_root.parent / "batches" / name
    simulate_batch(project.images, project.labels, batch, n=BATCH, **sim)
    return monitor_batch(batch, champion_json=project.champion, reference=project.reference,
                         out_root=out_root, params=project.params)


def _assert_one_drift_rule(summary: dict) -> None:
    """Every "drifted" flag, list, count and share of a summary (and its reasons) is p below the feature's group
    Bonferroni threshold, the threshold Evidently tested the column at."""
    drift, features = summary["drift"], summary["drift"]["features"]
    for name, f in features.items():
        g = drift["groups"][f["group"]]
        assert f["threshold"] == pytest.approx(g["threshold"]) == pytest.approx(0.01 / g["tests"]), name
        assert f["drifted"] == (f["p_value"] < f["threshold"]), name
        assert f["below_feature_alpha"] == (f["p_value"] < 0.05), name
    for name, g in drift["groups"].items():
        assert g["drifted_features"] == [c for c, f in features.items() if f["group"] == name and f["drifted"]]
    drifted = [c for c, f in features.items() if f["drifted"]]
    assert drift["drifted_count"] == len(drifted) and drift["share"] == pytest.approx(len(drifted) / len(features))
    assert drift["share_below_feature_alpha"] == pytest.approx(
        sum(f["below_feature_alpha"] for f in features.values()) / len(features))
    for reason in summary["reasons"]:  # "<group> drift: ...; drifted features (p < t): a, b"
        if m := re.search(r"drifted features \(p < [^)]*\): (.*)$", reason):
            listed = [] if m.group(1) == "none" else m.group(1).split(", ")
            assert listed and set(listed) <= set(drifted), reason


@pytest.fixture(scope="session")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("monitor-run") / "monitoring"


@pytest.fixture(scope="session")
def clean(project: SimpleNamespace, out_root: Path) -> dict:
    return monitor(project, out_root, "clean", shift="none", seed=0)


def test_clean_batch_is_ok_and_writes_its_outputs(project: SimpleNamespace, out_root: Path, clean: dict) -> None:
    from medflow.monitor.features import IMAGE_FEATURES
    from medflow.monitor.run import monitoring_index

    assert clean["verdict"] == "ok", clean["reasons"]
    assert clean["reasons"] == [] and clean["n_images"] == BATCH and clean["n_quarantined"] == 0
    batch_dir = out_root / "clean"
    for f in ("report.html", "summary.json", "predictions.csv", "quarantine.csv", "ingest_summary.json"):
        assert (batch_dir / f).is_file(), f
    assert json.loads((batch_dir / "summary.json").read_text()) == clean
    features = clean["drift"]["features"]
    pcs = {f"emb_pc{i}" for i in range(MonitorConfig().embedding_components)}
    assert set(features) == set(IMAGE_FEATURES) | pcs | {"prediction", "confidence"}
    assert all(0.0 <= f["p_value"] <= 1.0 for f in features.values())
    assert features["prediction"]["test"] == "chisquare" and features["sharpness"]["test"] == "ks"
    n_drifted = sum(f["drifted"] for f in features.values())
    assert clean["drift"]["share"] == pytest.approx(n_drifted / len(features))
    assert set(clean["drift"]["groups"]) == {"image", "embedding", "prediction"}
    _assert_one_drift_rule(clean)
    assert clean["simulated"] is False and clean["simulation"] is None
    assert 0.0 <= clean["drift"]["embedding_auc"] <= 1.0
    history = pd.read_csv(out_root / "history.csv")
    clean_rows = history[history["batch"] == "clean"]  # other tests of the module append their batches too
    assert len(clean_rows) == 1 and list(clean_rows["verdict"]) == ["ok"]
    index = monitoring_index(out_root)
    assert [(r["batch"], r["verdict"], r["simulated"]) for r in index] == [("clean", "ok", False)]
    assert (out_root / index[0]["report"]).is_file()
    assert index[0]["accuracy"] == pytest.approx(clean["performance"]["batch"]["accuracy"])


def test_monitoring_a_batch_name_again_keeps_the_earlier_report(project: SimpleNamespace, tmp_path: Path) -> None:
    from medflow.monitor.run import monitor_batch, monitoring_index
    from medflow.monitor.simulate import simulate_batch

    batch, out = tmp_path / "batches" / "week1", tmp_path / "monitoring"
    simulate_batch(project.images, project.labels, batch, n=40, seed=5)
    runs = [monitor_batch(batch, champion_json=project.champion, reference=project.reference, out_root=out,
                          params=project.params) for _ in range(2)]
    assert [r["batch"] for r in runs] == ["week1", "week1-1"]
    for r in runs:
        assert json.loads((out / r["batch"] / "summary.json").read_text()) == r
    assert [row["report"] for row in monitoring_index(out)] == ["week1/report.html", "week1-1/report.html"]


def test_per_class_metrics_equal_scikit_learn(project: SimpleNamespace, out_root: Path, clean: dict) -> None:
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_recall_fscore_support,
    )

    preds = pd.read_csv(out_root / "clean" / "predictions.csv", dtype={"label": str, "prediction": str})
    assert len(preds) == BATCH
    p, r, f, s = precision_recall_fscore_support(preds["label"], preds["prediction"], labels=project.classes,
                                                 zero_division=0)
    batch = clean["performance"]["batch"]
    for i, c in enumerate(project.classes):
        got = batch["per_class"][c]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert batch["accuracy"] == pytest.approx(accuracy_score(preds["label"], preds["prediction"]))
    assert batch["macro_f1"] == pytest.approx(f1_score(preds["label"], preds["prediction"], average="macro"))
    assert clean["performance"]["champion_test"]["per_class"] == project.metrics["per_class"]
    assert clean["performance"]["champion_test"]["accuracy"] == project.metrics["accuracy"]


class _Tags(HTMLParser):
    """External references, the <title> text, the <h1> text and the classes of elements inside the <h1>."""

    def __init__(self) -> None:
        super().__init__()
        self.external: list[str] = []
        self.text = {"title": "", "h1": ""}
        self.h1_classes: list[str] = []
        self.links: list[str] = []
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key in ("src", "href") and value and value.startswith(("http:", "https:", "//")):
                self.external.append(f"<{tag} {key}={value}>")
            if tag == "a" and key == "href" and value:
                self.links.append(value)
            if key == "class" and value and "h1" in self._open:
                self.h1_classes += value.split()
        if tag in self.text:
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.text and tag in self._open:
            self._open.remove(tag)

    def handle_data(self, data: str) -> None:
        for tag in self._open:
            self.text[tag] += data


def _page(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_is_offline_and_has_every_section(out_root: Path, clean: dict) -> None:
    html = (out_root / "clean" / "report.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(html)
    assert parser.external == []
    for section in ("Monitoring summary", "Drift by group", "Per-feature drift tests", "Predicted classes",
                    "Per-class performance, batch / champion test", "Batch vs champion test (",
                    "Drift per column (Evidently)", "embedding ROC AUC", "How to read this page", "In brief",
                    "What to do", "Classification quality of the labelled batch (Evidently"):
        assert section in html, section
    for feature in ("sharpness", "mean_r", "width", "emb_pc0", "confidence", "prediction"):
        assert feature in html
    size = len(html.encode())
    assert size < 15_000_000  # Evidently's bundled JS (~3.7 MB) + aggregated plots, no raw rows


def test_report_has_a_title_and_a_heading_with_batch_and_verdict(out_root: Path, clean: dict) -> None:
    page = _page(out_root / "clean" / "report.html")
    assert page.text["title"] == "medflow monitoring: clean (ok)"
    assert " ".join(page.text["h1"].split()) == "medflow monitoring: clean - verdict OK"
    assert page.h1_classes == ["verdict", "verdict-ok"]  # no SIMULATED badge: simulate_batch without its mark
    assert page.links == ["../../index.html"]  # back to reports/index.html from reports/monitoring/<batch>/
    html = (out_root / "clean" / "report.html").read_text(encoding="utf-8")
    assert "SIMULATED" not in html
    head = html[html.index("<body>"):html.index('<div id="root_')]  # above Evidently's panels
    assert head.index("Back to the main report") < head.index("<h1>") < head.index("How to read this page")
    text = " ".join(re.sub(r"<[^>]+>", "", head).split())
    for phrase in ("p-value is lower the more the batch differs from the reference",
                   ("threshold is 0.01 divided by the number of tests in the group (Bonferroni: image: 0.01 / 8 = "
                    "0.00125; embedding: 0.01 / 8 = 0.00125; prediction: 0.01 / 2 = 0.005)"),
                   "a group is rarely flagged by chance alone",
                   "0.5 when they cannot be told apart, nearer 1 the more they differ (drift at 0.7 or more)",
                   ("Verdict: degraded when a labelled batch (at least 30 images with labels) scores more than 0.1 "
                    "below the champion's test accuracy or macro F1; otherwise drift when any group drifted, when at "
                    "least 50% of the features have a p-value below 0.05")):
        assert phrase in text, phrase


def test_report_names_the_positive_class_of_its_precision_and_recall(project: SimpleNamespace, out_root: Path,
                                                                   clean: dict) -> None:
    from medflow.config import ConfigError
    from medflow.monitor.run import monitor_batch

    perf = clean["performance"]
    assert project.classes == ["Parasitized", "Uninfected"] and perf["positive_class"] == "Parasitized"
    html = (out_root / "clean" / "report.html").read_text(encoding="utf-8")
    assert "Precision / recall / F1 are those of the positive class: Parasitized" in html
    headline = {k: v for v, k in re.findall(r'\{"value": "([0-9.]+)", "label": "(Precision|Recall|F1)"\}', html)}
    parasitized = perf["batch"]["per_class"]["Parasitized"]
    assert headline == {"Precision": str(round(parasitized["precision"], 3)),
                        "Recall": str(round(parasitized["recall"], 3)), "F1": str(round(parasitized["f1"], 3))}
    params = project.params.model_copy(update={"evaluate": project.params.evaluate.model_copy(
        update={"positive_class": "Malaria"})})
    with pytest.raises(ConfigError, match="Malaria"):
        monitor_batch(out_root.parent / "batches" / "clean", champion_json=project.champion,
                      reference=project.reference, out_root=out_root, params=params, name="bad-positive")


def test_report_tables_name_their_flags_and_show_the_thresholds(out_root: Path, clean: dict) -> None:
    html = (out_root / "clean" / "report.html").read_text(encoding="utf-8")
    for text in ('"p < 0.05 (uncorrected)"', '"group threshold"', '"counts toward verdict"', '"p-value"',
                 '"smallest p-value"', '"drifted features (p-value below threshold)"',
                 "threshold = family_alpha 0.01 / tests"):
        assert text in html, text
    drift, n = clean["drift"], clean["drift"]["n_features"]  # In brief: the counts and the rules' thresholds
    for text in (f"{drift['drifted_count']} of {n} features drifted (p-value below their group's threshold)",
                 (f"{drift['below_feature_alpha_count']} of {n} ({drift['share_below_feature_alpha']:.0%}) have "
                  "p &lt; 0.05 uncorrected (a broad weak shift from 50%)"),
                 f"embedding ROC AUC {drift['embedding_auc']:.3f} (0.5 = no difference, drift from 0.7)"):
        assert text in html, text
    perf = clean["performance"]  # the batch-vs-champion table: figures, the degradation line, verdict metrics
    acc, champ = perf["batch"]["accuracy"], perf["champion_test"]["accuracy"]
    assert f'["accuracy","{acc:.3f}","{champ:.3f}","{champ - 0.1:.3f}","yes"]' in html.replace(" ", "")
    assert f'["balanced_accuracy","{perf["batch"]["balanced_accuracy"]:.3f}"' in html.replace(" ", "")
    groups = clean["drift"]["groups"]  # Evidently's own per-column flag is the verdict's
    assert html.count("Data drift detected.") == sum(len(g["drifted_features"]) for g in groups.values())
    n_flags = html.count("Data drift not detected.") + html.count("Data drift detected.")
    assert n_flags == len(clean["drift"]["features"])


def _widgets(html: str) -> list[dict]:
    """The Evidently widgets a page draws (the JSON it embeds), groups first, then their widgets and tabs."""
    out: list[dict] = []

    def walk(widgets: list[dict]) -> None:
        for w in widgets:
            out.append(w)
            walk(w.get("widgets") or [])
            walk([t["widget"] for t in w.get("tabs") or []])

    walk(json.loads(re.search(r"var metric_\w+ = (\{.*\});\n", html).group(1))["widgets"])
    return out


def _drift_panel_columns(html: str) -> list[str]:
    """The columns of Evidently's per-column drift panels, in page order."""
    return [re.fullmatch(r"Drift in column '(.+)'", w["params"]["counters"][0]["value"]).group(1)
            for w in _widgets(html)
            if w["type"] == "counter" and str(w["params"]["counters"][0]["value"]).startswith("Drift in column")]


def test_page_head_answers_the_readers_questions(project: SimpleNamespace, out_root: Path, clean: dict) -> None:
    """Above Evidently's panels: the verdict in a sentence, what was checked, "In brief" (did the images change,
    is the model still performing, each with its figures and n) and "What to do", before "How to read this page";
    the page's own CSS keeps the page readable on a narrow screen."""
    from medflow.monitor.features import IMAGE_FEATURES
    from medflow.monitor.page import next_steps

    html = (out_root / "clean" / "report.html").read_text(encoding="utf-8")
    head = html[html.index("<body>"):html.index('<div id="root_')]
    order = ["<h1>", 'class="verdict-line"', 'class="meta"', "<h2>In brief</h2>", "<h3>What to do</h3>",
             "How to read this page"]
    assert [head.index(x) for x in order] == sorted(head.index(x) for x in order)
    blocks = re.sub(r"</?(?:p|h\d|table|tr|th|td|div|ol|li)\b[^>]*>", " ", head)  # cells apart, words whole
    text = " ".join(re.sub(r"<[^>]+>", "", blocks).split())
    perf, confusion = clean["performance"], clean["performance"]["batch"]["confusion"]
    champ, tol = perf["champion_test"], MonitorConfig().degradation_tolerance
    right = sum(row[i] for i, row in enumerate(confusion))
    for phrase in (("OK: These images look like the images the model was trained on, and the model did not score "
                    f"clearly worse on the batch's {BATCH} labelled images."),
                   f"{BATCH} images from {out_root.parent / 'batches' / 'clean'} (0 of {BATCH} files quarantined",
                   "with model tiny-test0001",
                   "Did the images change (scanner, stain, blur)? No sign of a change",
                   "Is the model still performing? Yes: no clear drop from its test-set figures.",
                   f"{right} of {BATCH} labelled images right",
                   (f"accuracy {perf['batch']['accuracy']:.3f} (on its {champ['n']} test images: "
                    f"{champ['accuracy']:.3f}; degraded below {champ['accuracy'] - tol:.3f})"),
                   f"macro F1 {perf['batch']['macro_f1']:.3f} (on its {champ['n']} test images",
                   "images of each class the model found (recall): " + ", ".join(
                       f"{c} {row[i]} of {sum(row)}" for i, (c, row) in enumerate(zip(project.classes, confusion))),
                   f"one image more or less right moves accuracy by {1 / BATCH:.3f}",
                   "What to do Nothing to do."):
        assert phrase in text, phrase
    assert next_steps(clean) == ["Nothing to do."]
    assert html.index("<style>") < html.index("</head>") and ".MuiCard-root{overflow-x:auto!important}" in html
    assert "@media (max-width:" in html
    # the per-feature table says what each feature measures (with its unit) and which way it moved
    medians = clean["drift"]["medians"]
    pcs = {f"emb_pc{i}" for i in range(MonitorConfig().embedding_components)}
    assert set(medians) == set(IMAGE_FEATURES) | pcs | {"confidence"}
    preds = pd.read_csv(out_root / "clean" / "predictions.csv")
    assert medians["confidence"]["batch"] == pytest.approx(preds["confidence"].median())
    table = next(w["params"] for w in _widgets(html) if w["title"].startswith("Per-feature drift tests"))
    assert table["header"][1] == "what it measures" and table["header"][-1] == "median: batch / reference"
    rows = {r[0]: r for r in table["data"]}
    assert rows["sharpness"][1] == "sharpness: variance of the Laplacian (lower = blurrier)"
    assert rows["mean_r"][1] == "red level: mean of the red channel (0-255)" and rows["prediction"][-1] == "-"
    m = medians["mean"]
    assert rows["mean"][-1] == f"{m['batch']:.0f} / {m['reference']:.0f}" if m["batch"] >= 100 else True


def test_in_brief_and_next_steps_follow_the_verdict_and_what_it_rests_on(clean: dict) -> None:
    """The plain-word answers and the next steps for each verdict and what it rests on (image, embedding or
    prediction drift, quarantined files, no / too few labels, degradation, a simulated batch, unknown folders),
    from summary.json alone: the verdict is never recomputed."""
    import copy

    from medflow.monitor.page import _verdict_line, in_brief, next_steps

    def variant(**changes) -> dict:
        s = copy.deepcopy(clean)
        for path, value in changes.items():
            *keys, last = path.split("__")
            target = s
            for k in keys:
                target = target[k]
            target[last] = value
        return s

    image = variant(verdict="drift", drift__groups__image__drifted=True,
                    drift__groups__image__drifted_features=["sharpness", "mean_r"],
                    drift__medians__sharpness={"batch": 1500.0, "reference": 2250.0},
                    drift__medians__mean_r={"batch": 140.0, "reference": 130.0})
    text = in_brief(image)
    assert ("<strong>Yes</strong>: the image statistics moved: sharpness lower (median 1500 vs 2250 in the reference); "
            "red level higher (median 140 vs 130 in the reference). Possible causes: colour: a different stain") in text
    assert "sharpness: focus, blur" in text and "brightness or contrast" not in text
    steps = next_steps(image)
    assert steps[0].startswith("Find out what changed: ask the lab or site whether the scanner")
    assert "it can stay in use" in steps[1] and "also starts retraining" in steps[2] and len(steps) == 3

    unlabelled = variant(verdict="drift", performance=None, drift__groups__embedding__drifted=True,
                         drift__groups__embedding__auc=0.8)
    text = in_brief(unlabelled)
    assert ("<strong>Yes</strong>: the model sees these images differently (a classifier tells batch from reference "
            "images by their embeddings with ROC AUC 0.800)") in text
    assert "<strong>Not checked</strong>: it has no labelled images." in text
    assert any(s.startswith("Until the model has been checked on labelled images of this kind, treat its answers on "
                            "them with caution: put at least 30 images") for s in next_steps(unlabelled))

    few = variant(performance__batch__n=20)
    assert "<strong>Not judged</strong>: only 20 labelled images (at least 30 needed)" in in_brief(few)
    assert "with 20 labelled images there are too few to check the model's performance" in _verdict_line(few)
    assert next_steps(few)[-1].startswith("To check the model's performance as well, put at least 30 images")
    assert next_steps(variant(performance=None)) == [
        "Nothing to do.",
        ("To check the model's performance as well, put at least 30 images of this kind, labelled, into class "
         "folders (<code>&lt;batch&gt;/&lt;class&gt;/</code>) and run <code>medflow monitor</code> on them.")]

    degraded = variant(verdict="degraded")
    assert "<strong>No</strong>: it scored clearly below its test-set figures on this batch." in in_brief(degraded)
    steps = next_steps(degraded)
    assert steps[0].startswith("Stop relying on the model's answers") and "labelling error" in steps[1]
    assert "<code>medflow rollback</code>" in steps[2] and "also starts retraining" in steps[3]

    quarantined = variant(verdict="drift", quarantine_share=0.2, n_quarantined=20, n_found=100)
    assert "20 of 100 files could not be used (quarantined, more than 10%)" in in_brief(quarantined)
    assert any("<code>quarantine.csv</code>" in s for s in next_steps(quarantined))

    prior = variant(verdict="drift", drift__groups__prediction__drifted=True,
                    drift__groups__prediction__drifted_features=["prediction"])
    assert "<strong>Yes</strong>: the model's answers are spread differently (predicted class)" in in_brief(prior)
    assert next_steps(prior)[0].startswith("Check whether the mix of patients changed")

    assert next_steps(variant(simulated=True)) == [
        "This batch is <strong>simulated</strong> (a test of the monitor): nothing to do in the clinic."]
    assert next_steps(variant(verdict="degraded", simulated=True))[0].endswith(
        "The steps below say what a real batch with this verdict would call for.")
    assert next_steps(variant(unknown_labels={"Babesia": 3}))[-1].startswith("Rename the folders named in the warning")


def test_evidently_panels_read_like_the_main_report(project: SimpleNamespace, out_root: Path, clean: dict) -> None:
    """The confusion matrix as the main report draws it (rows = true class from the top, columns = the model's
    answer, each cell's share of its row); no per-label heat map (the per-class table has its figures); each drift
    panel names what its column measures, gives the p-value in full with its threshold and opens on the batch vs
    reference distribution in percent."""
    from medflow.monitor.page import feature_meaning

    html = (out_root / "clean" / "report.html").read_text(encoding="utf-8")
    widgets = _widgets(html)
    heatmaps = [w["params"] for w in widgets
                if w["type"] == "big_graph" and w["params"]["data"][0].get("type") == "heatmap"]
    assert len(heatmaps) == 1
    cm, layout = heatmaps[0]["data"][0], heatmaps[0]["layout"]
    assert layout["yaxis"]["autorange"] == "reversed"  # plotly draws the first row at the bottom otherwise
    assert layout["yaxis"]["title"]["text"] == "true class" and layout["xaxis"]["title"]["text"] == "model's answer"
    confusion, classes = clean["performance"]["batch"]["confusion"], project.classes
    for i, true in enumerate(cm["y"]):
        for j, answer in enumerate(cm["x"]):
            n, row = confusion[classes.index(true)][classes.index(answer)], confusion[classes.index(true)]
            assert cm["z"][i][j] == n and cm["text"][i][j] == f"{n}<br>({n / sum(row):.0%})"
    assert "rows = true class (the batch's label), columns = the model's answer" in html
    for gone in ("Classification Quality by Label", "Predicted Value", "Actual Value", "Drift score",
                 "Current: Model Quality Metrics", "Index binned"):
        assert gone not in html, gone

    features = clean["drift"]["features"]
    assert sorted(_drift_panel_columns(html)) == sorted(features)
    for w in widgets:
        counter = (w.get("params") or {}).get("counters", [{}])[0] if w["type"] == "counter" else {}
        if m := re.fullmatch(r"Drift in column '(.+)'", str(counter.get("value"))):
            f = features[m.group(1)]
            assert counter["label"].startswith(feature_meaning(m.group(1))[1] + ". Data drift")
            assert counter["label"].endswith(f"p-value {f['p_value']:.3g} (drift below {f['threshold']:.3g})")
    tabs = [w for w in widgets if w["type"] == "tabs"]
    assert len(tabs) == len(features)
    for t in tabs:
        first = t["tabs"][0]
        assert first["title"] == "Distribution: batch vs reference"
        params = first["widget"]["params"]
        menu = params["layout"]["updatemenus"][0]
        assert menu["buttons"][menu["active"]]["label"] == "perc"
        assert [d["visible"] for d in params["data"]] == menu["buttons"][menu["active"]]["args"][0]["visible"]
        assert {d["name"] for d in params["data"]} == {"this batch", "reference (training)"}


def test_medflow_tables_say_yes_no_whole_counts_and_p_value(project: SimpleNamespace, out_root: Path,
                                                            clean: dict) -> None:
    from medflow.monitor.page import _summary_widgets

    html = (out_root / "clean" / "report.html").read_text(encoding="utf-8")
    assert '"True"' not in html and '"False"' not in html
    tables = [w.params for w in _summary_widgets(clean) if w.type == "table"]
    cells = [str(c) for t in tables for row in t["data"] for c in row]
    assert cells and not {"True", "False"} & set(cells) and not [c for c in cells if re.fullmatch(r"\d+\.0", c)]
    assert {"yes", "no"} <= set(cells)
    headers = [h for t in tables for h in t["header"]]
    assert not [h for h in headers if "score" in h.lower()]
    assert "p-value" in headers and "smallest p-value" in headers
    per_class = next(t for t in tables if "support" in " ".join(t["header"]))
    assert per_class["header"] == ["class", "precision", "recall", "F1", "batch support", "champion test support"]
    assert [row[-2:] for row in per_class["data"]] == [
        [str(clean["performance"]["batch"]["per_class"][c]["support"]), str(project.metrics["per_class"][c]["support"])]
        for c in project.classes]


@pytest.mark.parametrize("shape", ["compare", "promoted", "float counts"])
def test_per_class_table_shows_the_champion_test_figures(project: SimpleNamespace, clean: dict, shape: str) -> None:
    """The champion's per-class test figures are in ``metrics.per_class`` as ``medflow compare`` writes them (with
    ``n_test``), beside ``metrics`` in a promoted registry record, or with counts read back as floats."""
    from medflow.monitor.page import _summary_widgets, champion_test

    per_class = project.metrics["per_class"]
    scalars = {k: project.metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    record = {
        "compare": {"metrics": {**scalars, "n_test": 120, "roc_auc": 0.9, "per_class": per_class}},
        "promoted": {"metrics": {**scalars, "n_test": 120}, "per_class": per_class},
        "float counts": {"metrics": {**scalars, "n_test": 120.0, "per_class": {
            c: {**v, "support": float(v["support"])} for c, v in per_class.items()}}},
    }[shape]
    champ = champion_test(record)
    assert champ["n"] == 120 and champ["per_class"].keys() == per_class.keys() and "roc_auc" not in champ
    summary = {**clean, "performance": {**clean["performance"], "champion_test": champ}}
    table = next(w.params for w in _summary_widgets(summary) if w.title.startswith("Per-class performance"))
    for row, c in zip(table["data"], project.classes):
        want = [f"{clean['performance']['batch']['per_class'][c][k]:.3f} / {per_class[c][k]:.3f}"
                for k in ("precision", "recall", "f1")]
        assert row == [c, *want, str(clean["performance"]["batch"]["per_class"][c]["support"]),
                       str(per_class[c]["support"])]
    assert "champion test 120 images" in next(w.title for w in _summary_widgets(summary)
                                              if w.title.startswith("Batch vs champion test"))


def test_simulated_batch_is_said_so_and_an_old_history_gains_the_column(project: SimpleNamespace,
                                                                         tmp_path: Path) -> None:
    from medflow.monitor.run import HISTORY_COLUMNS, monitor_batch, monitoring_index
    from medflow.monitor.simulate import simulate_batch

    out = tmp_path / "monitoring"
    out.mkdir()
    old_columns = HISTORY_COLUMNS[:HISTORY_COLUMNS.index("simulated")]  # a file written before the column
    old_row = ["2025-01-01T00:00:00+00:00", "week0", "drift", "50", "0", "0.1", "image", "0.6", "0.9", "0.9",
               "tiny-test0001", "image drift: a, b", "week0/report.html", "week0/summary.json"]
    (out / "history.csv").write_text(pd.DataFrame([old_row], columns=old_columns).to_csv(index=False))
    batch = tmp_path / "batches" / "sim"
    info = simulate_batch(project.images, project.labels, batch, shift="brightness", strength=0.3, n=40, seed=7,
                          mark=True)
    s = monitor_batch(batch, champion_json=project.champion, reference=project.reference, out_root=out,
                      params=project.params)
    assert s["simulated"] is True and s["simulation"] == info
    assert json.loads((out / "sim" / "summary.json").read_text())["simulated"] is True

    history = pd.read_csv(out / "history.csv", dtype=str, keep_default_na=False)
    assert list(history.columns) == HISTORY_COLUMNS
    assert history.iloc[0].tolist() == [*old_row, "", ""]  # the earlier line kept, the new columns blank
    assert history.iloc[1]["batch"] == "sim" and history.iloc[1]["simulated"] == "True"
    assert [(r["batch"], r["simulated"]) for r in monitoring_index(out)] == [("week0", None), ("sim", True)]

    page = _page(out / "sim" / "report.html")
    assert page.text["title"] == f"medflow monitoring: sim ({s['verdict']})"
    assert page.h1_classes == ["verdict", f"verdict-{s['verdict']}", "simulated-badge"]
    assert "SIMULATED" in page.text["h1"]
    html = (out / "sim" / "report.html").read_text(encoding="utf-8")
    assert "SIMULATED batch: written by <code>medflow simulate-batch</code> from the pipeline's own held-out test " \
           "images (shift brightness, strength 0.3, seed 7)" in html
    assert "This batch is <strong>simulated</strong> (a test of the monitor): nothing to do in the clinic" in html


SHIFT_GROUP = {"stain": "image", "brightness": "image", "contrast": "image", "blur": "image", "jpeg": "image",
               "resolution": "image", "noise": "image", "prior": "prediction"}


@pytest.mark.parametrize("shift", sorted(SHIFT_GROUP))
def test_each_strong_shift_drifts(project: SimpleNamespace, out_root: Path, shift: str) -> None:
    s = monitor(project, out_root, f"shift-{shift}", shift=shift, strength=1.0, seed=1)
    page = _page(out_root / f"shift-{shift}" / "report.html")
    assert page.text["title"] == f"medflow monitoring: shift-{shift} ({s['verdict']})"
    assert page.h1_classes == ["verdict", f"verdict-{s['verdict']}"] and s["verdict"].upper() in page.text["h1"]
    groups = s["drift"]["groups"]
    assert groups[SHIFT_GROUP[shift]]["drifted"], groups
    _assert_one_drift_rule(s)
    html = (out_root / f"shift-{shift}" / "report.html").read_text(encoding="utf-8")
    assert html.count("Data drift detected.") == s["drift"]["drifted_count"]  # Evidently's flags: the same rule
    drifted = [c for c, f in s["drift"]["features"].items() if f["drifted"]]  # their panels first, in table order
    assert _drift_panel_columns(html)[:len(drifted)] == drifted
    assert any(r.startswith(f"{SHIFT_GROUP[shift]} drift") for r in s["reasons"])
    # a shift may also cost accuracy; then the verdict is the stronger "degraded", with the drift reasons too
    assert s["verdict"] in ("drift", "degraded")
    if s["verdict"] == "degraded":
        assert s["reasons"][0].startswith(("accuracy", "macro_f1"))


def test_shuffled_labels_are_degraded(project: SimpleNamespace, out_root: Path) -> None:
    s = monitor(project, out_root, "shuffled", shift="none", seed=3, shuffle_labels=True)
    assert s["verdict"] == "degraded", s["reasons"]
    champion_acc = project.metrics["accuracy"]
    assert s["performance"]["batch"]["accuracy"] < champion_acc - MonitorConfig().degradation_tolerance
    assert any(r.startswith("accuracy") for r in s["reasons"])


def test_bad_files_are_quarantined_and_the_batch_still_reported(project: SimpleNamespace, tmp_path: Path,
                                                                out_root: Path) -> None:
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import simulate_batch

    batch = tmp_path / "with-bad-files"
    simulate_batch(project.images, project.labels, batch, n=60, seed=4)
    folder = batch / project.classes[0]
    good = next(folder.glob("*.png")).read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    s = monitor_batch(batch, champion_json=project.champion, reference=project.reference, out_root=out_root,
                      params=project.params)
    assert s["n_found"] == 63 and s["n_images"] == 60 and s["n_quarantined"] == 3
    quarantine = pd.read_csv(out_root / "with-bad-files" / "quarantine.csv")
    assert sorted(Path(p).name for p in quarantine["path"]) == ["empty.png", "text.png", "truncated.png"]
    assert (out_root / "with-bad-files" / "report.html").is_file()
    assert s["performance"]["batch"]["n"] == 60 and s["verdict"] in ("ok", "drift", "degraded")
    assert not any(r.startswith("quarantined share") for r in s["reasons"])  # 3/63 is within the default 10 %


def test_folder_batch_is_read_as_a_folder_whatever_the_training_format(project: SimpleNamespace,
                                                                       tmp_path: Path) -> None:
    """A class-folder batch (what ``medflow simulate-batch`` writes) of a project whose ``data.format`` is
    ``csv``; the outputs are readable by group and others, as every pipeline output (``medflow.io``)."""
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import simulate_batch

    batch = tmp_path / "batches" / "folder"
    simulate_batch(project.images, project.labels, batch, n=40, seed=5)
    params = project.params.model_copy(update={"data": project.params.data.model_copy(update={"format": "csv"})})
    out_root = tmp_path / "monitoring"
    s = monitor_batch(batch, champion_json=project.champion, reference=project.reference, out_root=out_root,
                      params=params)
    assert s["n_images"] == 40 and s["performance"]["batch"]["n"] == 40
    written = [out_root / "folder" / f for f in ("report.html", "summary.json", "predictions.csv")]
    written += [out_root / "history.csv", *(out_root / "reference").iterdir()]
    assert len(written) == 6 and not list(out_root.rglob(".*.tmp"))
    assert {f.name: oct(f.stat().st_mode & 0o044) for f in written} == {f.name: oct(0o044) for f in written}


def test_reference_is_cached_per_champion_version(project: SimpleNamespace, out_root: Path, clean: dict) -> None:
    from medflow.monitor.run import monitor_batch

    cached = list((out_root / "reference").glob("reference-tiny-test0001-*.parquet"))
    assert len(cached) == 1 and Path(clean["reference"]["cache"]) == cached[0]
    splits = pd.read_csv(project.reference.splits)
    assert clean["reference"]["rows"] == int((splits["split"] == "train").sum())
    before = cached[0].stat().st_mtime_ns
    batch = out_root.parent / "again"
    from medflow.monitor.simulate import simulate_batch

    simulate_batch(project.images, project.labels, batch, n=60, seed=9)
    s = monitor_batch(batch, champion_json=project.champion, reference=project.reference, out_root=out_root,
                      params=project.params, name="again")
    assert s["reference"]["cache"] == str(cached[0]) and cached[0].stat().st_mtime_ns == before


def test_unlabelled_images_are_monitored_without_a_performance_verdict(project: SimpleNamespace, tmp_path: Path,
                                                                       out_root: Path) -> None:
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import simulate_batch

    batch = tmp_path / "unlabelled-src"
    simulate_batch(project.images, project.labels, batch, n=60, seed=6)
    target = tmp_path / "unlabelled" / "unlabelled"
    target.mkdir(parents=True)
    for i, f in enumerate(sorted(batch.rglob("*.png"))):
        shutil.copy(f, target / f"{i:03d}.png")
    s = monitor_batch(tmp_path / "unlabelled", champion_json=project.champion, reference=project.reference,
                      out_root=out_root, params=project.params)
    assert s["performance"] is None and s["n_images"] == 60
    assert s["unknown_labels"] == {} and not any(r.startswith("warning:") for r in s["reasons"])
    page = (out_root / "unlabelled" / "report.html").read_text(encoding="utf-8")
    assert "Per-class performance" not in page and 'class="warning"' not in page
    assert "<strong>Not checked</strong>: it has no labelled images." in page


def test_unknown_class_folders_are_named_in_a_warning_that_leaves_the_verdict(project: SimpleNamespace,
                                                                            tmp_path: Path) -> None:
    """``Babesia/`` (no such class) and ``parasitized/`` (the class is ``Parasitized``) beside real class folders
    and ``unlabelled/``: each is named with its image count (and the class it may mean) in summary.json, the
    reasons, history.csv and the page; the verdict comes from drift and performance alone."""
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import simulate_batch

    batch, out = tmp_path / "mixed", tmp_path / "monitoring"
    simulate_batch(project.images, project.labels, batch, n=60, seed=7)
    assert project.classes == ["Parasitized", "Uninfected"]
    moves = (("Parasitized", "parasitized", 8), ("Uninfected", "Babesia", 7), ("Uninfected", "unlabelled", 5))
    for src, dest, k in moves:
        (batch / dest).mkdir()
        for f in sorted((batch / src).iterdir())[:k]:
            f.rename(batch / dest / f.name)
    s = monitor_batch(batch, champion_json=project.champion, reference=project.reference, out_root=out,
                      params=project.params)
    assert s["unknown_labels"] == {"Babesia": 7, "parasitized": 8}
    assert s["n_images"] == 60 and s["performance"]["batch"]["n"] == 60 - 8 - 7 - 5
    text = ("warning: folder {} is not a class of the model (Parasitized, Uninfected), so its images were checked "
            "for drift but not for performance; {} to its class, or to unlabelled/ for images without a label")
    warnings = [text.format("Babesia/ (7 images)", "rename it"),
                text.format("parasitized/ (8 images)", "did you mean 'Parasitized'? Rename it")]
    assert s["reasons"][-2:] == warnings
    assert s["verdict"] in ("drift", "degraded") if s["reasons"][:-2] else s["verdict"] == "ok", s["reasons"]
    assert json.loads((out / "mixed" / "summary.json").read_text())["unknown_labels"] == s["unknown_labels"]
    assert pd.read_csv(out / "history.csv")["reasons"].iloc[-1].endswith("; ".join(warnings))
    page = (out / "mixed" / "report.html").read_text(encoding="utf-8")
    assert page.count('class="warning"') == 2
    assert "<strong>Warning:</strong> folder parasitized/ (8 images) is not a class of the model" in page
    assert "did you mean &#x27;Parasitized&#x27;?" in page


def test_unknown_labels_leave_out_the_classes_and_unlabelled_in_any_case() -> None:
    from medflow.monitor.run import unknown_label_warnings, unknown_labels

    labels = pd.Series(["Parasitized", "Unlabelled", "unlabeled", "UNLABELLED", "parasitised", "Babesia", "Babesia",
                        "infected", "un-infected"])
    unknown = unknown_labels(labels, ["Parasitized", "Uninfected"])
    assert unknown == {"Babesia": 2, "infected": 1, "parasitised": 1, "un-infected": 1}
    text = ("warning: label {} is not a class of the model (Parasitized, Uninfected), so its images were checked "
            "for drift but not for performance; {} to its class, or to 'unlabelled' for images without a label")
    # a class is suggested only for the same letters (case, spaces, '_', '-'): never "infected" -> "Uninfected"
    assert unknown_label_warnings(unknown, ["Parasitized", "Uninfected"], folders=False) == [
        text.format("'Babesia' (2 images)", "rename it"),
        text.format("'infected' (1 image)", "rename it"),
        text.format("'parasitised' (1 image)", "rename it"),
        text.format("'un-infected' (1 image)", "did you mean 'Uninfected'? Rename it")]


def test_a_batch_that_cannot_be_checked_leaves_nothing_behind(project: SimpleNamespace, tmp_path: Path) -> None:
    """Images lying in the batch folder itself (no label), only unusable files, or no file: the error says why
    and where images go, lists the quarantined files (no quarantine.csv is kept), and the monitoring folder is
    as it was. record_failure (the monitoring flow's) adds a `failed` history line with a one-line reason and
    the counts when known, and no folder, so the fixed batch gets its own name back."""
    from medflow.data.sources import SourceError
    from medflow.monitor.run import (
        FAILED,
        HISTORY_COLUMNS,
        monitor_batch,
        monitoring_index,
        record_failure,
    )
    from medflow.monitor.simulate import simulate_batch

    out = tmp_path / "monitoring"
    out.mkdir()
    (out / "history.csv").write_text("time,batch\n")
    before = sorted(out.rglob("*"))

    def check(batch: Path) -> dict:
        return monitor_batch(batch, champion_json=project.champion, reference=project.reference, out_root=out,
                             params=project.params)

    flat = tmp_path / "flat"
    simulate_batch(project.images, project.labels, tmp_path / "src", n=6, seed=8)
    flat.mkdir()
    for i, f in enumerate(sorted((tmp_path / "src").rglob("*.png"))):
        shutil.copy(f, flat / f"{i}.png")
    with pytest.raises(ValueError) as e:
        check(flat)
    flat_error = e.value
    assert str(e.value) == (
        f"{flat}: no usable image (found 6 = accepted 0 + quarantined 6 (no_label: 6)); images must sit in a "
        f"sub-folder of the batch: {flat}/<class>/ for labelled images (classes: Parasitized, Uninfected), "
        f"{flat}/unlabelled/ for images without a label. No report was written; the quarantined files: "
        + "; ".join(f"{i}.png (no_label: image is not inside a class folder)" for i in range(5)) + "; and 1 more")
    broken = tmp_path / "broken"
    (broken / "Parasitized").mkdir(parents=True)
    (broken / "Parasitized" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^\S+broken: no usable image \(found 1 = accepted 0 \+ quarantined 1 "
                                         r"\(empty_file: 1\)\)\. No report was written; the quarantined files: "
                                         r"Parasitized/empty\.png \(empty_file: [^)]+\)$"):
        check(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found") as e:
        check(tmp_path / "empty")
    assert sorted(out.rglob("*")) == before and (out / "history.csv").read_text() == "time,batch\n"

    record_failure(out, "flat", flat_error, "moved to failed/flat (see flat.error.txt there)")
    record_failure(out, "empty", e.value, "left in place")
    assert sorted(out.rglob("*")) == before  # history.csv only
    history = pd.read_csv(out / "history.csv", dtype=str, keep_default_na=False)
    assert list(history.columns) == HISTORY_COLUMNS  # the old header gained every column
    failed = history[["batch", "verdict", "n_images", "n_quarantined", "reasons", "location"]].values.tolist()
    assert failed == [
        ["flat", FAILED, "0", "6", "no usable image (found 6 = accepted 0 + quarantined 6 (no_label: 6))",
         "moved to failed/flat (see flat.error.txt there)"],
        ["empty", FAILED, "", "", f"SourceError: {e.value}", "left in place"]]
    assert (history[["drift_share", "accuracy", "champion_version", "report", "summary", "simulated"]] == "").all().all()
    (flat / "unlabelled").mkdir()
    for f in flat.glob("*.png"):
        f.rename(flat / "unlabelled" / f.name)
    assert check(flat)["batch"] == "flat"  # not flat-1
    assert [(r["batch"], r["verdict"] == FAILED, r["report"]) for r in monitoring_index(out)] == [
        ("flat", True, None), ("empty", True, None), ("flat", False, "flat/report.html")]


def _features(ps: dict[str, tuple[str, float]], alpha: float = 0.05) -> dict[str, dict]:
    return {n: {"group": g, "test": "ks", "p_value": p, "drifted": p < alpha} for n, (g, p) in ps.items()}


def test_verdict_rules_bonferroni_share_and_degradation() -> None:
    from medflow.monitor.verdict import decide, group_drift

    cfg = MonitorConfig()
    image = {f"f{i}": ("image", 0.5) for i in range(8)}
    # 0.002 < family_alpha 0.01 but not < 0.01 / 8: no alarm; 0.001 is.
    g = group_drift(_features({**image, "f0": ("image", 0.002)}), 0.5, cfg)
    assert not g["image"]["drifted"] and g["image"]["threshold"] == pytest.approx(0.01 / 8)
    g = group_drift(_features({**image, "f0": ("image", 0.001)}), None, cfg)
    assert decide(g, 0.1, None, {}, 0.0, cfg) == {
        "verdict": "drift",
        "reasons": ["image drift: p=0.001 < 0.00125 (Bonferroni over 8); drifted features (p < 0.00125): f0"]}
    # the embedding group also drifts on the domain classifier's AUC alone
    emb = {f"pc{i}": ("embedding", 0.3) for i in range(4)}
    assert group_drift(_features(emb), 0.75, cfg)["embedding"]["drifted"]
    assert not group_drift(_features(emb), 0.6, cfg)["embedding"]["drifted"]
    # many weakly drifted features: the drift-share rule
    calm = group_drift(_features({f"f{i}": ("image", 0.03) for i in range(8)}), None, cfg)
    assert not calm["image"]["drifted"]
    assert calm["image"]["drifted_features"] == []  # p < 0.05 uncorrected is not "drifted"
    assert decide(calm, 1.0, None, {}, 0.0, cfg)["reasons"] == [
        "broad weak shift: share of features with p < 0.05 (uncorrected) 1.00 >= 0.5"]
    assert decide(calm, 0.4, None, {}, 0.0, cfg)["verdict"] == "ok"
    assert decide(calm, 0.0, None, {}, 0.2, cfg)["reasons"] == ["quarantined share 0.20 > 0.1"]
    # degraded beats drift; too few labels give no performance verdict
    champ = {"accuracy": 0.9, "macro_f1": 0.9}
    perf = {"n": 60, "accuracy": 0.75, "macro_f1": 0.85}
    out = decide(g, 0.1, perf, champ, 0.0, cfg)
    assert out["verdict"] == "degraded" and out["reasons"][0].startswith("accuracy 0.750 < champion test 0.900")
    assert len(out["reasons"]) == 2
    assert decide(calm, 0.0, {**perf, "n": 10}, champ, 0.0, cfg)["verdict"] == "ok"
    assert decide(calm, 0.0, {**perf, "accuracy": 0.85}, champ, 0.0, cfg)["verdict"] == "ok"
    # ordered grades: a kappa drop alone degrades when qwk is a degradation metric
    graded = MonitorConfig(degradation_metrics=["accuracy", "qwk"])
    out = decide(calm, 0.0, {"n": 60, "accuracy": 0.85, "qwk": 0.55}, {"accuracy": 0.9, "qwk": 0.8}, 0.0, graded)
    assert out == {"verdict": "degraded", "reasons": ["qwk 0.550 < champion test 0.800 - 0.1"]}


def test_a_feature_counts_toward_the_verdict_below_its_group_threshold_or_through_the_share_rule() -> None:
    from medflow.monitor.verdict import counts_toward_verdict, group_drift

    cfg = MonitorConfig()
    features = _features({"f0": ("image", 0.001), "f1": ("image", 0.03), "f2": ("image", 0.5), "f3": ("image", 0.5)})
    groups = group_drift(features, None, cfg)
    assert groups["image"]["drifted_features"] == ["f0"] and "significant_features" not in groups["image"]
    assert [counts_toward_verdict(f, groups, 0.25, cfg) for f in features.values()] == [True, False, False, False]
    assert [counts_toward_verdict(f, groups, 0.5, cfg) for f in features.values()] == [True, True, False, False]


def test_evidently_column_drift_uses_the_group_bonferroni_threshold() -> None:
    """A feature at p between the group threshold and feature_alpha: below feature_alpha for the broad-weak-shift
    share, but not drifted: neither medflow's flag, its group, nor Evidently's own per-column test calls it drift."""
    from medflow.monitor.drift import drift_snapshot, drift_values, feature_groups
    from medflow.monitor.features import IMAGE_FEATURES
    from medflow.monitor.verdict import group_drift

    rng = np.random.default_rng(0)
    pcs = ["emb_pc0", "emb_pc1"]
    columns = [*IMAGE_FEATURES, *pcs, "confidence"]

    def frame(n: int, shift: float) -> pd.DataFrame:
        df = pd.DataFrame(rng.normal(size=(n, len(columns))), columns=columns).assign(std=lambda d: d["std"] + shift)
        return df.assign(prediction=rng.choice(["a", "b"], n))

    cfg = MonitorConfig()
    snapshot = drift_snapshot(frame(500, 0.0), frame(200, 0.2), pcs, cfg)
    values = drift_values(snapshot, pcs, cfg)
    sizes = {g: len(c) for g, c in feature_groups(pcs).items()}
    assert {m["config"]["column"]: m["config"]["threshold"] for m in snapshot.dict()["metrics"]} == pytest.approx(
        {c: cfg.family_alpha / sizes[g] for g, cols in feature_groups(pcs).items() for c in cols})
    std = values["features"]["std"]
    assert cfg.family_alpha / len(IMAGE_FEATURES) < std["p_value"] < cfg.feature_alpha
    assert std["below_feature_alpha"] and not std["drifted"] and std["threshold"] == cfg.family_alpha / 8
    assert all(f["drifted"] == (f["p_value"] < f["threshold"]) for f in values["features"].values())
    assert values["drift_share"] == pytest.approx(values["drifted_count"] / len(columns + ["prediction"]))
    below = sum(f["p_value"] < cfg.feature_alpha for f in values["features"].values())
    assert values["share_below_feature_alpha"] == pytest.approx(below / len(columns + ["prediction"]))
    groups = group_drift(values["features"], None, cfg)
    assert not groups["image"]["drifted"] and "std" not in groups["image"]["drifted_features"]
    flags = {w.params["counters"][0]["value"]: w.params["counters"][0]["label"]
             for w in snapshot._widgets if w.type == "counter"}
    assert flags["Drift in column 'std'"].startswith("Data drift not detected.")


def test_monitor_config_from_plain_params_dict() -> None:
    from pydantic import ValidationError

    from medflow.monitor import monitor_config

    assert monitor_config(None) == MonitorConfig()
    assert monitor_config({"family_alpha": 0.02, "num_stattest": "mannw"}).num_stattest == "mannw"
    assert monitor_config(parse_params({"monitor": {"drift_share": 0.3}}).monitor).drift_share == 0.3
    with pytest.raises(ValidationError):
        monitor_config({"num_stattest": "wasserstein"})  # not a p-value test
    with pytest.raises(ValidationError):
        monitor_config({"unknown": 1})


@pytest.mark.parametrize("labels,predictions", [("abc", "abc"), ("a", "ab"), ("ab", "ab"), ("a", "a")])
def test_evidently_classification_matches_scikit_learn_even_for_degenerate_batches(labels: str,
                                                                                    predictions: str) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    from medflow.monitor.drift import classification_snapshot

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"label": rng.choice(list(labels), 60), "prediction": rng.choice(list(predictions), 60)})
    values = {m["metric_name"].split("(")[0]: m["value"]
              for m in classification_snapshot(df, list("abcdefgh")).dict()["metrics"]}
    assert values["Accuracy"] == pytest.approx(accuracy_score(df["label"], df["prediction"]))
    present = sorted(set(labels))  # per-label F1 as scikit-learn computes it
    f1 = f1_score(df["label"], df["prediction"], labels=present, average=None, zero_division=0)
    assert {k: v for k, v in values["F1ByLabel"].items() if k in present} == pytest.approx(dict(zip(present, f1)))
    # a headline precision / recall only for three or more classes (a macro average), never one Evidently picks
    assert ("Recall" in values) == (len(set(labels) | set(predictions)) > 2)


@pytest.mark.parametrize("positive", ["Parasitized", "Uninfected"])
def test_binary_headline_precision_recall_and_f1_are_the_positive_class(positive: str) -> None:
    from sklearn.metrics import f1_score, precision_score, recall_score

    from medflow.monitor.drift import classification_snapshot

    classes = ["Parasitized", "Uninfected"]
    df = pd.DataFrame({"label": ["Parasitized"] * 20 + ["Uninfected"] * 20,
                       "prediction": ["Parasitized"] * 15 + ["Uninfected"] * 25})  # 5 infections missed
    snapshot = classification_snapshot(df, classes, positive)
    values = {m["metric_name"].split("(")[0]: m["value"] for m in snapshot.dict()["metrics"]}
    expected = {"Parasitized": (1.0, 0.75, 6 / 7), "Uninfected": (0.8, 1.0, 8 / 9)}[positive]
    assert (values["Precision"], values["Recall"], values["F1Score"]) == pytest.approx(expected)
    for name, score in (("Precision", precision_score), ("Recall", recall_score), ("F1Score", f1_score)):
        assert values[name] == pytest.approx(score(df["label"], df["prediction"], pos_label=positive)), name
    assert values["TPR"] == pytest.approx(values["Recall"])  # the rates are the positive class's too
    counters = {c["label"]: c["value"] for w in snapshot._widgets if w.type == "counter"
                for c in w.params["counters"]}  # what the page shows as the headline
    assert {k: counters[k] for k in ("Precision", "Recall", "F1")} == {
        k: str(round(v, 3)) for k, v in zip(("Precision", "Recall", "F1"), expected)}
    per_class = {m["metric_name"].split("(")[0]: m["value"]
                 for m in classification_snapshot(df, classes).dict()["metrics"]}
    assert "Recall" not in per_class and per_class["RecallByLabel"] == pytest.approx({"Parasitized": 0.75,
                                                                                      "Uninfected": 1.0})
