"""`medflow` command line: one subcommand per stage, plus predict / serve / monitor."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from medflow import stages  # noqa: E402
from medflow.config import ConfigError, Params, load_params  # noqa: E402
from medflow.layout import Layout  # noqa: E402

app = typer.Typer(
    help="medflow: folders of medical images -> validated, split, trained, evaluated, monitored classifiers.\n\n"
    "Stages run in this order: ingest -> validate -> split -> preprocess -> embed -> train -> evaluate "
    "-> compare -> report. `dvc repro` runs them all with caching; each is also a subcommand here.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
ChampionOpt = Annotated[Optional[Path], typer.Option(
    help="Champion record naming the model (default: the deployed one, models/production/champion.json, "
         "else the last run's models/champion.json).")]
ModelArg = Annotated[str, typer.Argument(help="Model name from params.yaml `models` (see `medflow models`).")]


def _version() -> str:
    """The installed package's version, else (a source tree on PYTHONPATH) ``medflow.__version__``, said so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medflow")
    except PackageNotFoundError:
        from medflow import __version__

        return f"{__version__} (not installed: version from the source tree)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"medflow {_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass  # no docstring: the app's help= stays the description of `medflow --help`


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input/config: shown as one clear message, exit code 1."""
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for mod, name in [("medflow.data.validate", "ValidationFailed"), ("medflow.models.weights", "WeightsUnavailable"),
                      ("medflow.data.images", "BadImage"), ("medflow.data.sources", "SourceError"),
                      ("medflow.data.split", "SplitError"), ("medflow.layout", "OutOfDate"),
                      ("medflow.promote", "PromotionError"), ("medflow.promote", "RetrainBusy")]:
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _run(fn: Callable[[], dict | None]) -> None:
    """Run a command; its JSON summary is all that goes to stdout (Keras' epoch lines and other prints go to
    stderr), so ``medflow train m > summary.json`` keeps valid JSON."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            summary = fn()
    except _user_errors() as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    if summary:
        typer.echo(json.dumps(summary, indent=2, default=str))


def _warn_deployment(champion: Path | None) -> None:
    """Warn when the deployed model (used without --champion) no longer matches the pipeline's classes."""
    from medflow.promote import deployment_mismatch

    if champion is None and (warning := deployment_mismatch(Layout().root)):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


def _params(path: Path) -> Params:
    try:
        return load_params(path)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def ingest(
    source: Annotated[Optional[str], typer.Argument(help="Folder, CSV, MedMNIST .npz or DICOM folder (default: data.source).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for manifest.csv, quarantine.csv, pixels.npy.")] = Layout().interim,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Read every image of SOURCE: manifest (one row per image), quarantine (rejected files + reason), pixels.

    Without SOURCE: data.source (read as data.format) plus the data.extra_sources folders (labelled
    batches added by retraining). A SOURCE given here is read alone, its kind detected (format auto)."""
    p = _params(params)
    _run(lambda: stages.ingest(p, source=source, out=out))


@app.command()
def validate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Great Expectations checks on the manifest; exits non-zero naming each failed expectation."""
    p = _params(params)
    _run(lambda: stages.validate(p))


@app.command()
def split(params: ParamsOpt = Path("params.yaml")) -> None:
    """Assign train/val/test: stratified by label, grouped by patient/slide and duplicate image."""
    p = _params(params)
    _run(lambda: stages.split(p))


@app.command()
def preprocess(params: ParamsOpt = Path("params.yaml")) -> None:
    """Write each split's resized images into streamable fixed-length-record shards (data/processed)."""
    p = _params(params)
    _run(lambda: stages.preprocess(p))


@app.command()
def embed(
    model: Annotated[Optional[list[str]], typer.Argument(help="Models (default: active_models).")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Cache frozen-backbone embeddings so their heads train in seconds (others are skipped)."""
    p = _params(params)
    _run(lambda: stages.embed(p, models=model or None))


@app.command()
def train(model: ModelArg, params: ParamsOpt = Path("params.yaml")) -> None:
    """Train one model from the registry (resumes after an interruption)."""
    p = _params(params)
    _run(lambda: stages.train(p, model))


@app.command()
def evaluate(model: ModelArg, params: ParamsOpt = Path("params.yaml")) -> None:
    """Evaluate one trained model on the held-out test split."""
    p = _params(params)
    _run(lambda: stages.evaluate(p, model))


@app.command()
def compare(
    model: Annotated[Optional[list[str]], typer.Argument(help="Models (default: active_models).")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Comparison table of evaluated models; records the champion (models/champion.json)."""
    p = _params(params)
    _run(lambda: stages.compare(p, models=model or None))


@app.command()
def report(params: ParamsOpt = Path("params.yaml")) -> None:
    """Build the self-contained HTML report (reports/index.html)."""
    p = _params(params)
    _run(lambda: stages.report(p))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _test_score(path: Path, metric: str) -> str | None:
    """``metric`` from an evaluate metrics file: "0.917", "unreadable", or None when there is no file."""
    if not path.exists():
        return None
    try:
        score = json.loads(path.read_text()).get(metric)
    except (OSError, ValueError, AttributeError):
        score = None
    return f"{score:.3f}" if isinstance(score, (int, float)) else "unreadable"


def _registry_rows(p: Params, lay: Layout) -> list[dict[str, str]]:
    """One row per registry model: its settings and, when trained here, its saved size and test metric."""
    metric = p.evaluate.champion_metric
    try:
        champion = json.loads(lay.champion.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        champion = None
    rows = []
    for name, m in p.models.items():
        saved = lay.model_dir(name) / "model.keras"
        score = _test_score(lay.metrics(name), metric) or ("not evaluated" if saved.exists() else "-")
        rows.append({
            "": "*" if name in p.active_models else "", "model": name, "architecture": m.architecture,
            "input": f"{m.input_size or p.ingest.image_size}px", "epochs": str(m.epochs),
            "trainable": m.trainable if isinstance(m.trainable, str) else "from " + ", ".join(m.trainable),
            "saved model": _size(saved.stat().st_size) if saved.exists() else "not trained",
            f"test {metric}": score + (" champion" if name == champion else ""),
            "weights": m.weights or "none (from scratch)",
        })
    return rows


@app.command()
def models(params: ParamsOpt = Path("params.yaml")) -> None:
    """The model registry: settings, and each trained model's size and test metric (* = trained by `dvc repro`)."""
    p = _params(params)
    rows = _registry_rows(p, Layout())
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    right = {"input", "epochs"}
    for r in [{k: k for k in rows[0]}, *rows]:
        typer.echo("  ".join(v.rjust(widths[k]) if k in right else v.ljust(widths[k]) for k, v in r.items()).rstrip())
    typer.echo(f"\n* in active_models (trained by `dvc repro`); champion: {Layout().champion}; test "
               f"{p.evaluate.champion_metric} (evaluate.champion_metric) from reports/metrics/<model>.json.")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files, folders, CSV lists (data.csv.image_column) or DICOM files.")],
    out: Annotated[Path, typer.Option(help="CSV to write.")] = Path("predictions.csv"),
    champion: ChampionOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per model call (default serve.batch_size).")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Predict every image under PATHS -> CSV (class, probabilities, model version); bad files are listed with a reason."""
    p = _params(params)
    from medflow.serve.batch import predict_paths

    from medflow.data.sources import SourceError

    def run() -> dict:
        summary = predict_paths(paths, out, champion_json=champion or Layout().deployed_champion, data_cfg=p.data,
                                ingest_cfg=p.ingest, batch_size=batch_size or p.serve.batch_size)
        if not summary["predicted"]:  # a script must not take "every input unusable" for success
            why = ", ".join(f"{k}: {v}" for k, v in summary["by_reason"].items()) or "no image files found"
            raise SourceError(f"nothing predicted from {', '.join(map(str, paths))}: {summary['files']} file(s), "
                              f"none usable ({why}); the rows are in {summary['out_csv']}")
        return summary

    _warn_deployment(champion)
    _run(run)


@app.command()
def serve(
    champion: ChampionOpt = None,
    host: Annotated[Optional[str], typer.Option(help="Default serve.host.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Default serve.port.")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Web page + JSON API (/predict, /health, /model, /openapi.json) for the champion model."""
    p = _params(params)
    import uvicorn

    from medflow.serve.app import create_app

    _warn_deployment(champion)
    _run(lambda: uvicorn.run(create_app(champion or Layout().deployed_champion, p.data, p.ingest,
                                        max_upload_bytes=int(p.serve.max_upload_mb * 1024 * 1024),
                                        workers=p.serve.workers),
                             host=host or p.serve.host, port=port or p.serve.port))


@app.command()
def monitor(
    batch: Annotated[Path, typer.Argument(help="New batch: class folders (or any source `medflow ingest` reads); "
                                               "images in a non-class folder, e.g. unlabelled/, get no performance check.")],
    name: Annotated[Optional[str], typer.Option(help="Name under reports/monitoring (default: folder name).")] = None,
    champion: ChampionOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Drift (image stats, embeddings, predictions) and per-class performance of BATCH vs the champion's training data."""
    p = _params(params)

    def go() -> dict:
        s = stages.monitor(p, batch, name=name, champion=champion)
        return {k: s[k] for k in ("batch", "verdict", "reasons", "n_images", "n_quarantined")} | {
            "report": str(Layout().monitoring / s["batch"] / "report.html")}

    _run(go)


@app.command("simulate-batch")
def simulate_batch(
    out: Annotated[Path, typer.Argument(help="Folder to create (class folders of PNG/JPEG).")],
    shift: Annotated[str, typer.Option(help="none | stain | brightness | contrast | blur | jpeg | resolution | "
                                            "noise | prior")] = "none",
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="0 (none) .. 1 (strong).")] = 0.5,
    n: Annotated[int, typer.Option("--n", min=1, help="Images in the batch.")] = 200,
    seed: int = 0,
    shuffle_labels: Annotated[bool, typer.Option("--shuffle-labels", help="Put images under wrong classes.")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """A monitoring batch from held-out (test split) images with a controlled shift."""
    p = _params(params)
    from medflow.monitor.simulate import SHIFTS, make_batch

    if shift not in SHIFTS:
        typer.secho(f"error: --shift must be one of {', '.join(SHIFTS)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    lay = Layout()
    _run(lambda: make_batch(p.data.source, lay.manifest, lay.splits, out, p.data, p.ingest, shift=shift,
                            strength=strength, n=n, seed=seed, shuffle_labels=shuffle_labels))


@app.command()
def promote(
    params: ParamsOpt = Path("params.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Promote even when the rule refuses (e.g. the first model "
                                                         "for a new dataset: its test set is not comparable).")] = False,
) -> None:
    """Promote this run's champion (models/champion.json) if it beats production (the `retrain` rule)."""
    from medflow.promote import decide_and_promote, retrain_config

    p = _params(params)
    _run(lambda: decide_and_promote(Path("."), retrain_config(p), force=force))


@app.command()
def rollback(
    version: Annotated[Optional[str], typer.Argument(help="Version (default: the one before production).")] = None,
) -> None:
    """Point models/production back at an earlier registered version (atomic)."""
    from medflow.promote import rollback as run

    _run(lambda: {"production": run(Path("."), version)})


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
