"""`load` / `info` / `normalize`: the embedded datasets, splits, determinism, resume, sharding."""

import gzip
import json

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from cnn import data
from cnn.data import embedded


def test_unknown_names_and_splits_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"name='imagenet'.*'digits'.*'mnist'"):
        data.load("imagenet", "train", 8)
    with pytest.raises(ValueError, match=r"split='validation'.*\['train', 'test'\]"):
        data.load("digits", "validation", 8)
    with pytest.raises(ValueError, match=r"split='train\[:x\]'"):
        data.load("digits", "train[:x]", 8)
    with pytest.raises(ValueError, match="name='digitz'"):
        data.info("digitz")
    assert {"digits", "fashion_mnist_small", "shapes", "mnist", "fashion_mnist", "cifar10"} <= set(data.available())


def test_digits_split_is_stratified_and_scaled_to_uint8():
    reference = load_digits()
    train, test = data.get_source("digits", "train"), data.get_source("digits", "test")
    assert (len(train["label"]), len(test["label"])) == (1438, 359)
    counts = np.bincount(reference.target)
    np.testing.assert_array_equal(np.bincount(test["label"]), np.floor(0.2 * counts + 0.5).astype(int))
    np.testing.assert_array_equal(np.bincount(train["label"]) + np.bincount(test["label"]), counts)
    indices = embedded.stratified_split(reference.target, 0.2, 0)
    assert not set(indices["train"]) & set(indices["test"])
    # round(v * 255 / 16), half up, computed here in floating point.
    expected = np.floor(reference.images[indices["test"]] * 255 / 16 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(test["image"][..., 0], expected)
    np.testing.assert_array_equal(test["label"], reference.target[indices["test"]])
    assert train["image"].dtype == np.uint8 and train["image"].shape == (1438, 8, 8, 1)
    assert train["label"].dtype == np.int32 and train["image"].max() == 255


def test_info_of_embedded_datasets():
    meta = data.info("digits")
    assert meta.num_classes == 10 and meta.image_shape == (8, 8, 1) and meta.splits == {"train": 1438, "test": 359}
    pixels = data.get_source("digits", "train")["image"] / 255.0
    assert meta.mean[0] == pytest.approx(pixels.mean(), abs=1e-12)
    assert meta.std[0] == pytest.approx(pixels.std(), abs=1e-12)
    small = data.info("fashion_mnist_small")
    assert small.splits == {"train": 5000, "test": 1000} and small.class_names[9] == "Ankle boot"
    shapes = data.info("shapes")
    assert shapes.class_names == ("circle", "square", "triangle") and shapes.image_shape == (32, 32, 3)


def test_fashion_mnist_small_is_balanced_and_verified():
    train = data.get_source("fashion_mnist_small", "train")
    test = data.get_source("fashion_mnist_small", "test")
    assert np.bincount(train["label"]).tolist() == [500] * 10
    assert np.bincount(test["label"]).tolist() == [100] * 10
    assert train["image"].shape == (5000, 28, 28, 1) and train["image"].dtype == np.uint8


@pytest.mark.shared_data
def test_fashion_mnist_small_is_the_documented_subset_of_the_real_files(shared_data_dir):
    for prefix, split, per_class in (("train", "train", 500), ("t10k", "test", 100)):
        raw_images = gzip.decompress(
            (shared_data_dir / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz").read_bytes()
        )
        raw_labels = gzip.decompress(
            (shared_data_dir / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()
        )
        images = np.frombuffer(raw_images[16:], np.uint8).reshape(-1, 28, 28)
        labels = np.frombuffer(raw_labels[8:], np.uint8)
        keep, seen = [], [0] * 10
        for index, label in enumerate(labels):  # the first `per_class` of each class, in file order
            if seen[label] < per_class:
                keep.append(index)
                seen[label] += 1
        subset = data.get_source("fashion_mnist_small", split)
        np.testing.assert_array_equal(subset["image"][..., 0], images[keep])
        np.testing.assert_array_equal(subset["label"], labels[keep])


def test_split_slicing_follows_python_and_percent_rules():
    train = data.get_source("digits", "train")
    head = data.get_source("digits", "train[:100]")
    np.testing.assert_array_equal(head["image"], train["image"][:100])
    tail = data.get_source("digits", "train[-38:]")
    np.testing.assert_array_equal(tail["label"], train["label"][-38:])
    # 10% of 1438 = 143.8 -> 144 examples.
    assert len(data.get_source("digits", "train[90%:]")["label"]) == 1438 - 1294
    assert len(data.get_source("digits", "train[:10%]")["label"]) == 144
    from cnn.data.datasets import slice_bounds

    assert slice_bounds("train[5:-5]", 20) == (5, 15)
    assert slice_bounds("test[25%:75%]", 10) == (3, 8)  # 2.5 -> 3, 7.5 -> 8


def test_normalize_matches_the_formula_for_numpy_and_jax(rng):
    images = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    expected = np.empty(images.shape)
    for c in range(3):
        expected[..., c] = (images[..., c] / 255.0 - mean[c]) / std[c]
    out = data.normalize(images, mean, std)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    out_jax = data.normalize(jnp.asarray(images), mean, std)
    assert not isinstance(out_jax, np.ndarray) and out_jax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_jax), expected, rtol=1e-6)
    floats = images / 255.0  # float input is taken as 0..1 already
    np.testing.assert_allclose(data.normalize(floats, mean, std), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"one entry per channel \(3\)"):
        data.normalize(images, (0.5,), (0.5,))
    meta = data.info("digits")
    digits = data.get_source("digits", "train")["image"]
    normalized = meta.normalize(digits)
    assert abs(normalized.mean()) < 1e-5 and normalized.std() == pytest.approx(1.0, abs=1e-5)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_same_seed_same_order_and_different_seeds_differ():
    first = _take(data.load("digits", "train", 64, seed=3), 30)  # crosses the 22-batch epoch boundary
    second = _take(data.load("digits", "train", 64, seed=3), 30)
    other = _take(data.load("digits", "train", 64, seed=4), 30)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
    # Epochs are reshuffled: epoch 1 does not repeat epoch 0's order.
    assert not np.array_equal(first[0]["image"], first[22]["image"])


def test_one_epoch_visits_every_example_once():
    batches = list(data.load("digits", "test", 50, seed=1, drop_remainder=False, num_epochs=1))
    assert [len(b["label"]) for b in batches] == [50] * 7 + [9]
    images = np.concatenate([b["image"] for b in batches]).reshape(359, -1)
    reference = data.get_source("digits", "test")["image"].reshape(359, -1)
    assert sorted(map(bytes, images)) == sorted(map(bytes, reference))


def test_resume_from_a_saved_position_continues_exactly():
    uninterrupted = _take(data.load("digits", "train", 100, seed=7), 40)
    interrupted = data.load("digits", "train", 100, seed=7)
    _take(interrupted, 17)
    state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint would store it
    resumed = data.load("digits", "train", 100, seed=7)
    resumed.set_state(state)
    for expected, got in zip(uninterrupted[17:], _take(resumed, 23)):  # crosses epochs 1 -> 2 -> 3
        np.testing.assert_array_equal(expected["image"], got["image"])
        np.testing.assert_array_equal(expected["label"], got["label"])
    with pytest.raises(ValueError, match="seed=7"):
        data.load("digits", "train", 100, seed=8).set_state(state)


def test_shards_concatenate_to_the_global_batch():
    whole = _take(data.load("digits", "train", 96, seed=2), 5)
    shards = [_take(data.load("digits", "train", 96, seed=2, shard_index=i, num_shards=4), 5) for i in range(4)]
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([s[step]["image"] for s in shards]), whole[step]["image"])


def test_transform_and_shapes_batches():
    iterator = data.load("digits", "test", 16, transform=lambda b: {**b, "image": b["image"] / 255.0})
    assert next(iterator)["image"].dtype == np.float64
    batch = next(data.load("shapes", "train", 8))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["mask"].shape == (8, 32, 32)
    assert batch["boxes"].shape == (8, 3, 4) and batch["box_valid"].dtype == bool
