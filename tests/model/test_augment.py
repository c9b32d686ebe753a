"""The one-pass affine + contrast augmentation layer (OpenCV warp inside a Keras layer)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from medflow.config import Augment
from medflow.models.augment import RandomAugment, _augment, augment_dataset, augmentation


def _params(flip=0, angle=0.0, scale=1.0, tx=0.0, ty=0.0, bright=0.0, contrast=1.0) -> np.ndarray:
    return np.array([[flip, angle, scale, tx, ty, bright, contrast]], np.float32)


def test_identity_flip_and_quarter_turn_are_exact() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 9, 9, 3)).astype(np.float32)  # 8-bit values, as from the shards
    np.testing.assert_array_equal(_augment(img, _params()), img)
    np.testing.assert_allclose(_augment(img, _params(flip=1)), img[:, :, ::-1], atol=1e-3)
    # OpenCV angles are counter-clockwise, as np.rot90
    np.testing.assert_allclose(_augment(img, _params(angle=90)), np.rot90(img, 1, axes=(1, 2)), atol=1e-3)


def test_shift_and_contrast_values() -> None:
    img = np.zeros((1, 10, 10, 1), np.float32)
    img[0, 4, 4] = 200
    shifted = _augment(img, _params(tx=0.2))  # 2 pixels right
    assert shifted[0, 4, 6, 0] == 200 and shifted[0, 4, 4, 0] == 0
    flat = np.full((1, 4, 4, 3), 100, np.float32)
    flat[0, 0, 0] = 180
    out = _augment(flat, _params(contrast=0.5))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), flat.mean(axis=(1, 2)), atol=0.5)  # mean kept (8-bit)
    assert abs(out[0, 0, 0, 0] - out[0, 1, 1, 0] - 40) <= 1  # spread halved
    np.testing.assert_allclose(_augment(flat, _params(bright=10)), np.minimum(flat + 10, 255))
    assert _augment(flat, _params(bright=100)).max() == 255  # clipped to the 8-bit range


def test_layer_only_acts_in_training_and_keeps_range() -> None:
    x = tf.round(tf.random.uniform((4, 16, 16, 3), 0, 255, seed=1))
    layer = RandomAugment(flip=True, rotation=0.2, zoom=0.2, shift=0.2, brightness=0.1, contrast=0.3, seed=3)
    np.testing.assert_array_equal(layer(x, training=False), x)
    y = layer(x, training=True).numpy()
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255 and not np.allclose(y, x.numpy())
    assert RandomAugment.from_config(layer.get_config()).contrast == 0.3


def test_augmentation_off_builds_nothing() -> None:
    assert augmentation(Augment(flip=False), seed=0) is None
    layer = augmentation(Augment(flip=True, brightness=0.1), seed=0)
    assert isinstance(layer, RandomAugment) and layer.flip and layer.brightness == 0.1 and layer.rotation == 0


def test_augmented_dataset_repeats_exactly_under_one_seed() -> None:
    """Per-batch keys from a seeded stream: the same run twice is identical (also with the parallel map),
    each epoch draws new augmentations, and another seed draws others."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 16, 16, 3)).astype(np.float32)
    aug = Augment(flip=True, rotation=0.2, zoom=0.1, brightness=0.1)

    def epochs(seed: int, n: int = 2) -> list[np.ndarray]:
        base = tf.data.Dataset.from_tensor_slices((images, np.arange(24))).batch(4)
        ds = augment_dataset(base, aug, seed)
        return [np.concatenate([x for x, _ in ds.as_numpy_iterator()]) for _ in range(n)]

    first, second = epochs(7)
    np.testing.assert_array_equal(epochs(7)[0], first)
    np.testing.assert_array_equal(epochs(7)[1], second)
    assert not np.array_equal(first, second) and not np.array_equal(epochs(8)[0], first)
    assert not np.array_equal(first, images)


def test_eight_bit_and_float_batches_augment_alike() -> None:
    """The training input hands the layer uint8 batches (no float round trip); float batches are rounded
    to 8 bits first. Both give the same pixels, and the layer returns float32 either way."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (3, 12, 10, 3)).astype(np.uint8)
    p = np.concatenate([_params(flip=1, angle=20, scale=1.1, tx=0.1, bright=9, contrast=1.2),
                        _params(), _params(contrast=0.8)])
    out = _augment(img, p)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, _augment(img.astype(np.float32) + 0.3, p))
    np.testing.assert_array_equal(out[1], img[1])  # identity row untouched
    grey = img[..., :1]  # one channel: warped into the (H, W) view of its output row, same as any channel of RGB
    np.testing.assert_array_equal(_augment(grey, p), _augment(np.repeat(grey, 3, axis=3), p)[..., :1])
    layer = RandomAugment(flip=True, rotation=0.1, brightness=0.1, seed=0)
    a, b = layer(tf.constant(img), training=True, key=tf.constant(5, tf.int64)), \
        layer(tf.constant(img, tf.float32), training=True, key=tf.constant(5, tf.int64))
    assert a.dtype == b.dtype == tf.float32
    np.testing.assert_array_equal(a, b)


def test_augmentation_off_only_converts_to_float() -> None:
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    ds = augment_dataset(tf.data.Dataset.from_tensor_slices((images, np.arange(2))).batch(2), Augment(flip=False), 0)
    x, y = next(ds.as_numpy_iterator())
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, images.astype(np.float32))
    np.testing.assert_array_equal(y, [0, 1])
