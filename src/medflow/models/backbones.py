"""Backbones: keras.applications networks or a saved ``.keras`` feature extractor, with their preprocessing.

A frozen backbone with weights is loaded once per process and shared by every model built on it
(``embed`` then ``train`` in one flow, or several heads on one backbone): frozen and run in inference
mode, its weights never change. Trainable or randomly initialised backbones are loaded fresh each time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import keras

from medflow.config import ConfigError, ModelConfig
from medflow.models.weights import weights_fingerprint

_FROZEN: OrderedDict[tuple, keras.Model] = OrderedDict()  # (architecture, weights hash, size, dtype policy)
_FROZEN_MAX = 2

# architecture -> (keras.applications constructor name, BackbonePreprocess mode or None = built in)
APPLICATIONS: dict[str, tuple[str, str | None]] = {
    "vgg16": ("VGG16", "caffe"),
    "vgg19": ("VGG19", "caffe"),
    "resnet50": ("ResNet50", "caffe"),
    "inception_v3": ("InceptionV3", "tf"),
    "mobilenet_v2": ("MobileNetV2", "tf"),
    "efficientnet_b0": ("EfficientNetB0", None),  # Rescaling + Normalization inside the network
}


def preprocess_mode(architecture: str) -> str | None:
    """Preprocessing a backbone needs on RGB 0..255 input (None: none, or built into the network)."""
    return APPLICATIONS[architecture][1] if architecture in APPLICATIONS else None


def load_backbone(cfg: ModelConfig, weights: str | None, input_size: int) -> keras.Model:
    """The backbone (no top) for ``cfg.architecture`` with ``weights`` (a resolved path or None), trainability set.

    Frozen (``trainable: none``) backbones with weights come from a small per-process cache (module docstring).
    """
    import tensorflow as tf

    key = None
    if cfg.trainable == "none" and weights is not None and not tf.distribute.has_strategy():
        key = (cfg.architecture, weights_fingerprint(weights), input_size, keras.config.dtype_policy().name)
        if key in _FROZEN:
            _FROZEN.move_to_end(key)
            return _FROZEN[key]
    backbone = _load(cfg, weights, input_size)
    set_trainable(backbone, cfg.trainable)
    if key is not None:
        _FROZEN[key] = backbone
        while len(_FROZEN) > _FROZEN_MAX:
            _FROZEN.popitem(last=False)
    return backbone


def clear_backbone_cache() -> None:
    """Forget the shared frozen backbones (the next build loads from disk again)."""
    _FROZEN.clear()


def _load(cfg: ModelConfig, weights: str | None, input_size: int) -> keras.Model:
    if cfg.architecture == "keras_file":
        assert weights is not None, "resolve_weights refuses keras_file without a file"
        backbone = keras.models.load_model(weights, compile=False, safe_mode=True)
        shape = backbone.output.shape
        if len(shape) != 4 or backbone.input.shape[-1] != 3:
            raise ValueError(
                f"{weights}: a keras_file backbone must map (H, W, 3) RGB 0..255 images to a 4-D feature map; "
                f"it maps {backbone.input.shape} -> {shape}"
            )
    elif cfg.architecture in APPLICATIONS:
        constructor = getattr(keras.applications, APPLICATIONS[cfg.architecture][0])
        backbone = constructor(include_top=False, weights=weights, input_shape=(input_size, input_size, 3))
    else:
        raise ValueError(f"{cfg.architecture} is not a backbone architecture")
    return backbone


def set_trainable(backbone: keras.Model, trainable: Literal["none", "all"] | list[str]) -> None:
    """Freeze all (``none``), train all (``all``), or train from the first layer whose name starts with one
    of the prefixes to the end (e.g. ``[block4, block5]`` for VGG); BatchNormalization stays frozen then."""
    if trainable == "none":
        backbone.trainable = False
        return
    backbone.trainable = True
    if trainable == "all":
        return
    names = [layer.name for layer in backbone.layers]
    start = next((i for i, n in enumerate(names) if n.startswith(tuple(trainable))), None)
    if start is None:
        raise ConfigError(
            f"trainable {trainable} matches no layer of {backbone.name}; layer names look like "
            f"{names[1:4]} ... {names[-3:]}"
        )
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
