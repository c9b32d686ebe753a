"""Model registry, backbones, preprocessing and weights resolution (tiny sizes, no downloads)."""

from __future__ import annotations

import os
import typing
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from medflow.config import ConfigError, ModelConfig, load_params, parse_params  # noqa: E402
from medflow.models.backbones import clear_backbone_cache  # noqa: E402
from medflow.models.layers import BackbonePreprocess  # noqa: E402
from medflow.models.registry import build_model, load_model  # noqa: E402
from medflow.models.weights import (  # noqa: E402
    WeightsMismatch,
    WeightsUnavailable,
    imagenet_filename,
    resolve_weights,
)

ROOT = Path(__file__).resolve().parents[2]
LITE0 = ROOT / "models" / "pretrained" / "efficientnet_lite0_imagenet_notop.keras"
LITE0_SHA = "210b041bba85742dae7faf3891d0637aa87e61050d782492cf2211b0b16ae78c"
PARAMS = load_params(ROOT / "params.yaml")
# Architectures no params.yaml entry uses yet, so every architecture is built at least once.
EXTRA = {"efficientnet_b0_frozen": ModelConfig(architecture="efficientnet_b0", trainable="none")}


def _tiny(cfg: ModelConfig) -> ModelConfig:
    """The registry entry at test size: random init (except the vendored file), head of 8 units."""
    weights = cfg.weights if cfg.architecture == "keras_file" else None
    size = 75 if cfg.architecture == "inception_v3" else 32  # InceptionV3's minimum input is 75 px
    return cfg.model_copy(update={"weights": weights, "weights_sha256": cfg.weights_sha256 if weights else None,
                                  "input_size": size, "head_units": min(cfg.head_units, 8)})


ENTRIES = {**PARAMS.models, **EXTRA}


def test_entries_cover_every_architecture() -> None:
    literal = typing.get_args(ModelConfig.model_fields["architecture"].annotation)
    assert {c.architecture for c in ENTRIES.values()} == set(literal)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_registry_entry_builds_and_trains_one_step(name: str) -> None:
    cfg = _tiny(ENTRIES[name])
    channels = 1 if name == "basic_cnn" else 3
    model = build_model(cfg, num_classes=3, image_size=28, channels=channels)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 28, 28, channels)).astype("float32")
    y = np.array([0, 1, 2, 1])

    # contract layers: 4-D features, pooled 2-D embedding, float32 softmax probs
    assert len(model.get_layer("features").output.shape) == 4
    assert len(model.get_layer("embedding").output.shape) == 2
    assert model.get_layer("probs").dtype_policy.compute_dtype == "float32"
    assert not [layer.name for layer in model.layers if type(layer).__name__.startswith("Random")]

    # frozen weights: everything non-trainable except the moving statistics of BatchNorm layers that
    # train (basic_cnn's own BN); frozen backbones' BN runs in inference mode, so theirs stay put
    frozen = [w for w in model.non_trainable_weights
              if not (name == "basic_cnn" and "moving_" in w.path)]
    frozen_before = [w.numpy().copy() for w in frozen]
    trainable_before = [w.numpy().copy() for w in model.trainable_weights]
    # eager: one step of a big graph is much cheaper than tracing it
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", run_eagerly=True)
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss) and loss > 0
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(trainable_before, model.trainable_weights)]
    assert any(changed)
    # frozen weights do not move (BatchNorm statistics included: frozen BN runs in inference mode)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(frozen_before, frozen))

    # Grad-CAM: features and probs from one functional model
    feats, probs = keras.Model(model.input, [model.get_layer("features").output, model.output])(x)
    assert feats.shape[0] == 4 and len(feats.shape) == 4
    np.testing.assert_allclose(np.asarray(probs).sum(axis=1), 1.0, rtol=1e-5)

    trainable_names = {w.path.split("/")[-2] for w in model.trainable_weights}
    if cfg.trainable == "none":  # only the head trains
        assert trainable_names <= {"head", "probs"}
    elif isinstance(cfg.trainable, list):  # the top of the backbone trains, its bottom and BatchNorm do not
        backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        with_weights = [layer for layer in backbone.layers if layer.weights]
        assert any(layer.trainable_weights for layer in with_weights)
        assert not with_weights[0].trainable_weights
        assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable_weights
                       for layer in with_weights)

