"""Where a model's starting weights come from: ImageNet (Keras cache), a checked file, or none.

Never downloads: Keras' ``weights="imagenet"`` would try the internet and hang offline, so the
Keras cache file is looked up first and its *path* is handed to Keras.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from medflow import io
from medflow.config import ConfigError, ModelConfig, weights_problem

# keras.applications.<x> file names in the Keras cache (~/.keras/models) for include_top=False.
_IMAGENET_FILES = {
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "inception_v3": "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "efficientnet_b0": "efficientnetb0_notop.h5",
}
_MOBILENET_SIZES = (96, 128, 160, 192, 224)


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be had offline; the message names the file and where to put it."""


class WeightsMismatch(WeightsUnavailable):
    """A weights file exists but its sha256 differs from ``weights_sha256``."""


def keras_models_dir() -> Path:
    """The Keras weights cache: ``$KERAS_HOME/models``, else ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    return Path(home).expanduser() / "models"


def imagenet_filename(architecture: str, input_size: int) -> str:
    """The Keras cache file name of the no-top ImageNet weights of ``architecture``."""
    if architecture == "mobilenet_v2":
        rows = input_size if input_size in _MOBILENET_SIZES else 224
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    if architecture not in _IMAGENET_FILES:
        raise ValueError(f"architecture {architecture!r} has no ImageNet weights in keras.applications")
    return _IMAGENET_FILES[architecture]


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return io.sha256_file(path)


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file (memoised on path, size and mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def resolve_weights(cfg: ModelConfig, input_size: int | None = None) -> str | None:
    """Absolute path of the weights file to load, or None for random initialisation.

    ``input_size`` (default ``cfg.input_size``) only matters for MobileNetV2's ImageNet file name.
    Raises WeightsUnavailable (naming the file and where to put it) or WeightsMismatch.
    """
    if problem := weights_problem(cfg.architecture, cfg.weights):  # a config built without validation
        raise ConfigError(problem)
    if cfg.weights is None or cfg.weights.lower() in ("none", "null"):
        return None
    if cfg.weights.lower() == "imagenet":
        size = input_size or cfg.input_size or 224
        fname = imagenet_filename(cfg.architecture, size)
        path = keras_models_dir() / fname
        if not path.is_file():
            # backbones imports this module (and keras): import it only for the message
            from medflow.models.backbones import APPLICATIONS

            call = APPLICATIONS[cfg.architecture][0]
            if cfg.architecture == "mobilenet_v2":  # one file per input size: ask Keras for this one
                rows = size if size in _MOBILENET_SIZES else 224
                call += f"(include_top=False, input_shape=({rows}, {rows}, 3))"
            else:
                call += "(include_top=False)"
            raise WeightsUnavailable(
                f"ImageNet weights for {cfg.architecture} are not available offline: {fname} is not in "
                f"{keras_models_dir()}/. Put the file there (on a machine with internet, "
                f"`python -c 'import keras; keras.applications.{call}'` downloads it "
                f"to ~/.keras/models/), or set `weights:` to a local .weights.h5/.h5 file (checked with "
                f"`weights_sha256`), or `weights: null` to train from random initialisation on purpose."
            )
        return str(path.resolve())
    return str(_checked_file(cfg))


def _checked_file(cfg: ModelConfig) -> Path:
    path = Path(cfg.weights or "")
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights file {path} not found (looked in {path.resolve().parent}/). Put the file there, "
            f"or point `weights:` at it."
        )
    if cfg.weights_sha256:
        actual = sha256_file(path)
        if actual != cfg.weights_sha256.lower():
            raise WeightsMismatch(
                f"weights file {path} has sha256 {actual}, but weights_sha256 says {cfg.weights_sha256}: "
                f"the file is corrupt or not the one configured."
            )
    return path.resolve()


def weights_fingerprint(path: str | None) -> str:
    """Identity of resolved weights: ``none`` or ``sha256:<hex>`` of the file."""
    return "none" if path is None else f"sha256:{sha256_file(path)}"
