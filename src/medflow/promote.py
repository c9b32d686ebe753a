"""Safe promotion of a retrained challenger: decision rule, model registry, atomic swap, rollback.

Files (relative to the project root):

- ``models/champion.json`` — the evaluate/compare stages' best model of the *current* run: the challenger.
- ``models/versions/<version>/`` — one immutable folder per promoted version (model.keras, champion.json and,
  when its evaluation wrote them, test_predictions.csv: its per-image test predictions, for paired comparisons).
- ``models/production`` — a relative symlink to one version folder: the deployed model. It is the only
  thing a promotion or rollback changes, with one ``os.replace`` (atomic on POSIX), so a failed or
  killed run leaves either the old or the new model in place, never a mix.
- ``models/registry.json`` — every promoted version (metrics, per-class metrics, data/params/test-set
  hashes, path of its test predictions, time) and the promote/rollback history.

Pure functions + file operations; no Prefect (the CLI and the flows share them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medflow.config import RetrainConfig
from medflow.io import atomic_write_json, read_csv, sha256_file

REGISTRY = Path("models/registry.json")
VERSIONS = Path("models/versions")
PRODUCTION = Path("models/production")
RETRAIN_LOCK = Path("models/.retrain.lock")
REGISTRY_LOCK = Path("models/.registry.lock")
LAST_DECISION = Path("reports/retraining/last_decision.json")
PREDICTIONS = "test_predictions.csv"  # a version's per-image test predictions (evaluate's predictions.csv)
TOLERANCE = 1e-9  # metric differences below this are floating-point noise
PAIRED_SEED = 0  # the paired bootstrap's draws: the same inputs always get the same decision


def retrain_config(params: Any) -> RetrainConfig:
    """The typed ``retrain`` section of ``params`` (a mapping is validated, e.g. in tests)."""
    raw = params.retrain
    return raw if isinstance(raw, RetrainConfig) else RetrainConfig.model_validate(dict(raw or {}))


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot be done (unknown version, missing files ...)."""


class RetrainBusy(RuntimeError):
    """Another retraining run holds the lock."""


# --------------------------------------------------------------------------- small file helpers
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, fsync=True)
    _fsync_dir(path.parent)


