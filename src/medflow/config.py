"""params.yaml -> typed, validated configuration (the only place params are parsed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """params.yaml is missing or invalid; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- data / ingest
class CsvSource(_Section):
    image_column: str = "image"
    label_column: str = "level"
    group_column: str | None = None  # when None, group comes from data.group_pattern on the file stem
    image_dir: str | None = None  # relative to the CSV's folder; None = the CSV's folder
    extension: str = ""  # appended when the CSV names files without one, e.g. ".jpeg" ("jpeg" gets its dot)

    @field_validator("extension")
    @classmethod
    def _extension_has_dot(cls, v: str) -> str:
        """``jpeg`` -> ``.jpeg`` (else ``10_leftjpeg`` would be looked for); a path or pattern is refused."""
        v = v.strip()
        if v and (not v.lstrip(".") or any(c in v for c in "/\\*?[] ")):
            raise ValueError(f"data.csv.extension must be a file suffix such as '.jpeg', got {v!r}")
        return "." + v.lstrip(".") if v else v


class DicomSource(_Section):
    window: Literal["lung", "mediastinum", "bone", "soft_tissue", "brain", "custom", "auto"] = "lung"
    level: float | None = None  # only for window: custom
    width: float | None = None  # only for window: custom
    padding_hu: float = -1000.0  # value that pixel padding (e.g. -2000 outside the scan circle) becomes (air)

    @model_validator(mode="after")
    def _custom_needs_level(self) -> "DicomSource":
        if self.window == "custom" and (self.level is None or self.width is None or self.width <= 0):
            raise ValueError("dicom.window 'custom' needs dicom.level and a positive dicom.width")
        return self


class DataConfig(_Section):
    source: str = "data/raw/malaria-cells-400"
    format: Literal["auto", "folder", "csv", "npz", "dicom"] = "auto"
    # Regex applied to the file stem; the named group 'group' (or group 1) is the patient/slide id.
    # No match -> the image is its own group (and a warning counts how many).
    group_pattern: str | None = r"^(?P<group>.+?)_?(?i:thin_?original|thinf)"
    labels: list[str] | None = None  # fixed label order; required for ordered grades
    ordered: bool = False  # labels are ordinal grades (quadratic weighted kappa is reported)
    label_names: dict[str, str] | None = None  # npz: {"0": "basophil", ...}
    # Extra labelled folders (globs, relative to the project root), e.g. batches added by retraining:
    # read like class-folder sources, marked source_split "extra": the split stage puts them in train
    # without moving any other row (a row linked to a val/test patient or image is excluded instead).
    extra_sources: list[str] = []
    csv: CsvSource = CsvSource()
    dicom: DicomSource = DicomSource()

    @field_validator("labels", "label_names", mode="before")
    @classmethod
    def _grades_as_text(cls, v: Any) -> Any:
        """Unquoted grades in YAML (``labels: [0, 1, 2]``, ``label_names: {0: normal}``) are label text."""
        def text(x: Any) -> Any:
            return str(x) if isinstance(x, int) and not isinstance(x, bool) else x

        if isinstance(v, list):
            return [text(x) for x in v]
        if isinstance(v, dict):
            return {text(k): text(x) for k, x in v.items()}
        return v

    @field_validator("group_pattern")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        import re

        if v is not None:
            try:
                re.compile(v)
            except re.error as e:  # pragma: no cover - message path tested via load_params
                raise ValueError(f"data.group_pattern is not a valid regex: {e}") from e
        return v

    @model_validator(mode="after")
    def _ordered_needs_labels(self) -> "DataConfig":
        if self.ordered and not self.labels:
            raise ValueError("data.ordered: true needs data.labels (the grades in order)")
        return self


def _check_sides(cfg: Any, section: str) -> Any:
    if cfg.min_side > cfg.max_side:
        raise ValueError(f"{section}.min_side ({cfg.min_side}) is larger than {section}.max_side ({cfg.max_side})")
    return cfg


class IngestConfig(_Section):
    image_size: int = Field(64, ge=8, le=1024)  # processed square size (pixels)
    channels: Literal[1, 3] = 3  # processed channel count (grey is replicated for 3)
    workers: int = Field(2, ge=1, le=64)
    min_side: int = Field(8, ge=1)
    max_side: int = Field(20000, ge=1)
    max_pixels: int = Field(80_000_000, ge=1)  # decompression-bomb guard (width*height)

    @model_validator(mode="after")
    def _sides_ordered(self) -> "IngestConfig":
        return _check_sides(self, "ingest")


