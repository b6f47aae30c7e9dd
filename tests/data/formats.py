"""Writers of the original dataset file formats, written independently of `cnn.data.files`.

The CIFAR python batches were written by Python 2's cPickle (protocol 2): keys and strings are
py2 `str` (SHORT_BINSTRING / BINSTRING opcodes, loaded as `bytes` by Python 3 with
`encoding="bytes"`), `data` is a numpy uint8 array pickled through
`numpy.core.multiarray._reconstruct`, `labels` a list of ints. `py2_pickle` emits exactly those
opcodes, so the reader is tested on the byte layout of the real files.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import struct
import tarfile

import numpy as np

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 00 00 08 ndim, big-endian uint32 sizes, data."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_gz(path: pathlib.Path, array: np.ndarray) -> None:
    path.write_bytes(gzip.compress(idx_bytes(array)))


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(v: int) -> bytes:
    return (b"K" + bytes([v])) if 0 <= v < 256 else (b"J" + struct.pack("<i", v))


def _py2_uint8_array(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, np.uint8)
    new = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + _py2_int(0)
        + b"\x85"
        + _py2_str(b"b")
        + b"\x87R"
    )
    shape = b"(" + b"".join(_py2_int(d) for d in a.shape) + b"t"
    dtype = (
        b"cnumpy\ndtype\n"
        + _py2_str(b"u1")
        + _py2_int(0)
        + _py2_int(1)
        + b"\x87R"
        + b"("
        + _py2_int(3)
        + _py2_str(b"|")
        + b"NNN"
        + b"J\xff\xff\xff\xff" * 2
        + _py2_int(0)
        + b"tb"
    )
    return new + b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(a.tobytes()) + b"tb"


def py2_pickle(content: dict[bytes, object]) -> bytes:
    """A protocol-2 pickle of a dict as Python 2's cPickle writes it (bytes = py2 str)."""
    body = b""
    for key, value in content.items():
        body += _py2_str(key)
        if isinstance(value, bytes):
            body += _py2_str(value)
        elif isinstance(value, np.ndarray):
            body += _py2_uint8_array(value)
        elif isinstance(value, int):
            body += _py2_int(value)
        else:  # list of ints or of py2 strings
            body += b"](" + b"".join(_py2_str(x) if isinstance(x, bytes) else _py2_int(x) for x in value) + b"e"
    return b"\x80\x02}(" + body + b"u."


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """[n, 32, 32, 3] -> [n, 3072] rows: the red plane, then green, then blue, each row-major."""
    rows = np.zeros((len(images), 3072), np.uint8)
    for n, image in enumerate(images):
        for c in range(3):
            for i in range(32):
                for j in range(32):
                    rows[n, c * 1024 + i * 32 + j] = image[i, j, c]
    return rows


def random_cifar(rng: np.random.Generator, sizes: dict[str, int], num_classes: int = 10):
    """Random images and labels per batch name."""
    return {
        name: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, n))
        for name, n in sizes.items()
    }


def write_cifar10_python(directory: pathlib.Path, batches, *, with_meta: bool = True) -> None:
    """`data_batch_1..5`, `test_batch` (and `batches.meta`) as in cifar-10-batches-py."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        content = {
            b"batch_label": f"{name} of the test suite".encode(),
            b"labels": [int(v) for v in labels],
            b"data": cifar_rows(images),
            b"filenames": [f"image_{k}.png".encode() for k in range(len(labels))],
        }
        (directory / name).write_bytes(py2_pickle(content))
    if with_meta:
        meta = {b"num_cases_per_batch": 10000, b"label_names": CIFAR10_NAMES, b"num_vis": 3072}
        (directory / "batches.meta").write_bytes(py2_pickle(meta))


def write_cifar10_binary(directory: pathlib.Path, batches) -> None:
    """`data_batch_1.bin` ... `test_batch.bin` + `batches.meta.txt`: records of 1 label byte + 3072 pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        rows = cifar_rows(images)
        blob = b"".join(bytes([int(label)]) + rows[k].tobytes() for k, label in enumerate(labels))
        (directory / f"{name}.bin").write_bytes(blob)
    (directory / "batches.meta.txt").write_text("\n".join(n.decode() for n in CIFAR10_NAMES) + "\n\n")


def write_tar_gz(archive: pathlib.Path, folder: pathlib.Path) -> None:
    """Packs `folder` as `<folder.name>/...` into a .tar.gz, like the CIFAR archives."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    archive.write_bytes(buffer.getvalue())
