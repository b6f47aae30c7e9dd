"""The offline TFDS builders: real MNIST / Fashion-MNIST files, CIFAR files written by the test."""

import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest

from cnn import data
from cnn.data import builders, files
from tests.data import formats

# Published facts (../shared/data/README.md, the Fashion-MNIST README, LeCun's MNIST page).
MNIST_TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# Widely quoted normalization constants (e.g. PyTorch examples: MNIST 0.1307 / 0.3081).
PUBLISHED_STATS = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}


def _decode_idx_independently(path):
    """gzip + fixed header sizes of the IDX spec (16 bytes for images, 8 for labels)."""
    raw = gzip.decompress(path.read_bytes())
    if raw[3] == 3:
        return np.frombuffer(raw[16:], np.uint8).reshape(-1, 28, 28)
    return np.frombuffer(raw[8:], np.uint8)


def _all_labels(source):
    return np.concatenate(
        [
            [r["label"] for r in source.__getitems__(list(range(lo, min(lo + 10000, len(source)))))]
            for lo in range(0, len(source), 10000)
        ]
    )


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_builders_have_the_documented_counts(name, real_builders, prepared_dir, shared_data_dir):
    builder = real_builders[name]
    assert builder.info.splits["train"].num_examples == 60000
    assert builder.info.splits["test"].num_examples == 10000
    train = data.get_source(name, "train", data_dir=shared_data_dir, prepared_dir=prepared_dir, try_tfds=False)
    test = data.get_source(name, "test", data_dir=shared_data_dir, prepared_dir=prepared_dir, try_tfds=False)
    assert (len(train), len(test)) == (60000, 10000)
    train_counts = np.bincount(_all_labels(train), minlength=10)
    test_counts = np.bincount(_all_labels(test), minlength=10)
    if name == "fashion_mnist":
        assert train_counts.tolist() == [6000] * 10 and test_counts.tolist() == [1000] * 10
    else:
        assert train_counts.tolist() == MNIST_TRAIN_HISTOGRAM and test_counts.tolist() == MNIST_TEST_HISTOGRAM


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_records_equal_the_original_files_in_order(name, real_builders, prepared_dir, shared_data_dir):
    folder = shared_data_dir / ("mnist" if name == "mnist" else "fashion-mnist")
    reference_images = _decode_idx_independently(folder / "t10k-images-idx3-ubyte.gz")
    reference_labels = _decode_idx_independently(folder / "t10k-labels-idx1-ubyte.gz")
    batches = data.load(
        name,
        "test",
        batch_size=1000,
        shuffle=False,
        num_epochs=1,
        data_dir=shared_data_dir,
        prepared_dir=prepared_dir,
        try_tfds=False,
    )
    first = next(batches)
    assert first["image"].dtype == np.uint8 and first["image"].shape == (1000, 28, 28, 1)
    assert first["label"].dtype == np.int32 and first["label"].shape == (1000,)
    np.testing.assert_array_equal(first["image"][..., 0], reference_images[:1000])
    np.testing.assert_array_equal(first["label"], reference_labels[:1000])
    train_images = _decode_idx_independently(folder / "train-images-idx3-ubyte.gz")
    source = data.get_source(name, "train", data_dir=shared_data_dir, prepared_dir=prepared_dir, try_tfds=False)
    for index in (0, 1, 31337, 59999):
        np.testing.assert_array_equal(source[index]["image"][..., 0], train_images[index])


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_normalization_statistics_are_computed_and_cached(name, real_builders, prepared_dir, shared_data_dir):
    folder = shared_data_dir / ("mnist" if name == "mnist" else "fashion-mnist")
    # Reference from the histogram of all 47 million pixel values.
    histogram = np.bincount(_decode_idx_independently(folder / "train-images-idx3-ubyte.gz").ravel(), minlength=256)
    values = np.arange(256) / 255
    mean = (histogram * values).sum() / histogram.sum()
    std = np.sqrt((histogram * (values - mean) ** 2).sum() / histogram.sum())
    meta = data.info(name, data_dir=shared_data_dir, prepared_dir=prepared_dir, try_tfds=False)
    assert meta.mean[0] == pytest.approx(mean, abs=1e-9)
    assert meta.std[0] == pytest.approx(std, abs=1e-9)
    assert meta.mean[0] == pytest.approx(PUBLISHED_STATS[name][0], abs=5e-5)
    assert meta.std[0] == pytest.approx(PUBLISHED_STATS[name][1], abs=5e-5)
    assert meta.num_classes == 10 and meta.image_shape == (28, 28, 1)
    assert meta.splits == {"train": 60000, "test": 10000}
    if name == "fashion_mnist":
        assert meta.class_names[0] == "T-shirt/top" and meta.class_names[9] == "Ankle boot"
    cache = json.loads((real_builders[name].data_path / "cnn_normalization.json").read_text())
    assert cache["mean"] == list(meta.mean)


