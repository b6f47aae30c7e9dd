"""Raw-file lookup, checksums and the IDX / CIFAR decoders, against hand-made files."""

import gzip
import os
import pickle
import shutil

import numpy as np
import pytest

from cnn.data import files
from tests.data import formats

MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


# ----------------------------------------------------------------------------------- IDX


def test_read_idx_decodes_header_and_payload(tmp_path, rng):
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    formats.write_idx_gz(path, images)
    np.testing.assert_array_equal(files.read_idx(path), images)
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(formats.idx_bytes(images))
    np.testing.assert_array_equal(files.read_idx(plain), images)
    # A hand-worked label file: magic 0x00000801, n = 3, then 3 bytes.
    labels = tmp_path / "l-idx1-ubyte"
    labels.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    np.testing.assert_array_equal(files.read_idx(labels), [7, 0, 9])


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))  # header says 5 labels, 2 present
    with pytest.raises(ValueError, match=r"short-idx1-ubyte.*\(5,\).*truncated"):
        files.read_idx(short)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        files.read_idx(foreign)
    cut_gz = tmp_path / "cut-idx1-ubyte.gz"
    cut_gz.write_bytes(gzip.compress(formats.idx_bytes(np.arange(200, dtype=np.uint8)))[:-12])
    with pytest.raises(ValueError, match=r"cut-idx1-ubyte.gz.*truncated or corrupted"):
        files.read_idx(cut_gz)


# ----------------------------------------------------------------------------------- lookup


def _fake_mnist_dir(directory, names=MNIST_FILES):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def test_locate_searches_the_documented_places_in_order(tmp_path):
    base = tmp_path / "data"
    manual = _fake_mnist_dir(base / "downloads" / "manual")
    assert files.locate("mnist", base).directory == manual
    preferred = _fake_mnist_dir(base / "mnist")
    assert files.locate("mnist", base).directory == preferred
    fashion = _fake_mnist_dir(base / "fashion-mnist")
    assert files.locate("fashion_mnist", base).directory == fashion
    # Decompressed files are accepted under the name without .gz.
    plain = _fake_mnist_dir(tmp_path / "plain" / "mnist", [n[:-3] for n in MNIST_FILES])
    located = files.locate("mnist", tmp_path / "plain")
    assert located.directory == plain and located.paths["test_labels"].name == "t10k-labels-idx1-ubyte"


def test_locate_uses_env_when_no_data_dir(tmp_path, monkeypatch):
    _fake_mnist_dir(tmp_path / "mnist")
    monkeypatch.setenv("CNN_DATA_DIR", str(tmp_path))
    assert files.locate("mnist").directory == tmp_path / "mnist"


def test_missing_file_message_names_the_file_and_every_place_searched(tmp_path):
    _fake_mnist_dir(tmp_path / "mnist", MNIST_FILES[:3])  # t10k labels missing
    with pytest.raises(FileNotFoundError) as error:
        files.locate("mnist", tmp_path)
    message = str(error.value)
    assert "missing t10k-labels-idx1-ubyte.gz" in message
    assert "train-images" not in message.split("Looked in")[0]  # only the missing file is named
    for place in files.candidate_dirs("mnist", tmp_path):
        assert str(place) in message
    assert str(tmp_path / "downloads" / "manual" / "mnist") in message and "CNN_DATA_DIR" in message


def test_nothing_found_message_lists_what_is_needed(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"cifar10: raw files not found; need .*data_batch_1.*cifar-10-python.tar.gz"
    ):
        files.locate("cifar10", tmp_path)
    with pytest.raises(ValueError, match="dataset='svhn'"):
        files.locate("svhn", tmp_path)


# ----------------------------------------------------------------------------------- checksums


@pytest.mark.shared_data
def test_real_files_pass_and_corrupted_copies_fail_the_checksum(shared_data_dir, tmp_path):
    raw = files.locate("mnist", shared_data_dir)
    files.verify_raw_checksums(raw)  # the original files match the published SHA-256
    copy = tmp_path / "mnist"
    copy.mkdir()
    for name in MNIST_FILES:
        os.symlink(shared_data_dir / "mnist" / name, copy / name)
    labels = copy / "train-labels-idx1-ubyte.gz"
    labels.unlink()
    blob = bytearray((shared_data_dir / "mnist" / "train-labels-idx1-ubyte.gz").read_bytes())
    blob[5000] ^= 0x01  # one flipped bit
    labels.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"checksum mismatch for .*train-labels-idx1-ubyte.gz.*3552534a0a55"):
        files.verify_raw_checksums(files.locate("mnist", tmp_path))
    labels.write_bytes(bytes(blob[:10000]))  # truncated
    with pytest.raises(ValueError, match="checksum mismatch.*truncated"):
        files.verify_raw_checksums(files.locate("mnist", tmp_path))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz.*truncated or corrupted"):
        files.read_idx(labels)  # without checksums, the decoder still refuses it


