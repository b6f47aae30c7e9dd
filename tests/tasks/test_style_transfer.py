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
CONTENT_LAYER = "relu3_1"
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1")


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


def test_default_layers_are_the_papers_rectified_maps(extractor, images):
    """Gatys et al.'s conv4_2 / conv1_1..conv5_1 are Caffe blobs after the in-place ReLU."""
    assert st.CONTENT_LAYER == "relu4_2"
    assert st.STYLE_LAYERS == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    x = jnp.asarray(images[0])[None]
    maps = extractor(x, ("conv2_1", "relu2_1", "conv3_1", "relu3_1"))
    for block in (2, 3):
        np.testing.assert_array_equal(np.asarray(maps[f"relu{block}_1"]), np.maximum(np.asarray(maps[f"conv{block}_1"]), 0))
        assert float(jnp.min(maps[f"conv{block}_1"])) < 0  # the pre-activation map is not what is matched
    objective = st.StyleObjective.create(extractor, *images, style_layers=("relu1_1",))
    assert objective.content_layer == "relu4_2"


def test_gram_loss_of_a_hand_made_feature_map():
    """F (2x2 positions, 2 channels): channel 0 = (1, 0, 1, 2), channel 1 = (0, 1, 1, 0) over the
    positions. Unnormalized Gram F^T F = [[6, 1], [1, 2]]; the code's G = F^T F / M, M = 4; against
    A = 0 the code's style loss is mean((G - A)^2) = (1.5^2 + 2 * 0.25^2 + 0.5^2) / 4 = 0.65625,
    which is 4 E with Gatys' E = sum((F^T F)^2) / (4 N^2 M^2) = 42 / 256."""
    features = np.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.0]]], np.float32)[None]
    gram = st.gram_matrix(jnp.asarray(features))
    np.testing.assert_allclose(np.asarray(gram)[0], [[1.5, 0.25], [0.25, 0.5]])
    loss = float(st.style_loss({"l": gram}, {"l": jnp.zeros((1, 2, 2))}, {"l": 1.0}))
    assert loss == pytest.approx(0.65625)
    paper_e = 42 / (4 * 2**2 * 4**2)
    assert loss == pytest.approx(4 * paper_e)


def test_content_style_ratio_is_the_papers_alpha_over_beta(extractor, images):
    """With content_style_ratio r the total loss is (2 / (N_c M_c r)) (r L_content + L_style) in
    the paper's own sums: L_content = 1/2 sum (F - P)^2, L_style = sum_l w_l sum (G - A)^2 /
    (4 N_l^2 M_l^2) with unnormalized Grams (the style image's scaled to the image's M_l: the
    images differ in size here)."""
    content, style = images
    ratio = 1e-3
    objective = st.StyleObjective.create(extractor, content, style, content_layer=CONTENT_LAYER,
                                         style_layers=STYLE_LAYERS, content_style_ratio=ratio)
    image = st.initial_image(content, style, "noise", seed=3)
    maps = {k: np.asarray(v, np.float64)[0] for k, v in extractor(jnp.asarray(image)[None], (CONTENT_LAYER, *STYLE_LAYERS)).items()}
    content_maps = np.asarray(extractor(jnp.asarray(content)[None], (CONTENT_LAYER,))[CONTENT_LAYER], np.float64)[0]
    style_maps = {k: np.asarray(v, np.float64)[0] for k, v in extractor(jnp.asarray(style)[None], STYLE_LAYERS).items()}
    l_content = 0.5 * np.sum((maps[CONTENT_LAYER] - content_maps) ** 2)
    l_style = 0.0
    for name in STYLE_LAYERS:
        f = maps[name].reshape(-1, maps[name].shape[-1])
        a = style_maps[name].reshape(-1, style_maps[name].shape[-1])
        n, m = f.shape[1], f.shape[0]
        # the style image has other positions: its Gram per position, times the image's M
        a_gram = a.T @ a * m / a.shape[0]
        l_style += (1 / 3) * np.sum((f.T @ f - a_gram) ** 2) / (4 * n**2 * m**2)
    entries = content_maps.size  # N_c M_c
    expected = 2 / (entries * ratio) * (ratio * l_content + l_style)
    assert float(objective.loss(jnp.asarray(image))) == pytest.approx(expected, rel=1e-4)
    assert float(objective.alpha) == pytest.approx(st.alpha_for_content_style_ratio(ratio, content_maps.shape))
    with pytest.raises(ValueError, match="give one"):
        st.StyleObjective.create(extractor, content, style, alpha=1.0, content_style_ratio=ratio)


def test_rescaling_gives_every_filter_mean_activation_one(extractor, images):
    """The paper's normalization: mean rectified activation 1 per filter over the image set; every
    map is the original divided per channel by its mean (the next layer compensates; ReLU and
    pooling are homogeneous), so the network computes the same thing."""
    image_set = jnp.asarray(np.stack([images[0], st.resize_image(images[1], images[0].shape[:2])]))
    rescaled = st.rescale_to_unit_mean_activation(extractor, image_set)
    assert "rescaled" in rescaled.source
    layers = tuple(name for name in cnn.models.vgg.vgg_layer_names(11) if name.startswith("relu"))
    new, old = rescaled(image_set, layers), extractor(image_set, layers)
    for name in layers:
        mean = np.asarray(new[name], np.float64).mean(axis=(0, 1, 2))
        alive = np.asarray(old[name]).mean(axis=(0, 1, 2)) > 0
        assert alive.sum() > 0
        np.testing.assert_allclose(mean[alive], 1.0, rtol=1e-3, err_msg=name)
        reference = np.asarray(old[name], np.float64)
        divisor = np.where(alive, reference.mean(axis=(0, 1, 2)), 1.0)
        scale = float(np.max(np.abs(np.asarray(new[name]))))
        np.testing.assert_allclose(np.asarray(new[name]) / scale, reference / divisor / scale, atol=1e-3, err_msg=name)
    first = np.asarray(old["relu1_1"], np.float64)
    # the input extractor is untouched
    np.testing.assert_allclose(np.asarray(extractor(image_set, ("relu1_1",))["relu1_1"]), first, rtol=1e-6)


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
    with pytest.raises(ValueError, match="relu9_1"):
        st.StyleObjective.create(extractor, content, style, content_layer="relu9_1")
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
