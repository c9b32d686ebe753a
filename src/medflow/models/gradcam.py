"""Grad-CAM (Selvaraju et al. 2017) over the layer named ``features`` and a colour overlay."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def gradcam(model: Any, images: np.ndarray, class_index: int | np.ndarray | None = None) -> np.ndarray:
    """Class-activation heatmaps (N, S, S) in 0..1 for float32 ``images`` (N, S, S, C), 0..255.

    The class score is the ``probs`` output for ``class_index`` (an int for all images, one per
    image, or None = the predicted class). Channel weights are the spatially averaged gradients of
    that score with respect to the ``features`` map; the ReLU of the weighted sum is resized to
    the input size and divided by its maximum (an all-zero map stays zero).
    """
    import keras
    import tensorflow as tf

    x = tf.convert_to_tensor(np.asarray(images, dtype="float32"))
    cam_model = keras.Model(model.inputs, [model.get_layer("features").output, model.output])
    with tf.GradientTape() as tape:
        feats, probs = cam_model(x, training=False)
        feats = tf.cast(feats, tf.float32)
        probs = tf.cast(probs, tf.float32)
        if class_index is None:
            idx = tf.argmax(probs, axis=-1, output_type=tf.int32)
        else:
            idx = tf.broadcast_to(tf.constant(class_index, tf.int32), tf.shape(probs)[:1])
        score = tf.gather(probs, idx, axis=1, batch_dims=1)
    grads = tape.gradient(score, feats)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feats, axis=-1))[..., None]
    cam = tf.image.resize(cam, x.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return np.divide(cam, peak[:, None, None], out=np.zeros_like(cam), where=peak[:, None, None] > 0).clip(0, 1)


GRADCAM_COLORMAP = "jet"  # matplotlib's name for OpenCV's COLORMAP_JET below (the colour bar under the grid)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a 0..1 heatmap (JET colormap: red = most important) over an RGB or grey uint8 image."""
    img = np.asarray(image_uint8, dtype=np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    heat = cv2.resize(np.asarray(heatmap, dtype=np.float32), (img.shape[1], img.shape[0]))
    colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(img, 1.0 - alpha, colour, alpha, 0.0)