class ValidateConfig(_Section):
    min_rows_per_class: int = Field(20, ge=1)
    max_class_ratio: float = Field(10.0, ge=1.0)  # largest class / smallest class
    max_quarantine_share: float = Field(0.05, ge=0.0, le=1.0)
    min_side: int = Field(8, ge=1)
    max_side: int = Field(20000, ge=1)
    allowed_channels: list[int] = [1, 2, 3, 4]  # as found (grey, grey+alpha, RGB, RGBA; all converted to RGB)
    expected_labels: list[str] | None = None  # None = data.labels or whatever ingest found

    @model_validator(mode="after")
    def _sides_ordered(self) -> "ValidateConfig":
        return _check_sides(self, "validate")


class SplitConfig(_Section):
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.3, gt=0, lt=1)
    seed: int = 42
    respect_source_split: bool = True  # keep official splits (MedMNIST, train/val/test folders)
    folds: int = Field(0, ge=0)  # 0 = off; >= 2: also write grouped stratified K-fold assignments

    @model_validator(mode="after")
    def _ratios_and_folds(self) -> "SplitConfig":
        if self.folds == 1:
            raise ValueError("split.folds is 0 (no cross-validation folds) or at least 2, got 1")
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1.0, got {total:.4f}")
        return self


class PreprocessConfig(_Section):
    shard_size: int = Field(1024, ge=16)  # images per shard file
    workers: int = Field(2, ge=1, le=64)  # threads filling and writing shards


# --------------------------------------------------------------------------- models / training
class Augment(_Section):
    flip: bool = True
    rotation: float = Field(0.0, ge=0, le=1)  # fraction of a full turn
    zoom: float = Field(0.0, ge=0, lt=1)
    shift: float = Field(0.0, ge=0, lt=1)
    brightness: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, lt=1)