@contextmanager
def _flock(path: Path, *, blocking: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RetrainBusy(f"another training or retraining run holds {path}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_held = threading.local()  # lock files this thread holds (re-entry)


@contextmanager
def retrain_lock(root: str | Path) -> Iterator[None]:
    """Exclusive, non-blocking lock on the project's pipeline, taken by the training and retraining flows:
    a second run (thread or process) gets :class:`RetrainBusy`. Re-entrant in one thread, as the
    retraining flow runs the training flow inside it."""
    path = (Path(root) / RETRAIN_LOCK).resolve()
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    with _flock(path, blocking=False):
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)


# --------------------------------------------------------------------------- candidate + registry
def split_fingerprint(splits_csv: str | Path, split: str = "test") -> str:
    """SHA-256 of the sorted ids of one split: two models are comparable only on the same test set."""
    import pandas as pd

    df = pd.read_csv(splits_csv, dtype={"id": str})
    ids = sorted(df.loc[df["split"] == split, "id"])
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def dvc_data_version(dvc_file: str | Path) -> str | None:
    """The content hash a ``.dvc`` file records for its data (None when it does not exist)."""
    import yaml

    path = Path(dvc_file)
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def load_candidate(root: str | Path, *, extra_dir: str = "data/raw/extra") -> dict[str, Any]:
    """The challenger: ``models/champion.json`` + per-class test metrics, ``predictions`` (path of its
    evaluation's per-image predictions.csv, None when missing or of another model file), test-set hash and
    the data version of the added batches (``{batch: md5 of <extra_dir>/<batch>.dvc}``)."""
    root = Path(root)
    champion = root / "models" / "champion.json"
    if not champion.exists():
        raise PromotionError(f"{champion} not found: run the training flow (or `dvc repro`) first")
    rec = json.loads(champion.read_text())
    eval_dir = Path("reports") / "eval" / rec["model"]
    path = root / eval_dir / "details.json"
    details = json.loads(path.read_text()) if path.exists() else {}
    rec["per_class"] = details.get("per_class", {})
    predictions = eval_dir / "predictions.csv"  # written beside details.json by the same evaluation
    evaluated = details.get("model_sha256")
    ours = evaluated is not None and evaluated == rec.get("model_sha256") and (root / predictions).is_file()
    rec["predictions"] = predictions.as_posix() if ours else None
    splits = root / "data" / "interim" / "splits.csv"
    rec["test_hash"] = split_fingerprint(splits) if splits.exists() else None
    rec["data_version"] = {f.stem: dvc_data_version(f) for f in sorted((root / extra_dir).glob("*.dvc"))}
    return rec


def load_registry(root: str | Path) -> dict[str, Any]:
    """``models/registry.json`` (empty registry when there is none yet)."""
    path = Path(root) / REGISTRY
    return json.loads(path.read_text()) if path.exists() else {"versions": [], "history": []}


def load_predictions(root: str | Path, record: dict[str, Any] | None) -> Any:
    """The per-image test predictions ``record["predictions"]`` names (id, label, p_<class>..., group) as a
    DataFrame, or None when it names none (registry entries from before they were kept) or the file is gone."""
    path = record and record.get("predictions")
    if not path or not (Path(root) / path).is_file():
        return None
    return read_csv(Path(root) / path, text=("id", "label", "group"))


def production_version(root: str | Path) -> str | None:
    """The deployed version (the target of ``models/production``), or None."""
    link = Path(root) / PRODUCTION
    return Path(os.readlink(link)).name if link.is_symlink() else None


def production_record(root: str | Path) -> dict[str, Any] | None:
    """Registry entry of the deployed version, or None."""
    version = production_version(root)
    return next((v for v in load_registry(root)["versions"] if v["version"] == version), None)


def deployment_mismatch(root: str | Path) -> str | None:
    """A warning when the deployed model's classes differ from the last pipeline run's champion, else None."""
    deployed, latest = Path(root) / PRODUCTION / "champion.json", Path(root) / "models" / "champion.json"
    if not (deployed.exists() and latest.exists()):
        return None
    try:
        old, new = json.loads(deployed.read_text()), json.loads(latest.read_text())
    except (OSError, ValueError):
        return None  # an unreadable record gets its own clear error where it is loaded
    if list(old.get("classes", [])) == list(new.get("classes", [])):
        return None
    return (f"the deployed model {old.get('version')} predicts the classes {old.get('classes')}, but the "
            f"pipeline's latest champion {new.get('version')} has {new.get('classes')}: deploy it with "
            "`medflow promote` (`--force` when the test set changed) or pass --champion")


# --------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger: float | None
    champion: float | None
    delta: float | None
    class_drops: dict[str, dict[str, float]] = field(default_factory=dict)
    confidence: float | None = None  # of the paired bootstrap test, when it ran
    lower_bound: float | None = None  # its one-sided lower bound of the improvement

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def no_skill(record: dict[str, Any]) -> tuple[str, float] | None:
    """``(class, metric value)`` of always predicting the test set's most frequent class, from the record's
    per-class support; None for a metric without such a baseline (ece) or without per-class support."""
    supports = {c: int(v.get("support", 0)) for c, v in record.get("per_class", {}).items()}
    n, k = sum(supports.values()), len(supports)
    if not n or k < 2:
        return None
    majority = max(supports, key=supports.__getitem__)
    p = supports[majority] / n  # its precision; its recall is 1, every other class scores 0
    value = {"accuracy": p, "balanced_accuracy": 1 / k, "macro_f1": 2 * p / (1 + p) / k, "roc_auc": 0.5,
             "qwk": 0.0}.get(record["metric"])
    return None if value is None else (majority, value)


def paired_lower_bound(candidate: dict[str, Any], new: Any, old: Any, *, confidence: float, resamples: int,
                       bins: int = 10) -> tuple[float | None, str]:
    """One-sided lower bound at ``confidence`` of the challenger's improvement over production on the champion
    metric, from paired bootstrap resamples of their per-image test predictions ``new`` and ``old``
    (:func:`load_predictions` frames): whole patient/slide groups when the predictions carry them, else
    images; :func:`medflow.evaluate.paired_difference` with ``resamples`` draws and a fixed seed (ece: with
    ``bins`` calibration bins, evaluate's default).

    Returns ``(bound, what was resampled)``, or ``(None, why the test cannot run)``.
    """
    import pandas as pd

    from medflow.evaluate import paired_difference

    if new is None or old is None:
        which = "either model" if new is None and old is None else "the challenger" if new is None else "production"
        return None, f"no per-image predictions for {which}"
    classes = list(candidate["classes"])
    columns = [f"p_{c}" for c in classes]
    if any(c not in f for f in (new, old) for c in ["id", "label", *columns]):
        return None, f"per-image predictions lack some of the columns id, label, {', '.join(columns)}"
    new, old = new.set_index("id").sort_index(), old.set_index("id")  # sorted: the same draws whatever the row order
    if not (new.index.is_unique and old.index.is_unique and set(new.index) == set(old.index)):
        return None, "the per-image predictions are not on the same test images"
    old = old.loc[new.index]
    if not new["label"].astype(str).equals(old["label"].astype(str)):
        return None, "the per-image predictions disagree on the test labels"
    y = pd.Index(classes).get_indexer(new["label"].astype(str))
    if (y < 0).any():
        return None, "the per-image predictions name a label that is not one of the classes"
    groups = new["group"].astype(str).tolist() if "group" in new and new["group"].notna().all() else None
    per_image = groups is None or len(set(groups)) == len(groups)
    probas = [f[columns].to_numpy(dtype=float) for f in (new, old)]
    test = paired_difference(y, *probas, candidate["metric"], ordered=bool(candidate.get("ordered", False)),
                             bins=bins, n=resamples, seed=PAIRED_SEED, groups=None if per_image else groups,
                             confidence=confidence)
    unit = f"{len(y)} test images" if per_image else f"{len(set(groups or []))} patient/slide groups"
    if test["lower_bound"] is None:
        return None, f"{candidate['metric']} is undefined on these predictions"
    return test["lower_bound"], f"{resamples} resamples of {unit}"


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, *, min_improvement: float,
           max_class_drop: float, confidence: float | None = None, resamples: int = 1000,
           predictions: tuple[Any, Any] = (None, None)) -> Decision:
    """Promote only if the challenger has skill (beats always predicting the most frequent test class) and
    beats the champion on the champion metric by >= ``min_improvement`` (strictly better), on the same test
    set, with no class's recall or F1 dropping by more than ``max_class_drop`` (unless the champion itself
    has no skill: a one-class model must not be protected by its one perfect class).

    With ``confidence`` (0 < c < 1) the gain must also be beyond chance: the one-sided lower bound at ``c``
    of the improvement, from a paired bootstrap of both models' per-image test ``predictions`` (challenger,
    production; :func:`paired_lower_bound`), must be > 0. Without predictions for either side (versions
    registered before they were kept) the rule above decides alone, and the reason says the test was skipped.
    """
    from medflow.evaluate import LOWER_IS_BETTER

    metric = candidate["metric"]
    new = candidate["metrics"].get(metric)
    if new is None:
        return Decision(False, f"challenger has no {metric}", metric, None, None, None)
    baseline = no_skill(candidate)
    if baseline is not None and new <= baseline[1] + TOLERANCE:
        return Decision(False, f"no skill: {metric} {new:.4f} is no better than always predicting "
                               f"{baseline[0]!r} ({baseline[1]:.4f})", metric, new, None, None)
    if champion is None:
        return Decision(True, "no model in production yet", metric, new, None, None)
    if candidate.get("version") == champion["version"]:
        return Decision(False, "challenger is the production version", metric, new, new, 0.0)
    old = champion["metrics"].get(metric)  # every scalar metric is recorded, whatever metric chose it
    if old is None:
        return Decision(False, f"production model has no {metric} to compare with", metric, new, old, None)
    if candidate.get("test_hash") != champion.get("test_hash"):
        return Decision(False, "test set differs from the production model's: not comparable", metric, new, old, None)
    if list(candidate.get("classes", [])) != list(champion.get("classes", [])):
        return Decision(False, "classes differ from the production model's", metric, new, old, None)
    delta = (old - new) if metric in LOWER_IS_BETTER else (new - old)
    before, after = champion.get("per_class", {}), candidate.get("per_class", {})
    missing = sorted(set(before) - set(after))
    if missing:
        return Decision(False, f"no per-class metrics for {missing}", metric, new, old, delta)
    drops: dict[str, dict[str, float]] = {}
    if baseline is not None and old <= baseline[1] + TOLERANCE:  # production has no skill: no class to protect
        before = {}
    for cls, was in before.items():
        for k in ("recall", "f1"):
            if was[k] - after[cls][k] > max_class_drop:
                drops.setdefault(cls, {})[k] = round(was[k] - after[cls][k], 6)
    versus = f"{metric} {new:.4f} vs production {old:.4f} ({delta:+.4f})"
    if drops:
        return Decision(False, f"class regression beyond {max_class_drop}: {drops}; overall {versus}", metric, new,
                        old, delta, drops)
    if delta <= 0 or delta < min_improvement - TOLERANCE:  # one more correct image of 200 is exactly 0.005
        return Decision(False, f"{versus}: a promotion needs at least +{min_improvement}", metric, new, old, delta)
    if not confidence:
        return Decision(True, versus, metric, new, old, delta)
    bound, how = paired_lower_bound(candidate, *predictions, confidence=confidence, resamples=resamples)
    if bound is None:
        return Decision(True, f"{versus} ({how}: paired test skipped)", metric, new, old, delta)
    test = f"{versus}, {confidence * 100:g}% paired-bootstrap lower bound {bound:+.4f}"
    if bound <= TOLERANCE:
        return Decision(False, f"{test} ≤ 0 ({how}): not clearly better", metric, new, old, delta,
                        confidence=confidence, lower_bound=bound)
    return Decision(True, f"{test} > 0 ({how})", metric, new, old, delta, confidence=confidence, lower_bound=bound)


