"""Custom Keras layers of medflow models (registered, so saved models load with safe_mode=True)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

# keras.applications.imagenet_utils "caffe" mode: BGR channel order, ImageNet mean subtracted.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MODES = ("caffe", "tf")


@keras.saving.register_keras_serializable(package="medflow")
class BackbonePreprocess(keras.layers.Layer):
    """Maps RGB 0..255 to what a backbone expects (same maths as keras.applications.*.preprocess_input).

    modes: ``caffe`` (VGG16/19, ResNet50: RGB->BGR, minus the ImageNet mean), ``tf``
    (InceptionV3, MobileNetV2: scale to [-1, 1]).
    """

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; one of {MODES}")
        self.mode = mode

    def call(self, x):  # noqa: ANN001, ANN201 - Keras tensor in, tensor out
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
        return x / 127.5 - 1.0

    def compute_output_shape(self, input_shape):  # noqa: ANN001, ANN201
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}