class ModelConfig(_Section):
    architecture: Literal[
        "basic_cnn", "vgg16", "vgg19", "resnet50", "inception_v3", "mobilenet_v2", "efficientnet_b0", "keras_file"
    ]
    weights: str | None = None  # None | "imagenet" | path to a .keras / .weights.h5 file
    weights_sha256: str | None = None  # checked when weights is a file
    # "none" = frozen feature extractor; a list of layer-name prefixes = train from the first matching
    # layer to the end (BatchNorm stays frozen), e.g. [block4] for VGG blocks 4-5, [mixed9] for InceptionV3
    trainable: Literal["none", "all"] | Annotated[list[str], Field(min_length=1)] = "all"
    input_size: int | None = Field(None, gt=0)  # None = ingest.image_size; backbone resizes in-graph
    filters: list[Annotated[int, Field(gt=0)]] = Field([32, 64, 128], min_length=1)  # basic_cnn: per conv block
    convs_per_block: int = Field(1, ge=1, le=4)  # basic_cnn: 3x3 conv-BN-ReLU layers per block
    head_units: int = Field(256, ge=0)  # 0 = linear head on pooled features
    dropout: float = Field(0.5, ge=0, lt=1)
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    # weight averaging: an exponential moving average of the trained weights (momentum per step, e.g. 0.99);
    # validation, checkpoints and the saved model then use the average
    ema: float | None = Field(None, gt=0, lt=1)
    keep: Literal["best", "last"] = "best"  # saved weights: of the epoch with the best val_loss, or of the last
    augment: Augment = Augment()
    class_weight: Literal["balanced", "none"] = "balanced"
    use_embedding_cache: bool = True  # frozen backbones: train the head on cached embeddings

    @field_validator("trainable", mode="before")
    @classmethod
    def _trainable_shape(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("none", "all"):
            raise ValueError(f"trainable takes none, all, or a list of layer-name prefixes (got {v!r}; for a prefix "
                             f"write [{v}])")
        return v

    @model_validator(mode="after")
    def _weights_fit_architecture(self) -> "ModelConfig":
        if problem := weights_problem(self.architecture, self.weights):
            raise ValueError(problem)
        return self


def weights_problem(architecture: str, weights: str | None) -> str | None:
    """Why ``weights`` cannot go with ``architecture`` (None: they can); a file's existence is checked at load."""
    kind = "none" if weights is None or weights.lower() in ("none", "null") else weights.lower()
    if architecture == "keras_file":
        if not kind.endswith(".keras"):
            return f"architecture keras_file loads its network from a .keras file: set weights: to its path (got {weights!r})"
    elif architecture == "basic_cnn":
        if kind != "none":
            return f"basic_cnn trains from scratch: set weights: null (got {weights!r})"
    elif kind not in ("none", "imagenet") and not kind.endswith(".h5"):
        return (f"{architecture} takes weights: imagenet, null, or a .weights.h5/.h5 file (got {weights!r}); a whole "
                "saved network (.keras) goes with architecture: keras_file")
    return None


class TrainConfig(_Section):
    seed: int = 42
    patience: int = Field(5, ge=1)  # EarlyStopping on val_loss
    lr_patience: int = Field(2, ge=1)  # ReduceLROnPlateau
    mixed_precision: Literal["auto", "on", "off"] = "auto"  # auto = on when a GPU is visible

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        """Unquoted on/off (and yes/no, true/false) arrive from YAML as booleans."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


ChampionMetric = Literal["accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "qwk", "ece"]  # ece: lower wins


class EvaluateConfig(_Section):
    champion_metric: ChampionMetric = "macro_f1"  # qwk needs data.ordered
    bootstrap: int = Field(1000, ge=0)
    calibration_bins: int = Field(10, ge=2)
    gradcam_per_class: int = Field(3, ge=0)
    misclassified_max: int = Field(24, ge=0)
    # the class a binary ROC curve and the monitoring's binary precision/recall are about (e.g. the disease);
    # null: every class is shown one-vs-rest
    positive_class: str | None = None


class MonitorConfig(_Section):
    """Thresholds and statistical tests of ``medflow monitor`` (params.yaml ``monitor``)."""

    num_stattest: Literal["ks", "mannw", "anderson", "cramer_von_mises", "t_test", "es"] = "ks"  # p-value tests
    cat_stattest: Literal["chisquare", "z", "fisher_exact", "g_test"] = "chisquare"  # predicted class
    feature_alpha: float = Field(0.05, gt=0, lt=1)  # uncorrected p-value of the broad-weak-shift rule
    drift_share: float = Field(0.5, gt=0, le=1)  # broad weak shift: this share of all features with p < feature_alpha
    family_alpha: float = Field(0.01, gt=0, lt=1)  # per group (image, embedding, prediction), Bonferroni
    embedding_components: int = Field(8, ge=1, le=64)  # PCA (fitted on the reference) of the embeddings
    embedding_auc: float = Field(0.7, gt=0.5, le=1)  # Evidently domain-classifier ROC AUC that means drift
    # qwk (quadratic weighted kappa) needs data.ordered
    degradation_metrics: list[Literal["accuracy", "balanced_accuracy", "macro_f1", "qwk"]] = ["accuracy", "macro_f1"]
    degradation_tolerance: float = Field(0.1, ge=0, lt=1)  # degraded: batch metric < champion test - this
    min_labelled: int = Field(30, ge=1)  # fewer labelled images: no performance verdict
    max_quarantine_share: float = Field(0.1, ge=0, le=1)  # more quarantined files: drift (input quality)
    reference_max_rows: int = Field(5000, ge=100)  # reference (train split) rows used, sampled with `seed`
    seed: int = 0
    batch_size: int = Field(256, ge=1)  # prediction batch size


class RetrainConfig(_Section):
    """``retrain:`` section of params.yaml (monitoring triggers, promotion rule, schedules)."""

    min_new_labelled: int = Field(50, ge=1)  # labelled images waiting in processed batches that trigger a retrain
    min_improvement: float = Field(0.005, ge=0)  # challenger must beat production by at least this (champion metric)
    max_class_drop: float = Field(0.02, ge=0, le=1)  # largest tolerated drop of any class's recall or F1
    # paired bootstrap of the test images (groups): promote only when the one-sided lower bound of the
    # improvement at this confidence is > 0; 0 or null: no test
    confidence: float | None = 0.9
    resamples: int = Field(1000, ge=100, le=100_000)  # draws of that test (fixed seed: same inputs, same answer)
    schedule_monitor: str = "0 2 * * *"  # cron: look for new batches daily at 02:00
    schedule_retrain: str = "0 3 * * 0"  # cron: retrain weekly, Sunday 03:00
    timezone: str = "UTC"
    trigger: Literal["auto", "deployment", "subflow", "none"] = "auto"  # how monitoring starts a retrain
    task_retries: int = Field(1, ge=0)  # retries of a failed stage task (transient errors only)
    retry_delay_s: float = Field(30.0, ge=0)
    incoming_dir: str = "data/batches/incoming"  # one folder per new batch
    settle_s: float = Field(60.0, ge=0)  # a batch folder changed more recently than this is still arriving: next run
    processed_dir: str = "data/batches/processed"  # batches already monitored
    failed_dir: str = "data/batches/failed"  # batches the monitor could not check (+ <name>.error.txt)
    extra_dir: str = "data/raw/extra"  # labelled batches added to training (DVC-tracked, train split only)

    @field_validator("schedule_monitor", "schedule_retrain")
    @classmethod
    def _cron_shape(cls, v: str) -> str:
        """Five cron fields (minute hour day month weekday); Prefect checks the values when it deploys."""
        import re

        fields = v.split()
        if len(fields) != 5 or not all(re.fullmatch(r"[0-9A-Za-z*/,\-?]+", f) for f in fields):
            raise ValueError(f"{v!r} is not a 5-field cron expression such as '0 2 * * *' (minute hour day month "
                             "weekday)")
        return v

    @field_validator("confidence")
    @classmethod
    def _confidence_range(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v < 1:
            raise ValueError(f"{v:g} is not in [0, 1): the one-sided confidence of the paired bootstrap test of a "
                             "promotion (e.g. 0.9); 0 or null turns the test off")
        return v or None

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as 'UTC' or 'Europe/Berlin')") from None
        return v


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_mb: float = Field(20.0, gt=0)  # larger uploads -> 413
    workers: int = Field(2, ge=1, le=64)  # uploads decoded + predicted at once (threads)
    batch_size: int = Field(64, ge=1)  # images per model call in `medflow predict`


# smallest input the Keras application backbones accept without their top
MIN_INPUT_SIZE = {"vgg16": 32, "vgg19": 32, "resnet50": 32, "inception_v3": 75, "mobilenet_v2": 32,
                  "efficientnet_b0": 32}


class Params(_Section):
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    models: dict[str, ModelConfig] = {}
    active_models: list[str] = Field([], min_length=1)  # what `dvc repro` / `make run` trains; the rest on demand
    evaluate: EvaluateConfig = EvaluateConfig()
    monitor: MonitorConfig = MonitorConfig()
    retrain: RetrainConfig = RetrainConfig()
    serve: ServeConfig = ServeConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _active_models_exist(self) -> "Params":
        missing = [m for m in self.active_models if m not in self.models]
        if missing:
            raise ValueError(f"active_models names models not defined under 'models': {missing}")
        small = {name: f"{m.architecture} needs input_size >= {MIN_INPUT_SIZE[m.architecture]}, got {size}"
                 for name, m in self.models.items() if m.architecture in MIN_INPUT_SIZE
                 and (size := m.input_size or self.ingest.image_size) < MIN_INPUT_SIZE[m.architecture]}
        if small:
            raise ValueError(f"models too small for their backbone (set input_size, the in-graph resize): {small}")
        positive = self.evaluate.positive_class
        if positive is not None and self.data.labels and positive not in self.data.labels:
            raise ValueError(f"evaluate.positive_class {positive!r} is not one of data.labels {self.data.labels}")
        if self.evaluate.champion_metric == "qwk" and not self.data.ordered:
            raise ValueError("evaluate.champion_metric: qwk (quadratic weighted kappa) is computed for ordered "
                             "grades only; set data.ordered: true or choose another metric")
        if "qwk" in self.monitor.degradation_metrics and not self.data.ordered:
            raise ValueError("monitor.degradation_metrics: qwk (quadratic weighted kappa) is computed for ordered "
                             "grades only; set data.ordered: true or remove it")
        return self

    def model(self, name: str) -> ModelConfig:
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}; defined in params.yaml: {sorted(self.models)}")
        return self.models[name]


def _keys_at(loc: tuple) -> list[str]:
    """The keys params.yaml accepts at ``loc`` (a pydantic error location), for suggestions; [] if unknown."""
    import typing

    node: Any = Params
    for part in (*loc, None):
        if isinstance(node, type) and issubclass(node, BaseModel):
            fields = {f.alias or name: f for name, f in node.model_fields.items()}
            if part is None:
                return list(fields)
            if part not in fields:
                return []
            node = fields[part].annotation
        elif typing.get_origin(node) is dict and part is not None:
            node = typing.get_args(node)[1]
        else:
            return []
    return []


def _format_errors(err: ValidationError, path: Path) -> str:
    """One line per error: the dotted key, what is wrong, the value found; a close key for a misspelt one."""
    import difflib

    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            keys = _keys_at(tuple(e["loc"][:-1]))
            close = difflib.get_close_matches(str(e["loc"][-1]), keys, n=1, cutoff=0.6)
            msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "") + (
                f" (keys here: {', '.join(keys)})" if keys else "")
        elif e["type"] != "value_error" and not isinstance(e.get("input"), (dict, list)) and "input" in e:
            found = repr(e["input"])
            msg += f" (got {found[:60] + '...' if len(found) > 60 else found})"
        lines.append(f"  - {key}: {msg}" if key else f"  - {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (not "last one wins")."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_params(raw: dict[str, Any], path: Path = DEFAULT_PARAMS) -> Params:
    """Validate an already-loaded params mapping."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, path)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ConfigError with every bad key listed."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found (run from the project root or pass --params)")
    try:
        with open(path, encoding="utf-8") as f:  # a stream: YAML's messages name the file
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_params(raw, path)
