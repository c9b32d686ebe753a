"""Grad-CAM: shape, range, and that it points at the evidence the model actually uses."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from medflow.models.gradcam import gradcam, overlay  # noqa: E402

S = 32


def square_detector(channels: int = 3) -> keras.Model:
    """Contract-shaped model whose class 0 score grows with bright pixels, class 1 with a constant.

    Conv filter 0 measures local brightness, filter 1 is a constant 0.5; the feature map (16×16,
    after pooling) is the layer 'features'. So the evidence for class 0 is exactly where the image is bright.
    """
    inp = keras.Input((S, S, channels))
    x = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inp)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Activation("relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(2, name="embedding")(x)
    out = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    model = keras.Model(inp, out)
    k = np.zeros((3, 3, channels, 2), "float32")
    k[..., 0] = 1.0 / (9 * channels * 255.0)
    model.get_layer("conv").set_weights([k, np.array([0.0, 0.5], "float32")])
    model.get_layer("embedding").set_weights([np.eye(2, dtype="float32"), np.zeros(2, "float32")])
    model.get_layer("probs").set_weights([np.diag([40.0, 2.0]).astype("float32"), np.zeros(2, "float32")])
    return model


def with_square(corner: str, channels: int = 3, n: int = 1) -> np.ndarray:
    img = np.zeros((n, S, S, channels), "float32")
    r, c = {"tl": (3, 3), "br": (21, 21)}[corner]
    img[:, r : r + 8, c : c + 8, :] = 255.0
    return img


def quadrant_share(heat: np.ndarray, corner: str) -> float:
    h = S // 2
    q = heat[:h, :h] if corner == "tl" else heat[h:, h:]
    return float(q.sum() / heat.sum())


def test_shape_range_and_not_constant():
    model = square_detector()
    x = np.concatenate([with_square("tl"), with_square("br")])
    heat = gradcam(model, x)
    assert heat.shape == (2, S, S)
    assert heat.dtype.kind == "f"
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert np.isclose(heat.max(axis=(1, 2)), 1.0).all()  # normalised per image
    assert heat[0].std() > 0.1 and heat[1].std() > 0.1


@pytest.mark.parametrize("corner", ["tl", "br"])
def test_heatmap_mass_sits_on_the_evidence(corner):
    model = square_detector()
    x = with_square(corner)
    assert model.predict(x, verbose=0).argmax() == 0  # the square drives the prediction
    heat = gradcam(model, x)[0]
    assert quadrant_share(heat, corner) > 0.9


def test_class_index_changes_the_explanation():
    model = square_detector()
    x = with_square("tl")
    np.testing.assert_allclose(gradcam(model, x, class_index=0), gradcam(model, x), atol=1e-6)
    other = gradcam(model, x, class_index=1)[0]  # evidence for "no square": the dark background
    assert quadrant_share(other, "tl") < 0.3
    per_image = gradcam(model, np.concatenate([x, x]), class_index=np.array([0, 1]))
    np.testing.assert_allclose(per_image[1], other, atol=1e-6)


def test_greyscale_model_and_overlay():
    model = square_detector(channels=1)
    x = with_square("br", channels=1)
    heat = gradcam(model, x)[0]
    assert quadrant_share(heat, "br") > 0.9
    img = x[0].astype(np.uint8)
    out = overlay(img, heat)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    # The hot (square) region is tinted differently from the cold background.
    assert not np.array_equal(out[25, 25], out[2, 30])
    # A heatmap of another size is resized to the image.
    big = overlay(np.zeros((64, 48, 3), np.uint8), heat)
    assert big.shape == (64, 48, 3)


def test_flat_evidence_gives_zero_map_not_nan():
    model = square_detector()
    heat = gradcam(model, np.zeros((1, S, S, 3), "float32"), class_index=0)
    assert np.isfinite(heat).all() and heat.max() == 0.0