@pytest.mark.shared_data
def test_prepared_data_is_reused_without_rereading_the_files(real_builders, prepared_dir, shared_data_dir):
    path = real_builders["mnist"].data_path / "cnn_mnist-train.array_record-00000-of-00001"
    before = os.stat(path).st_mtime_ns
    builders.prepare("mnist", data_dir=shared_data_dir, prepared_dir=prepared_dir)
    assert os.stat(path).st_mtime_ns == before


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.shared_data
def test_tfds_backed_iterator_resumes_exactly(real_builders, shared_data_dir, prepared_dir):
    options = dict(data_dir=shared_data_dir, prepared_dir=prepared_dir, try_tfds=False, seed=5)
    uninterrupted = _take(data.load("mnist", "train[:1000]", 128, **options), 12)  # 7 batches per epoch
    resumed = data.load("mnist", "train[:1000]", 128, **options)
    _take(resumed, 5)
    state = resumed.get_state()
    again = data.load("mnist", "train[:1000]", 128, **options)
    again.set_state(state)
    for expected, got in zip(uninterrupted[5:], _take(again, 7)):
        np.testing.assert_array_equal(expected["image"], got["image"])
        np.testing.assert_array_equal(expected["label"], got["label"])


def test_missing_and_corrupted_files_fail_preparation_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)mnist: raw files not found.*Looked in.*no TFDS-prepared copy"):
        data.load(
            "mnist", "train", 8, data_dir=tmp_path / "nowhere", prepared_dir=tmp_path / "p", tfds_data_dir=tmp_path
        )
    folder = tmp_path / "raw" / "mnist"
    folder.mkdir(parents=True)
    formats.write_idx_gz(folder / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    formats.write_idx_gz(folder / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    formats.write_idx_gz(folder / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "train", 2, data_dir=tmp_path / "raw", prepared_dir=tmp_path / "p", try_tfds=False)
    formats.write_idx_gz(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match=r"checksum mismatch for .*train-images-idx3-ubyte.gz"):
        data.load("mnist", "train", 2, data_dir=tmp_path / "raw", prepared_dir=tmp_path / "p", try_tfds=False)
    # Without checksums these small, well-formed files are accepted: the reader itself works.
    batch = next(
        data.load(
            "mnist",
            "train",
            3,
            data_dir=tmp_path / "raw",
            prepared_dir=tmp_path / "p",
            try_tfds=False,
            verify_checksums=False,
        )
    )
    assert batch["image"].shape == (3, 28, 28, 1)


def _cifar10_batches(rng, per_batch=3, test=4):
    return formats.random_cifar(rng, {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test})


def _expected_split(batches, split):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return np.concatenate([batches[n][0] for n in names]), np.concatenate([batches[n][1] for n in names])


@pytest.mark.parametrize("layout", ["python", "binary", "python_tar"])
def test_cifar10_builder_roundtrips_files_in_the_original_format(layout, tmp_path, rng):
    batches = _cifar10_batches(rng)
    raw_dir = tmp_path / "raw"
    if layout == "python":
        formats.write_cifar10_python(raw_dir / "cifar10" / "cifar-10-batches-py", batches)
    elif layout == "binary":
        formats.write_cifar10_binary(raw_dir / "cifar-10-batches-bin", batches)
    else:
        formats.write_cifar10_python(tmp_path / "src" / "cifar-10-batches-py", batches)
        raw_dir.mkdir()
        formats.write_tar_gz(raw_dir / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    options = dict(data_dir=raw_dir, prepared_dir=tmp_path / "prepared", try_tfds=False, verify_checksums=False)
    for split in ("train", "test"):
        images, labels = _expected_split(batches, split)
        batch = next(data.load("cifar10", split, len(labels), shuffle=False, **options))
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (len(labels), 32, 32, 3)
        np.testing.assert_array_equal(batch["image"], images)
        np.testing.assert_array_equal(batch["label"], labels)
    meta = data.info("cifar10", **options)
    assert meta.class_names == builders.CIFAR10_CLASSES and meta.splits == {"train": 15, "test": 4}
    train_images = _expected_split(batches, "train")[0] / 255.0
    np.testing.assert_allclose(meta.mean, train_images.mean(axis=(0, 1, 2)), atol=1e-12)
    np.testing.assert_allclose(meta.std, train_images.std(axis=(0, 1, 2)), atol=1e-12)


def test_changed_raw_files_are_prepared_again(tmp_path, rng):
    options = dict(
        data_dir=tmp_path / "raw", prepared_dir=tmp_path / "prepared", try_tfds=False, verify_checksums=False
    )
    first = _cifar10_batches(rng, per_batch=1, test=2)
    formats.write_cifar10_python(tmp_path / "raw" / "cifar-10-batches-py", first)
    np.testing.assert_array_equal(
        next(data.load("cifar10", "test", 2, shuffle=False, **options))["image"], first["test_batch"][0]
    )
    second = _cifar10_batches(rng, per_batch=1, test=3)
    formats.write_cifar10_python(tmp_path / "raw" / "cifar-10-batches-py", second)
    batch = next(data.load("cifar10", "test", 3, shuffle=False, **options))
    np.testing.assert_array_equal(batch["image"], second["test_batch"][0])
    # With the raw files gone, the prepared copy is still served.
    for path in (tmp_path / "raw" / "cifar-10-batches-py").iterdir():
        path.unlink()
    np.testing.assert_array_equal(
        next(data.load("cifar10", "test", 3, shuffle=False, **options))["label"], second["test_batch"][1]
    )


def test_cifar100_builder_reads_fine_labels_and_names_from_meta(tmp_path, rng):
    folder = tmp_path / "raw" / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"class_{k:02d}".encode() for k in range(100)]
    written = {}
    for split, n in (("train", 6), ("test", 4)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        written[split] = (images, fine)
        content = {
            b"filenames": [b"x.png"] * n,
            b"batch_label": split.encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": formats.cifar_rows(images),
        }
        (folder / split).write_bytes(formats.py2_pickle(content))
    (folder / "meta").write_bytes(
        formats.py2_pickle({b"fine_label_names": fine_names, b"coarse_label_names": [b"c"] * 20})
    )
    options = dict(
        data_dir=tmp_path / "raw", prepared_dir=tmp_path / "prepared", try_tfds=False, verify_checksums=False
    )
    batch = next(data.load("cifar100", "train", 6, shuffle=False, **options))
    np.testing.assert_array_equal(batch["image"], written["train"][0])
    np.testing.assert_array_equal(batch["label"], written["train"][1])
    meta = data.info("cifar100", **options)
    assert meta.num_classes == 100 and meta.class_names[7] == "class_07"


def test_a_standard_tfds_data_dir_is_read_with_tfds_data_source(tmp_path, rng):
    """A dataset prepared the TFDS way (its own `mnist` builder, PNG-encoded Image feature,
    array_record) is found in `tfds_data_dir` and read through `tfds.data_source`."""
    import PIL.Image
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)

    class TinyMnist(tfds_mnist.MNIST, skip_registration=True):
        name = "mnist"  # writes <tmp>/mnist/3.0.1, exactly where `tfds.builder("mnist")` looks
        code_path = builders.CnnMnist.code_path  # sidesteps TFDS's importlib_resources lookup

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for k in range(n):
                png = io.BytesIO()
                PIL.Image.fromarray(images[k]).save(png, format="PNG")  # TFDS encodes PNG with TF; do it here
                yield k, {"image": io.BytesIO(png.getvalue()), "label": k}

    TinyMnist(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    source = data.get_source("mnist", "train", tfds_data_dir=tmp_path / "tfds", data_dir=tmp_path / "none")
    assert "TFDS data_source" in source.description and len(source) == 5
    by_label = {int(r["label"]): r["image"] for r in source.__getitems__(range(5))}
    for k in range(5):
        assert by_label[k].dtype == np.uint8 and by_label[k].shape == (28, 28, 1)
        np.testing.assert_array_equal(by_label[k][..., 0], images[k])
    meta = data.info("mnist", tfds_data_dir=tmp_path / "tfds", prepared_dir=tmp_path / "p")
    assert meta.splits == {"train": 5, "test": 2} and meta.image_shape == (28, 28, 1)
    assert meta.mean[0] == pytest.approx(images.mean() / 255, abs=1e-12)
    assert meta.std[0] == pytest.approx(images.std() / 255, abs=1e-12)
    # try_tfds=False skips it and goes to the offline builder, which has no raw files here.
    with pytest.raises(FileNotFoundError, match="(?s)mnist: raw files not found.*not used: try_tfds=False"):
        data.get_source(
            "mnist",
            "train",
            tfds_data_dir=tmp_path / "tfds",
            data_dir=tmp_path / "none",
            prepared_dir=tmp_path / "p",
            try_tfds=False,
        )
    assert tfds.builder("mnist", data_dir=str(tmp_path / "tfds")).info.splits["train"].num_examples == 5


def test_offline_builder_is_a_registered_tfds_builder(tmp_path, rng):
    import tensorflow_datasets as tfds

    formats.write_cifar10_binary(tmp_path / "raw" / "cifar-10-batches-bin", _cifar10_batches(rng, 1, 1))
    builders.prepare("cifar10", data_dir=tmp_path / "raw", prepared_dir=tmp_path / "prepared", verify_checksums=False)
    reopened = tfds.builder("cnn_cifar10", data_dir=str(tmp_path / "prepared"))
    assert reopened.info.splits["test"].num_examples == 1
    assert reopened.as_data_source("train")[0]["image"].shape == (32, 32, 3)
    assert files.LAYOUTS["cifar10"][2].kind == "cifar_binary"


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_in_memory_source_equals_the_tfds_records(name, real_builders, prepared_dir, shared_data_dir):
    """`in_memory=True` reads the raw files into RAM without TFDS: same examples, same order."""
    arrays = data.get_source(name, "test", data_dir=shared_data_dir, in_memory=True)
    assert arrays["image"].shape == (10_000, 28, 28, 1) and arrays["image"].dtype == np.uint8
    assert arrays["label"].dtype == np.int32
    records = data.get_source(name, "test", data_dir=shared_data_dir, prepared_dir=prepared_dir, try_tfds=False)
    for index in (0, 1, 4321, 9999):
        np.testing.assert_array_equal(arrays["image"][index], records[index]["image"])
        assert arrays["label"][index] == records[index]["label"]
    kwargs = dict(data_dir=shared_data_dir, seed=3, batch_size=64)
    from_memory = next(data.load(name, "train[:1000]", in_memory=True, **kwargs))
    from_tfds = next(data.load(name, "train[:1000]", prepared_dir=prepared_dir, try_tfds=False, **kwargs))
    np.testing.assert_array_equal(from_memory["image"], from_tfds["image"])
    np.testing.assert_array_equal(from_memory["label"], from_tfds["label"])


def _write_small_mnist(folder, rng, shift=0):
    """Four small IDX files; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": ((np.arange(5) + shift) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.array([7, 1, 4], np.uint8),
    }
    for name, array in arrays.items():
        formats.write_idx_gz(folder / name, array)
    return arrays


def _tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_corrupted_raw_file_leaves_the_prepared_dataset_intact(tmp_path, rng, monkeypatch):
    """The issue's probe: a raw IDX file corrupted after preparation used to delete the good
    prepared copy before its checksum failed."""
    raw = tmp_path / "raw" / "mnist"
    written = _write_small_mnist(raw, rng)
    # These small files are "the originals": their SHA-256, computed here, are the published ones.
    published = {name: ("sha256", hashlib.sha256((raw / name).read_bytes()).hexdigest()) for name in written}
    monkeypatch.setitem(files.KNOWN_CHECKSUMS, "mnist", published)
    options = dict(data_dir=tmp_path / "raw", prepared_dir=tmp_path / "prepared", try_tfds=False)
    first = next(data.load("mnist", "train", 5, shuffle=False, **options))
    np.testing.assert_array_equal(first["image"][..., 0], written["train-images-idx3-ubyte.gz"])
    builder = builders.prepare("mnist", data_dir=tmp_path / "raw", prepared_dir=tmp_path / "prepared")
    prepared = pathlib.Path(builder.data_path)
    good = _tree_bytes(prepared)
    assert any(name.startswith("cnn_mnist-train.array_record") for name in good)

    # Another image file (same size, a new modification time): the checksum fails before anything is touched.
    formats.write_idx_gz(raw / "train-images-idx3-ubyte.gz", 255 - written["train-images-idx3-ubyte.gz"])
    with pytest.raises(ValueError, match=r"checksum mismatch for .*train-images-idx3-ubyte.gz[\s\S]*previously "
                                         rf"prepared copy at {re.escape(str(prepared))} was left as it was"):
        data.load("mnist", "train", 5, shuffle=False, **options)
    assert _tree_bytes(prepared) == good

    # A truncated file with checksums off: preparing fails while decoding; the old copy is put back.
    (raw / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(formats.idx_bytes(written["train-images-idx3-ubyte.gz"])[:-100]))
    with pytest.raises(ValueError, match=r"truncated or corrupted[\s\S]*was left as it was"):
        builders.prepare("mnist", data_dir=tmp_path / "raw", prepared_dir=tmp_path / "prepared",
                         verify_checksums=False)
    assert _tree_bytes(prepared) == good
    assert not list((tmp_path / "prepared" / ".previous").iterdir())

    # With the damaged raw files gone, the intact prepared copy is served.
    shutil.rmtree(raw)
    again = next(data.load("mnist", "train", 5, shuffle=False, **options))
    np.testing.assert_array_equal(again["image"], first["image"])
    np.testing.assert_array_equal(again["label"], written["train-labels-idx1-ubyte.gz"])


def test_a_rebuild_from_good_new_raw_files_replaces_the_prepared_copy(tmp_path, rng):
    options = dict(data_dir=tmp_path / "raw", prepared_dir=tmp_path / "prepared", try_tfds=False,
                   verify_checksums=False)
    _write_small_mnist(tmp_path / "raw" / "mnist", rng)
    next(data.load("mnist", "test", 3, shuffle=False, **options))
    newer = _write_small_mnist(tmp_path / "raw" / "mnist", rng, shift=3)
    batch = next(data.load("mnist", "train", 5, shuffle=False, **options))
    np.testing.assert_array_equal(batch["label"], newer["train-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(batch["image"][..., 0], newer["train-images-idx3-ubyte.gz"])
    assert not list((tmp_path / "prepared" / ".previous").iterdir())  # the old copy was removed
