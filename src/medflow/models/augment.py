"""Training-time augmentation as Keras preprocessing layers, applied in the tf.data pipeline only.

Never part of a saved model and never applied to validation/test data (see train.datasets).
Not used when a frozen backbone trains its head on cached embeddings (the cache holds
features of the un-augmented images).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from medflow.config import Augment


def augmentation(aug: Augment, seed: int) -> keras.Sequential | None:
    """Random flip / rotation / zoom / shift / brightness / contrast on float 0..255 batches; None if all off."""
    layers: list[keras.layers.Layer] = []
    if aug.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if aug.rotation:
        layers.append(keras.layers.RandomRotation(aug.rotation, fill_mode="reflect", seed=seed + 1))
    if aug.zoom:
        layers.append(keras.layers.RandomZoom(aug.zoom, fill_mode="reflect", seed=seed + 2))
    if aug.shift:
        layers.append(keras.layers.RandomTranslation(aug.shift, aug.shift, fill_mode="reflect", seed=seed + 3))
    if aug.brightness:
        layers.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255), seed=seed + 4))
    if aug.contrast:
        layers.append(keras.layers.RandomContrast(aug.contrast, value_range=(0, 255), seed=seed + 5))
    return keras.Sequential(layers, name="augment") if layers else None


def augment_dataset(ds: tf.data.Dataset, aug: Augment, seed: int) -> tf.data.Dataset:
    """Map the augmentation (training=True) over batched ``(images, labels)``; unchanged when all off."""
    layer = augmentation(aug, seed)
    if layer is None:
        return ds
    return ds.map(lambda x, y: (layer(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