def test_file_digest_matches_hashlib_reference(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 5000)
    assert files.file_digest(path, "md5") == hashlib.md5(path.read_bytes()).hexdigest()
    assert files.file_digest(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------- CIFAR


def test_cifar_python_batch_roundtrips_the_original_pickle_layout(rng):
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5, 9]
    blob = formats.py2_pickle(
        {
            b"batch_label": b"training batch 1 of 5",
            b"labels": labels,
            b"data": formats.cifar_rows(images),
            b"filenames": [b"a.png"] * 6,
        }
    )
    decoded_images, decoded_labels = files.decode_cifar_python_batch(blob, "batch")
    np.testing.assert_array_equal(decoded_images, images)
    np.testing.assert_array_equal(decoded_labels, labels)
    # Hand-worked: a red first pixel is byte 0 of the row, a blue last pixel byte 3071.
    one = np.zeros((1, 32, 32, 3), np.uint8)
    one[0, 0, 0, 0], one[0, 31, 31, 2] = 200, 100
    rows = formats.cifar_rows(one)
    assert rows[0, 0] == 200 and rows[0, 3071] == 100 and rows.sum() == 300
    # A pickle written by Python 3 (str keys) decodes the same way.
    py3 = pickle.dumps({"data": rows, "labels": [7]}, protocol=4)
    np.testing.assert_array_equal(files.decode_cifar_python_batch(py3, "py3")[0], one)


def test_cifar_binary_batch_roundtrip_and_length_check(rng):
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rows = formats.cifar_rows(images)
    blob = b"".join(bytes([k]) + rows[k].tobytes() for k in range(4))
    decoded, labels = files.decode_cifar_binary_batch(blob, "bin")
    np.testing.assert_array_equal(decoded, images)
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    # CIFAR-100 records: coarse byte, fine byte, pixels; the fine label is returned.
    blob100 = b"".join(bytes([9, 40 + k]) + rows[k].tobytes() for k in range(4))
    np.testing.assert_array_equal(files.decode_cifar_binary_batch(blob100, "bin", label_bytes=2)[1], [40, 41, 42, 43])
    with pytest.raises(ValueError, match=r"bin: .*not a whole number of 3073-byte records.*truncated"):
        files.decode_cifar_binary_batch(blob[:-100], "bin")


def test_damaged_or_hostile_cifar_pickles_are_refused(rng):
    blob = formats.py2_pickle({b"labels": [1], b"data": rng.integers(0, 256, (1, 3072), dtype=np.uint8)})
    with pytest.raises(ValueError, match="cannot unpickle data_batch_3.*truncated or corrupted"):
        files.decode_cifar_python_batch(blob[: len(blob) // 2], "data_batch_3")

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(ValueError, match="refusing to load"):
        files.decode_cifar_python_batch(pickle.dumps({"data": Hostile()}), "evil")
    wrong_shape = formats.py2_pickle({b"labels": [1], b"data": np.zeros((1, 100), np.uint8)})
    with pytest.raises(ValueError, match=r"'data' must be uint8 \[n, 3072\]"):
        files.decode_cifar_python_batch(wrong_shape, "odd")


def test_cifar_checksum_is_checked_for_canonical_names(tmp_path, rng):
    batches = formats.random_cifar(rng, {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 2})
    formats.write_cifar10_python(tmp_path / "cifar-10-batches-py", batches)
    raw = files.locate("cifar10", tmp_path)
    assert raw.layout.kind == "cifar_python" and raw.directory == tmp_path / "cifar-10-batches-py"
    with pytest.raises(
        ValueError, match=r"checksum mismatch for .*data_batch_1 .*md5 .*c99cafc152244af753f735de768cd75f"
    ):
        files.verify_raw_checksums(raw)


def test_cifar_tar_members_and_missing_member(tmp_path, rng):
    batches = formats.random_cifar(rng, {f"data_batch_{i}": 1 for i in range(1, 6)} | {"test_batch": 3})
    folder = tmp_path / "src" / "cifar-10-batches-py"
    formats.write_cifar10_python(folder, batches)
    formats.write_tar_gz(tmp_path / "cifar-10-python.tar.gz", folder)
    raw = files.locate("cifar10", tmp_path)
    assert raw.layout.kind == "cifar_python_tar"
    images, labels = files.read_cifar_split(raw, "test")
    np.testing.assert_array_equal(images, batches["test_batch"][0])
    np.testing.assert_array_equal(labels, batches["test_batch"][1])
    assert files.read_cifar_label_names(raw)[0] == "airplane"
    (folder / "test_batch").unlink()
    formats.write_tar_gz(tmp_path / "cifar-10-python.tar.gz", folder)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python.tar.gz lacks the members \['test_batch'\]"):
        files.read_cifar_split(files.locate("cifar10", tmp_path), "test")
    shutil.rmtree(tmp_path / "src")
