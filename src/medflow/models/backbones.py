"""Backbones: keras.applications networks or a saved ``.keras`` feature extractor, with their preprocessing."""

from __future__ import annotations

from typing import Literal

import keras

from medflow.config import ModelConfig

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
    """The backbone (no top) for ``cfg.architecture`` with ``weights`` (a resolved path or None), trainability set."""
    if cfg.architecture == "keras_file":
        if weights is None:
            raise ValueError("architecture keras_file needs `weights:` set to a .keras file")
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
    set_trainable(backbone, cfg.trainable)
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
        raise ValueError(
            f"trainable {trainable} matches no layer of {backbone.name}; layer names look like "
            f"{names[1:4]} ... {names[-3:]}"
        )
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
