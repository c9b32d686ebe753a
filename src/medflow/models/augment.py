"""Training-time augmentation as a Keras preprocessing layer, applied in the tf.data pipeline only.

Never part of a saved model and never applied to validation/test data (see train.datasets).
Not used when a frozen backbone trains its head on cached embeddings (the cache holds
features of the un-augmented images).

:class:`RandomAugment` does flip, rotation, zoom and shift as ONE affine warp per image (the
transforms are composed into a single matrix: one interpolation instead of four) and brightness
and contrast as one per-channel linear map, both with OpenCV in a single pass over the pixels.
On CPU this is several times faster than chaining Keras' RandomFlip / RandomRotation /
RandomZoom / RandomTranslation / RandomBrightness / RandomContrast, each of which processes the
whole batch again. In the training pipeline the random parameters are stateless TensorFlow draws
keyed per batch from a stream seeded by ``train.seed`` (stateful random ops in a parallel map are
consumed in thread order, which made runs differ), so a run repeats exactly; the semantics of each
factor follow the Keras layers of the same name.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import tensorflow as tf

from medflow.config import Augment


def _augment(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Warp + colour change per image of a 0..255 batch -> uint8; ``params`` rows are
    (flip, angle_deg, scale, tx, ty, brightness delta, contrast factor). Works at 8-bit precision
    (the images come from uint8 shards; a float batch is rounded first): OpenCV is fastest on uint8
    and saturates at 0/255. Each image is warped straight into the output, then recoloured in place."""
    src = images if images.dtype == np.uint8 else np.clip(np.rint(images), 0, 255).astype(np.uint8)
    _, h, w, c = src.shape
    out = np.empty_like(src)
    centre = (w / 2 - 0.5, h / 2 - 0.5)
    colour = np.zeros((c, c + 1), np.float32)  # [diag(contrast) | per-channel offset]
    for i, (flip, angle, scale, tx, ty, bright, contrast) in enumerate(params.tolist()):
        dst = out[i] if c > 1 else out[i, :, :, 0]
        if flip or angle or scale != 1 or tx or ty:
            m = cv2.getRotationMatrix2D(centre, angle, scale)
            if flip > 0.5:  # mirror about the vertical centre line, then rotate/zoom
                m[:, 0] *= -1
                m[:, 2] -= m[:, 0] * (w - 1)
            m[:, 2] += (tx * w, ty * h)
            cv2.warpAffine(src[i], m, (w, h), dst=dst, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        else:
            out[i] = src[i]
        if bright or contrast != 1:  # (x - mean) * contrast + mean + brightness, per channel
            np.fill_diagonal(colour, contrast)
            colour[:, c] = (1 - contrast) * np.asarray(cv2.mean(dst)[:c], np.float32) + bright
            cv2.transform(dst, colour, dst=dst)
    return out


@keras.saving.register_keras_serializable(package="medflow")
class RandomAugment(keras.layers.Layer):
    """Random horizontal flip, rotation (fraction of a turn), zoom and shift (fractions of the size)
    composed into one bilinear warp with reflected borders, then brightness (fraction of 255) and
    contrast (factor in [1 - contrast, 1 + contrast]) on uint8 or float 0..255 image batches (float32 out)."""

    def __init__(self, flip: bool = False, rotation: float = 0.0, zoom: float = 0.0, shift: float = 0.0,
                 brightness: float = 0.0, contrast: float = 0.0, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flip, self.rotation, self.zoom, self.shift = flip, rotation, zoom, shift
        self.brightness, self.contrast, self.seed = brightness, contrast, seed

    def call(self, images, training=True, key=None):  # noqa: ANN001, ANN201 - Keras tensors
        """``key`` (int64 scalar) draws the parameters statelessly from ``(key, k)``: reproducible even
        inside a parallel ``tf.data`` map, where stateful random ops are consumed in thread order."""
        if not training:
            return images
        n = tf.shape(images)[0]

        def uniform(k: int, low: float, high: float):  # noqa: ANN202
            if key is not None:
                return tf.random.stateless_uniform((n,), tf.stack([key, tf.constant(k, tf.int64)]), low, high)
            return tf.random.uniform((n,), low, high, seed=None if self.seed is None else self.seed + k)

        flip = tf.cast(uniform(0, 0, 1) < 0.5, tf.float32) if self.flip else tf.zeros((n,))
        params = tf.stack([
            flip,
            uniform(1, -360.0 * self.rotation, 360.0 * self.rotation),
            uniform(2, 1 - self.zoom, 1 + self.zoom),
            uniform(3, -self.shift, self.shift),
            uniform(4, -self.shift, self.shift),
            uniform(5, -255.0 * self.brightness, 255.0 * self.brightness),
            uniform(6, 1 - self.contrast, 1 + self.contrast),
        ], axis=1)
        pixels = images if images.dtype == tf.uint8 else tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
        out = tf.numpy_function(_augment, [pixels, params], tf.uint8, stateful=False)
        return tf.cast(tf.ensure_shape(out, images.shape), tf.float32)

    def get_config(self) -> dict:
        return {**super().get_config(), "flip": self.flip, "rotation": self.rotation, "zoom": self.zoom,
                "shift": self.shift, "brightness": self.brightness, "contrast": self.contrast, "seed": self.seed}


def augmentation(aug: Augment, seed: int) -> RandomAugment | None:
    """The training augmentation of ``aug``; None when every factor is off."""
    if not any(aug.model_dump().values()):
        return None
    return RandomAugment(aug.flip, aug.rotation, aug.zoom, aug.shift, aug.brightness, aug.contrast, seed=seed,
                         name="augment")


def augment_dataset(ds: tf.data.Dataset, aug: Augment, seed: int) -> tf.data.Dataset:
    """Map the augmentation (training=True) over batched ``(images, labels)`` (uint8 or float 0..255;
    uint8 saves two conversions) to float32 batches; only the conversion when every factor is off.

    Each batch gets its own key from a seeded random stream that is redrawn every epoch, so the
    augmentation differs per epoch and batch yet the whole run repeats exactly under one seed.
    """
    layer = augmentation(aug, seed)
    if layer is None:
        return ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(ds, keys).map(lambda batch, key: (layer(batch[0], training=True, key=key), batch[1]),
                                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