def test_vgg19_finetune_trains_blocks_4_and_5_only() -> None:
    model = build_model(_tiny(PARAMS.models["vgg19_finetune"]), 2, 32, 3)
    backbone = model.get_layer("vgg19")
    trainable = {layer.name for layer in backbone.layers if layer.trainable_weights}
    convs = {layer.name for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)}
    assert trainable == {n for n in convs if n.startswith(("block4", "block5"))}
    assert len(trainable) == 8  # VGG19: 4 convs in block 4, 4 in block 5


def test_keras_file_backbone_loads_vendored_lite0() -> None:
    assert LITE0.exists(), f"vendored backbone {LITE0} missing (shipped in the repository)"
    cfg = ModelConfig(architecture="keras_file", weights=str(LITE0), weights_sha256=LITE0_SHA, trainable="none",
                      input_size=64)
    model = build_model(cfg, 2, 48, 3)
    assert tuple(model.get_layer("features").output.shape[1:]) == (2, 2, 1280)  # (H/32, W/32, 1280)
    backbone = model.get_layer("efficientnet_lite0")
    assert backbone.count_params() > 3_000_000 and not backbone.trainable_weights
    original = keras.models.load_model(LITE0, compile=False)
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").kernel.numpy(),
                                  original.get_layer("stem_conv").kernel.numpy())
    with pytest.raises(ConfigError, match="cannot take 16x16 px inputs.*raise the model's input_size"):
        build_model(cfg.model_copy(update={"input_size": 16}), 2, 48, 3)  # strides leave nothing of 16 px


def test_frozen_backbone_is_loaded_once_and_shared(tmp_path: Path) -> None:
    cfg = ModelConfig(architecture="keras_file", weights=str(LITE0), weights_sha256=LITE0_SHA, trainable="none",
                      input_size=32)
    clear_backbone_cache()
    first, second = build_model(cfg, 2, 32, 3), build_model(cfg, 3, 32, 3)
    shared = first.get_layer("efficientnet_lite0")
    assert second.get_layer("efficientnet_lite0") is shared  # embed() then train() load the file once
    tuned = build_model(cfg.model_copy(update={"trainable": ["block6"]}), 2, 32, 3)
    assert tuned.get_layer("efficientnet_lite0") is not shared and tuned.get_layer("efficientnet_lite0").trainable_weights
    assert not shared.trainable_weights  # fine-tuning another model leaves the shared one frozen
    random = ModelConfig(architecture="mobilenet_v2", weights=None, trainable="none", input_size=32)
    backbones = [next(layer for layer in build_model(random, 2, 32, 3).layers if isinstance(layer, keras.Model))
                 for _ in range(2)]
    assert backbones[0] is not backbones[1]  # random init depends on the seed: never shared
    clear_backbone_cache()
    assert build_model(cfg, 2, 32, 3).get_layer("efficientnet_lite0") is not shared

    second.save(tmp_path / "m.keras")  # a model on a shared backbone saves and loads like any other
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(load_model(tmp_path / "m.keras").predict(x, verbose=0), second.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("mode", "reference"), [
    ("caffe", keras.applications.vgg19.preprocess_input),
    ("caffe", keras.applications.resnet50.preprocess_input),
    ("tf", keras.applications.inception_v3.preprocess_input),
    ("tf", keras.applications.mobilenet_v2.preprocess_input),
])
def test_preprocessing_matches_keras_applications(mode: str, reference: typing.Callable) -> None:
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(BackbonePreprocess(mode)(x)), reference(x.copy()), rtol=1e-5, atol=1e-4)


