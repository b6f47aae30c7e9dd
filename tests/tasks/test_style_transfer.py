"""Gatys style transfer: Gram matrices, the three loss terms, optimization, weights, the experiment."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cnn.models
from cnn.models import convert
from cnn.tasks import style_transfer as st
from cnn.train.checkpoint import Checkpointer
from cnn.train.state import TrainState, to_host

# The tiny experiment's setting (shared shapes keep the compiled steps in jax's caches).
SIZE = 32
CONTENT_LAYER = "conv3_1"
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1")


@pytest.fixture(scope="module")
def extractor():
    return st.vgg_extractor(depth=11, seed=0)


@pytest.fixture(scope="module")
def images():
    return st.example_image("chelsea", SIZE), st.example_image("hubble_deep_field", SIZE)


@pytest.fixture(scope="module")
def objective(extractor, images):
    content, style = images
    return st.StyleObjective.create(
        extractor, content, style, content_layer=CONTENT_LAYER, style_layers=STYLE_LAYERS, alpha=0.2
    )


def test_gram_matrix_is_ft_f_over_positions(rng):
    features = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    expected = np.zeros((2, 3, 3))
    for b in range(2):
        matrix = features[b].reshape(5 * 6, 3)  # F: [positions, channels]
        for i in range(3):
            for j in range(3):
                expected[b, i, j] = sum(matrix[p, i] * matrix[p, j] for p in range(30)) / 30
    np.testing.assert_allclose(np.asarray(st.gram_matrix(jnp.asarray(features))), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="features must be"):
        st.gram_matrix(jnp.zeros((5, 6, 3)))


def test_loss_terms_against_numpy(rng):
    x, c = rng.standard_normal((2, 1, 4, 5, 3)).astype(np.float32)
    assert np.isclose(float(st.content_loss(jnp.asarray(x), jnp.asarray(c))), np.sum((x - c) ** 2) / x.size, rtol=1e-5)
    grams = {"a": rng.standard_normal((1, 3, 3)), "b": rng.standard_normal((1, 4, 4))}
    targets = {"a": rng.standard_normal((1, 3, 3)), "b": rng.standard_normal((1, 4, 4))}
    weights = {"a": 0.3, "b": 2.0}
    expected = 0.3 * np.sum((grams["a"] - targets["a"]) ** 2) / 9 + 2.0 * np.sum((grams["b"] - targets["b"]) ** 2) / 16
    assert np.isclose(float(st.style_loss(grams, targets, weights)), expected, rtol=1e-5)
    image = rng.uniform(size=(1, 4, 5, 3))
    vertical = np.sum((image[:, 1:] - image[:, :-1]) ** 2) / (3 * 5 * 3)  # 3 x 5 pairs per channel
    horizontal = np.sum((image[:, :, 1:] - image[:, :, :-1]) ** 2) / (4 * 4 * 3)
    tv = vertical + horizontal
    assert np.isclose(float(st.total_variation(jnp.asarray(image))), tv, rtol=1e-5)


def test_content_loss_is_zero_at_the_content_image(objective, images):
    terms = objective.terms(jnp.asarray(images[0]))
    assert float(terms["content"]) == 0.0
    assert float(terms["style"]) > 0.0
    np.testing.assert_allclose(float(terms["total"]), float(terms["content"] + 0.2 * terms["style"]), rtol=1e-6)


def test_style_loss_is_zero_at_the_style_image(extractor, images):
    _, style = images
    objective = st.StyleObjective.create(extractor, style, style, content_layer=CONTENT_LAYER, style_layers=STYLE_LAYERS)
    assert float(objective.terms(jnp.asarray(style))["style"]) == 0.0
    shifted = objective.terms(jnp.asarray(np.roll(style, 7, axis=1)))  # other pixels, similar statistics
    assert float(shifted["style"]) > 0.0


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_content_and_style_losses_decrease(objective, images, optimizer):
    initial = st.initial_image(*images, "noise", seed=0)
    result = st.stylize(objective, initial, optimizer=optimizer, steps=5, learning_rate=0.05, progress=False)
    history = result.history
    assert len(history["total"]) == 6
    assert history["content"][-1] < 0.5 * history["content"][0]
    assert history["style"][-1] < history["style"][0]
    assert history["total"][-1] < history["total"][0]
    if optimizer == "lbfgs":  # the line search only accepts decreasing steps
        assert np.all(np.diff(history["total"]) <= 1e-7)
    assert result.image.shape == images[0].shape and 0.0 <= result.image.min() <= result.image.max() <= 1.0


def test_bad_settings_name_the_argument(extractor, images):
    content, style = images
    with pytest.raises(ValueError, match="conv9_1"):
        st.StyleObjective.create(extractor, content, style, content_layer="conv9_1")
    with pytest.raises(ValueError, match="style_layer_weights"):
        st.StyleObjective.create(extractor, content, style, style_layers=("conv1_1",), style_layer_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="style_image"):
        st.StyleObjective.create(extractor, content, style[..., :1], content_layer=CONTENT_LAYER, style_layers=STYLE_LAYERS)
    objective = st.StyleObjective.create(extractor, content, style, content_layer=CONTENT_LAYER, style_layers=STYLE_LAYERS)
    with pytest.raises(ValueError, match="initial has shape"):
        st.stylize(objective, style, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        st.stylize(objective, content, steps=0, progress=False)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        st.make_step("sgd")
    with pytest.raises(ValueError, match="init='zeros'"):
        st.initial_image(content, style, "zeros")
    with pytest.raises(ValueError, match="name='lena'"):
        st.example_image("lena")


def test_example_images_are_bundled_rgb():
    image = st.example_image("coffee", 40)
    assert image.dtype == np.float32 and image.shape == (40, 60, 3)
    assert 0.0 <= image.min() < image.max() <= 1.0


def _vgg11_variables(num_classes=2, channels=3):
    model = cnn.models.create("vgg11", num_classes=num_classes, classifier_width=4)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, channels)), train=False))
    generator = np.random.default_rng(0)
    return model, jax.tree_util.tree_map(lambda s: (0.05 * generator.standard_normal(s.shape)).astype(np.float32), shapes)


def test_extractor_from_a_torchvision_layout_file(tmp_path, extractor):
    _, variables = _vgg11_variables()
    path = tmp_path / "vgg11.npz"
    np.savez(path, **convert.to_torchvision("vgg11", variables, classifier_width=4))
    loaded = st.vgg_extractor(path, depth=11, pooling="max")
    assert loaded.pretrained and loaded.warning is None and "vgg11.npz" in loaded.source
    assert extractor.warning is not None and "pretrained" in extractor.warning
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(1, 32, 32, 3)), jnp.float32)
    normalized = (images - jnp.asarray(st.IMAGENET_MEAN)) / jnp.asarray(st.IMAGENET_STD)
    trunk = cnn.models.vgg.VGGFeatures(depth=11)
    reference = trunk.apply({"params": variables["params"]["features"]}, normalized, train=False, outputs=("conv2_1",))
    maps = loaded(images, ("conv2_1",))["conv2_1"]
    np.testing.assert_allclose(np.asarray(maps), np.asarray(reference["conv2_1"]), rtol=1e-5, atol=1e-6)


def test_extractor_from_a_project_run_with_a_grayscale_first_layer(tmp_path):
    """A VGG trained by the engine on 1-channel images: conv1_1 is repeated over RGB / 3, so a gray
    RGB image gives the features the run's model gives the 1-channel image."""
    _, variables = _vgg11_variables(channels=1)
    model = cnn.models.create("vgg11", num_classes=2, classifier_width=4)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1), batch_stats={},
                              rng=jax.random.key_data(jax.random.key(0)))
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    checkpointer.save(1, to_host(state))
    checkpointer.close()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "vgg11", "model_options": {"classifier_width": 4}}))
    loaded = st.vgg_extractor(f"run:{tmp_path / 'run'}", pooling="max")
    assert not loaded.pretrained and "trained by the project" in loaded.source and loaded.module.depth == 11
    gray = np.random.default_rng(2).uniform(size=(1, 32, 32, 1)).astype(np.float32)
    trunk = cnn.models.vgg.VGGFeatures(depth=11)
    reference = trunk.apply({"params": variables["params"]["features"]}, jnp.asarray(gray), train=False, outputs=("conv2_1",))
    maps = loaded(jnp.asarray(np.repeat(gray, 3, axis=-1)), ("conv2_1",))
    np.testing.assert_allclose(np.asarray(maps["conv2_1"]), np.asarray(reference["conv2_1"]), rtol=1e-4, atol=1e-6)
    with pytest.raises(FileNotFoundError):
        st.vgg_extractor(f"run:{tmp_path / 'missing'}")


def test_style_transfer_experiment_tiny_end_to_end(tmp_path, capsys):
    import experiments.style_transfer as experiment
    from experiments.configs import style_transfer as configs

    results = experiment.main(configs.get_tiny_config(), tmp_path)
    printed = capsys.readouterr().out
    assert "not have ImageNet-pretrained weights" in printed  # says clearly that results need them
    for name in ("content.png", "style.png", "panel.png", "results.md", "results.json",
                 "stylized_lbfgs.png", "stylized_adam.png", "loss_lbfgs.png", "loss_adam.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for optimizer, run in results["runs"].items():
        assert run["final"]["total"] < run["initial"]["total"], optimizer
        assert run["final"]["content"] < run["initial"]["content"], optimizer
    assert "pretrained" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_style_transfer_default_config(tmp_path):
    """The default run (random VGG-19, 192 px, 100 L-BFGS and 100 Adam steps); several minutes on a CPU."""
    import experiments.style_transfer as experiment
    from experiments.configs import style_transfer as configs

    config = configs.get_config()
    config.progress = False
    results = experiment.main(config, tmp_path)
    for run in results["runs"].values():
        assert run["final"]["total"] < 0.5 * run["initial"]["total"]
