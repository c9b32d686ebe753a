"""Model registry: every ``models:`` entry of params.yaml is built here, by one function.

Built model (docs/contracts.md): float32 RGB/grey 0..255 images at the ingest size (S, S, C) ->
[grey replicated to RGB] -> Resizing to ``input_size`` -> the backbone's own preprocessing -> backbone ->
``features`` (last 4-D map, Grad-CAM) -> GlobalAveragePooling ``embedding`` (pooled vector, monitoring
and the embedding cache) -> [Dense ``head`` relu] -> Dropout -> Dense softmax ``probs`` (float32).
No augmentation inside: it lives in the training input pipeline only.
"""

from __future__ import annotations

from pathlib import Path

import keras

from medflow.config import ConfigError, ModelConfig
from medflow.models import layers as _layers
from medflow.models.backbones import load_backbone, preprocess_mode
from medflow.models.weights import resolve_weights

FEATURES, EMBEDDING, PROBS = "features", "embedding", "probs"
HEAD_LAYERS = ("head", "probs")  # the layers with weights that sit after the embedding


def input_size(cfg: ModelConfig, image_size: int) -> int:
    """The size the model resizes to in-graph (``cfg.input_size``, default the ingest size)."""
    return cfg.input_size or image_size


def build_model(
    cfg: ModelConfig, num_classes: int, image_size: int, channels: int, *, weights: str | None | bool = True
) -> keras.Model:
    """Build the classifier for ``cfg`` on (image_size, image_size, channels) inputs.

    ``weights``: True resolves ``cfg.weights`` (may raise WeightsUnavailable); a path or None overrides it.
    """
    size = input_size(cfg, image_size)
    if weights is True:
        weights = resolve_weights(cfg, size)
    inputs = keras.Input((image_size, image_size, channels), dtype="float32", name="image")
    x = inputs
    if cfg.architecture != "basic_cnn" and channels == 1:
        x = keras.layers.Concatenate(name="to_rgb")([x, x, x])
    if size != image_size:
        x = keras.layers.Resizing(size, size, name="resize")(x)
    if cfg.architecture == "basic_cnn":
        x = _basic_cnn(x, cfg)
    else:
        backbone = load_backbone(cfg, weights, size)  # type: ignore[arg-type]
        mode = preprocess_mode(cfg.architecture)
        if mode is not None:
            x = _layers.BackbonePreprocess(mode, name="preprocess", dtype="float32")(x)
        try:
            x = backbone(x, training=False) if cfg.trainable == "none" else backbone(x)
        except ValueError as e:  # e.g. a .keras backbone whose strides leave nothing of a small input
            if "negative" not in str(e):
                raise
            raise ConfigError(f"{cfg.architecture} backbone cannot take {size}x{size} px inputs: its strided layers "
                              "leave no pixels; raise the model's input_size") from None
    x = keras.layers.Identity(name=FEATURES)(x)
    x = keras.layers.GlobalAveragePooling2D(name=EMBEDDING)(x)
    outputs = _head(x, cfg, num_classes)
    return keras.Model(inputs, outputs, name=cfg.architecture)


def build_head(cfg: ModelConfig, num_classes: int, dim: int) -> keras.Model:
    """The part after ``embedding`` alone (same layer names), for training on cached embeddings."""
    inputs = keras.Input((dim,), dtype="float32", name=EMBEDDING)
    return keras.Model(inputs, _head(inputs, cfg, num_classes), name=f"{cfg.architecture}_head")


def transfer_head(head: keras.Model, model: keras.Model) -> None:
    """Copy the trained head's weights into the full model."""
    for name in HEAD_LAYERS:
        if any(layer.name == name for layer in head.layers):
            model.get_layer(name).set_weights(head.get_layer(name).get_weights())


def load_model(path: str | Path) -> keras.Model:
    """Load a saved medflow model (registers the custom layers first; safe_mode stays on)."""
    return keras.models.load_model(path, compile=False, safe_mode=True)


def _basic_cnn(x, cfg: ModelConfig):  # noqa: ANN001, ANN202 - Keras tensors
    """Conv blocks as in the malaria study (Rajaraman et al. 2018: three blocks of 32/64/128 filters),
    with batch normalisation so it learns from a few hundred images; ``cfg.filters`` and
    ``cfg.convs_per_block`` widen/deepen it for larger sets. The last block feeds ``features``."""
    x = keras.layers.Rescaling(1.0 / 255, name="preprocess")(x)
    for i, filters in enumerate(cfg.filters, start=1):
        for j in range(1, cfg.convs_per_block + 1):
            suffix = "" if cfg.convs_per_block == 1 else f"{j}"
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv{suffix}")(x)
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn{suffix}")(x)  # few steps per epoch
            x = keras.layers.Activation("relu", name=f"block{i}_relu{suffix}")(x)
        if i < len(cfg.filters):
            x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return x


def _head(x, cfg: ModelConfig, num_classes: int):  # noqa: ANN001, ANN202 - Keras tensors
    if cfg.head_units:
        x = keras.layers.Dense(cfg.head_units, activation="relu", name="head")(x)
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=PROBS)(x)