# --------------------------------------------------------------------------- promotion / rollback
def _swap_production(root: Path, version: str) -> None:
    """Point ``models/production`` at ``versions/<version>`` with one atomic rename."""
    link = root / PRODUCTION
    if link.exists() and not link.is_symlink():
        raise PromotionError(f"{link} is a real folder, not the registry's symlink; move it away first")
    tmp = link.with_name(f".production.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(VERSIONS.name) / version, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(link.parent)


def _stage_version(root: Path, candidate: dict[str, Any]) -> Path:
    """Copy the challenger's model + record into ``models/versions/<version>`` (temp folder, fsync, rename)."""
    version = candidate["version"]
    final = root / VERSIONS / version
    if final.exists():
        return final
    src = root / candidate["model_path"]
    if not src.exists():
        raise PromotionError(f"challenger model {src} not found")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{version}.{os.getpid()}.tmp"  # mkdir honours the umask (mkdtemp: 0700)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copy2(src, tmp / "model.keras")
        if (copied := sha256_file(tmp / "model.keras")) != candidate.get("model_sha256"):
            raise PromotionError(f"{src} (sha256 {copied[:12]}) is not the evaluated challenger (sha256 "
                                 f"{str(candidate.get('model_sha256'))[:12]}): it changed after `compare`; "
                                 "rerun evaluate and compare (`dvc repro`)")
        predictions = candidate.get("predictions") and root / candidate["predictions"]
        if predictions and predictions.is_file():  # kept: later challengers are compared with it image by image
            shutil.copy2(predictions, tmp / PREDICTIONS)
        record = {**candidate, "model_path": f"{PRODUCTION.as_posix()}/model.keras",
                  "predictions": f"{PRODUCTION.as_posix()}/{PREDICTIONS}" if (tmp / PREDICTIONS).exists() else None}
        (tmp / "champion.json").write_text(json.dumps(record, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def promote(root: str | Path, candidate: dict[str, Any], *, reason: str = "") -> str:
    """Register ``candidate`` and make it the production model; returns its version.

    Order: stage the version folder, write it into the registry, then swap the symlink (the commit
    point), then log the promotion. A crash before the swap leaves production unchanged (at most a
    registered version never deployed); production always points at a registered version.
    """
    root = Path(root)
    version = candidate["version"]
    with _flock(root / REGISTRY_LOCK, blocking=True):
        _stage_version(root, candidate)
        reg = load_registry(root)
        if not any(v["version"] == version for v in reg["versions"]):
            keep = ("version", "model", "metric", "metrics", "per_class", "classes", "image_size", "channels",
                    "ordered", "data_hash", "data_version", "params_hash", "test_hash", "created", "model_sha256")
            kept = VERSIONS / version / PREDICTIONS
            reg["versions"].append({**{k: candidate.get(k) for k in keep}, "registered": _now(),
                                    "path": (VERSIONS / version).as_posix(),
                                    "predictions": kept.as_posix() if (root / kept).is_file() else None})
            write_json_atomic(root / REGISTRY, reg)
        _swap_production(root, version)
        reg["history"].append({"action": "promote", "version": version, "at": _now(), "reason": reason})
        write_json_atomic(root / REGISTRY, reg)
    return version


def rollback(root: str | Path, version: str | None = None) -> str:
    """Deploy ``version`` (default: the version registered just before the deployed one); returns it."""
    root = Path(root)
    with _flock(root / REGISTRY_LOCK, blocking=True):
        reg = load_registry(root)
        names = [v["version"] for v in reg["versions"]]
        current = production_version(root)
        if version is None:
            if current is None:
                raise PromotionError("nothing is deployed yet, so there is nothing to roll back: deploy a model with "
                                     "`medflow promote`")
            if current not in names or names.index(current) == 0:
                raise PromotionError(f"no version before {current!r} to roll back to (registry: {names})")
            version = names[names.index(current) - 1]
        if version not in names or not (root / VERSIONS / version / "model.keras").exists():
            raise PromotionError(f"unknown version {version!r}; registered: {names}")
        _swap_production(root, version)
        reg["history"].append({"action": "rollback", "version": version, "at": _now(), "from": current})
        write_json_atomic(root / REGISTRY, reg)
    return version


def rolled_back_from(root: str | Path, version: str) -> str | None:
    """When ``version`` was rolled back from after its last promotion: that rollback's time, else None."""
    undone = None
    for event in load_registry(Path(root))["history"]:
        if event.get("version") == version and event["action"] == "promote":
            undone = None
        elif event["action"] == "rollback" and event.get("from") == version:
            undone = event["at"]
    return undone


def adopt_current_champion(root: str | Path, *, extra_dir: str = "data/raw/extra") -> str | None:
    """Register and deploy the last run's champion when nothing is deployed yet; returns its version, else None.

    Until a first promotion, serve, predict and monitor use ``models/champion.json``, which the next
    training run overwrites: retraining adopts it first, so the new champion is compared with the model
    actually in use (and can be rolled back to). A model without skill (:func:`decide`'s floor) is not
    adopted: PromotionError.
    """
    root = Path(root)
    if production_version(root) is not None or not (root / "models" / "champion.json").exists():
        return None
    candidate = load_candidate(root, extra_dir=extra_dir)
    if not (floor := decide(candidate, None, min_improvement=0.0, max_class_drop=1.0)).promote:
        raise PromotionError(f"{candidate['version']} is not adopted as the production version: {floor.reason}")
    return promote(root, candidate, reason="adopted: the model in use before the first retraining")


def decide_and_promote(root: str | Path, cfg: RetrainConfig, *, force: bool = False) -> dict[str, Any]:
    """Compare the current run's champion with production; promote when the rule allows, or whatever it says with
    ``force`` (a first model for a new dataset, whose test set the production model's cannot be compared with).

    Returns (and writes to ``reports/retraining/last_decision.json``)
    ``{"decision": {...}, "candidate": version, "production": version after}``.
    """
    candidate = load_candidate(root, extra_dir=cfg.extra_dir)
    deployed, record = production_version(root), production_record(root)
    if deployed is not None and record is None:  # never "nothing in production": that would accept any model
        raise PromotionError(f"{Path(root) / PRODUCTION} points at {deployed!r}, which {Path(root) / REGISTRY} "
                             "does not list; restore the registry or `medflow rollback VERSION` to a listed one")
    decision = decide(candidate, record, min_improvement=cfg.min_improvement, max_class_drop=cfg.max_class_drop,
                      confidence=cfg.confidence, resamples=cfg.resamples,
                      predictions=(load_predictions(root, candidate), load_predictions(root, record)))
    if decision.promote and (undone := rolled_back_from(root, candidate["version"])):
        decision = replace(decision, promote=False, reason=f"{candidate['version']} was rolled back by hand ({undone}): "
                           f"not deployed again by the rule ({decision.reason}); `medflow promote --force` deploys it")
    if force and not decision.promote and candidate["version"] != deployed:
        decision = replace(decision, promote=True, reason=f"forced by hand; the rule said: {decision.reason}")
    if decision.promote:
        promote(root, candidate, reason=decision.reason)
    result = {"decision": decision.to_dict(), "candidate": candidate["version"], "production": production_version(root)}
    write_json_atomic(Path(root) / LAST_DECISION, {**result, "at": _now()})
    return result
