"""Training-time augmentation as Keras preprocessing layers, applied in the tf.data pipeline only.

Never part of a saved model and never applied to validation/test data (see train.datasets).
Not used when a frozen backbone trains its head on cached embeddings (the cache holds
features of the un-augmented images).

Geometry (flip, rotation, zoom, shift) and contrast are one :class:`RandomAffine` layer: the
transforms are composed into a single matrix per image and applied with one OpenCV ``warpAffine``
(one interpolation instead of three), with the contrast change in the same pass over the pixels.
On CPU this is several times faster than chaining Keras' RandomFlip/RandomRotation/RandomZoom/
RandomTranslation/RandomContrast, which each process the whole batch again. Random parameters are
drawn with TensorFlow ops, so runs are reproducible under ``train.seed``. Brightness is Keras'
RandomBrightness.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf

from medflow.config import Augment


def _warp(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """One affine warp + contrast change per image; ``params`` rows are
    (flip, angle_deg, scale, tx, ty, contrast factor); values stay in 0..255."""
    n, h, w = images.shape[:3]
    out = np.empty_like(images)
    centre = (w / 2 - 0.5, h / 2 - 0.5)
    for i in range(n):
        flip, angle, scale, tx, ty, contrast = params[i]
        m = cv2.getRotationMatrix2D(centre, float(angle), float(scale))
        if flip > 0.5:  # mirror about the vertical centre line before rotating
            m[:, 0] *= -1
            m[:, 2] += m[:, 0] * -(w - 1)
        m[:, 2] += (tx * w, ty * h)
        warped = cv2.warpAffine(images[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        warped = warped.reshape(out[i].shape)
        if contrast != 1.0:  # as keras.layers.RandomContrast: scale around the per-channel mean
            mean = warped.mean(axis=(0, 1), keepdims=True)
            warped = np.clip((warped - mean) * contrast + mean, 0.0, 255.0)
        out[i] = warped
    return out


@keras.saving.register_keras_serializable(package="medflow")
class RandomAffine(keras.layers.Layer):
    """Random horizontal flip, rotation (fraction of a turn), zoom and shift (fractions of the size)
    composed into one bilinear warp with reflected borders, then a contrast factor in
    [1 - contrast, 1 + contrast], on float 0..255 image batches."""

    def __init__(self, flip: bool = False, rotation: float = 0.0, zoom: float = 0.0, shift: float = 0.0,
                 contrast: float = 0.0, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flip, self.rotation, self.zoom, self.shift = flip, rotation, zoom, shift
        self.contrast, self.seed = contrast, seed

    def call(self, images, training=True):  # noqa: ANN001, ANN201 - Keras tensors
        if not training:
            return images
        n = tf.shape(images)[0]

        def uniform(k: int, low: float, high: float):  # noqa: ANN202
            return tf.random.uniform((n,), low, high, seed=None if self.seed is None else self.seed + k)

        flip = tf.cast(uniform(0, 0, 1) < 0.5, tf.float32) if self.flip else tf.zeros((n,))
        angle = uniform(1, -360.0 * self.rotation, 360.0 * self.rotation)
        scale = uniform(2, 1 - self.zoom, 1 + self.zoom)
        tx, ty = uniform(3, -self.shift, self.shift), uniform(4, -self.shift, self.shift)
        contrast = uniform(5, 1 - self.contrast, 1 + self.contrast)
        params = tf.stack([flip, angle, scale, tx, ty, contrast], axis=1)
        out = tf.numpy_function(_warp, [tf.cast(images, tf.float32), params], tf.float32, stateful=False)
        return tf.ensure_shape(out, images.shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "flip": self.flip, "rotation": self.rotation, "zoom": self.zoom,
                "shift": self.shift, "contrast": self.contrast, "seed": self.seed}


def augmentation(aug: Augment, seed: int) -> keras.Sequential | None:
    """Random flip / rotation / zoom / shift / brightness / contrast on float 0..255 batches; None if all off."""
    layers: list[keras.layers.Layer] = []
    if aug.flip or aug.rotation or aug.zoom or aug.shift or aug.contrast:
        layers.append(RandomAffine(aug.flip, aug.rotation, aug.zoom, aug.shift, aug.contrast, seed=seed,
                                   name="random_affine"))
    if aug.brightness:
        layers.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed + 10))
    return keras.Sequential(layers, name="augment") if layers else None


def augment_dataset(ds: tf.data.Dataset, aug: Augment, seed: int) -> tf.data.Dataset:
    """Map the augmentation (training=True) over batched ``(images, labels)``; unchanged when all off."""
    layer = augmentation(aug, seed)
    if layer is None:
        return ds
    return ds.map(lambda x, y: (layer(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