def test_saved_model_loads_with_safe_mode(tmp_path: Path) -> None:
    cfg = ModelConfig(architecture="vgg16", weights=None, trainable=["block5"], input_size=32, head_units=4)
    model = build_model(cfg, 2, 24, 1)  # grey input, resized 24 -> 32, caffe preprocessing layer
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    for name in ("features", "embedding", "probs", "preprocess", "to_rgb", "resize"):
        assert loaded.get_layer(name) is not None
    x = np.random.default_rng(2).uniform(0, 255, (3, 24, 24, 1)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- weights


def test_imagenet_missing_fails_fast_naming_file_and_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cfg = ModelConfig(architecture="vgg19", weights="imagenet", trainable="none", input_size=32)
    with pytest.raises(WeightsUnavailable) as err:
        build_model(cfg, 2, 32, 3)  # Keras is never asked for "imagenet" (it would try to download)
    message = str(err.value)
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras" / "models") in message and "weights:" in message


def test_imagenet_cache_file_is_used_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    cached.write_bytes(b"stand-in")
    cfg = ModelConfig(architecture="mobilenet_v2", weights="imagenet")
    assert resolve_weights(cfg, input_size=100) == str(cached.resolve())  # 100 px: Keras uses the 224 file
    assert imagenet_filename("mobilenet_v2", 128).endswith("_1.0_128_no_top.h5")
    with pytest.raises(WeightsUnavailable, match="_1.0_128_no_top.h5") as err:
        resolve_weights(cfg, input_size=128)
    # the download hint asks Keras for the 128 px file, not its default 224 px one
    assert "keras.applications.MobileNetV2(include_top=False, input_shape=(128, 128, 3))" in str(err.value)


def test_weights_file_sha256_checked(tmp_path: Path) -> None:
    assert LITE0.exists(), f"vendored backbone {LITE0} missing (shipped in the repository)"
    good = ModelConfig(architecture="keras_file", weights=str(LITE0), weights_sha256=LITE0_SHA)
    assert resolve_weights(good) == str(LITE0.resolve())
    with pytest.raises(WeightsMismatch, match="sha256"):
        resolve_weights(good.model_copy(update={"weights_sha256": "0" * 64}))
    missing = tmp_path / "nowhere" / "backbone.keras"
    with pytest.raises(WeightsUnavailable, match=str(missing)):
        resolve_weights(good.model_copy(update={"weights": str(missing)}))


@pytest.mark.parametrize("model,message", [
    ({"architecture": "basic_cnn", "weights": "imagenet"}, "basic_cnn trains from scratch: set weights: null"),
    ({"architecture": "keras_file"}, r"keras_file loads its network from a \.keras file: set weights: to its path"),
    ({"architecture": "keras_file", "weights": "imagenet"}, r"from a \.keras file"),
    ({"architecture": "vgg16", "weights": "backbone.keras"}, "goes with architecture: keras_file"),
])
def test_weights_that_cannot_apply_are_config_errors(model: dict, message: str) -> None:
    """Found when params.yaml is read, naming the model, before TensorFlow starts; a config built without
    validation (model_copy) is refused by resolve_weights with the same words."""
    with pytest.raises(ConfigError, match=rf"models\.bad: .*{message}"):
        parse_params({"models": {"bad": model}, "active_models": ["bad"]})
    unchecked = ModelConfig(architecture="vgg16").model_copy(update=model)
    with pytest.raises(ConfigError, match=message):
        resolve_weights(unchecked)


def test_trainable_matching_no_layer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="matches no layer"):
        build_model(ModelConfig(architecture="vgg16", trainable=["block9"], input_size=32), 2, 32, 3)


def test_basic_cnn_filters_and_convs_per_block() -> None:
    """``filters`` sets the blocks (pooling between them), ``convs_per_block`` the conv layers in each."""
    model = build_model(ModelConfig(architecture="basic_cnn", filters=[8, 16], convs_per_block=2, head_units=0),
                        3, 16, 1)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.name, c.filters) for c in convs] == [("block1_conv1", 8), ("block1_conv2", 8),
                                                    ("block2_conv1", 16), ("block2_conv2", 16)]
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)] == ["block1_pool"]
    assert model.get_layer("features").output.shape[1:] == (8, 8, 16) and model.output.shape[-1] == 3
    default = build_model(ModelConfig(architecture="basic_cnn"), 2, 16, 3)  # the malaria study's 32/64/128
    assert [layer.name for layer in default.layers if isinstance(layer, keras.layers.Conv2D)] == \
        ["block1_conv", "block2_conv", "block3_conv"]
