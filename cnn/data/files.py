"""Finding, verifying and decoding the original distribution files of MNIST, Fashion-MNIST and CIFAR.

Nothing here touches the network. A dataset's raw files are looked for under a base directory
(the `data_dir` argument, else env `CNN_DATA_DIR`, else `~/.cache/cnn/data`) in these places, first
complete match wins:

  <base>/<alias>/                    e.g. <base>/mnist/, <base>/fashion-mnist/, <base>/cifar10/
  <base>/downloads/manual/<alias>/   the TFDS manual-dir convention
  <base>/downloads/manual/
  <base>/

and, for CIFAR, also inside a `cifar-10-batches-py/` (or `-bin/`) folder under each of these, or
as the unopened `cifar-10-python.tar.gz` / `cifar-10-binary.tar.gz` archive. A missing file raises
`FileNotFoundError` naming the file and every directory searched.

Known checksums (SHA-256 from TFDS's `url_checksums/`, MD5 from the dataset pages and torchvision)
are verified when `verify_checksums=True`; a mismatch raises `ValueError` naming the file, the
expected and the actual digest.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import pickle
import tarfile
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_DATA_DIR = pathlib.Path("~/.cache/cnn/data")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """The base directory of raw files: `data_dir`, else env `CNN_DATA_DIR`, else `~/.cache/cnn/data`."""
    if data_dir is None:
        data_dir = os.environ.get("CNN_DATA_DIR") or DEFAULT_DATA_DIR
    return pathlib.Path(data_dir).expanduser()


# --------------------------------------------------------------------------------------------
# Checksums. Sources: MNIST / Fashion-MNIST SHA-256 from tensorflow_datasets/url_checksums/
# {mnist,fashion_mnist}.txt (identical to ../shared/data/SHA256SUMS); CIFAR MD5s from
# https://www.cs.toronto.edu/~kriz/cifar.html (archives) and torchvision's CIFAR10/CIFAR100
# classes (individual python batches); the CIFAR binary archives' SHA-256 from TFDS's
# url_checksums/{cifar10,cifar100}.txt.
# --------------------------------------------------------------------------------------------

KNOWN_CHECKSUMS: dict[str, dict[str, tuple[str, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": ("sha256", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": ("sha256", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": ("sha256", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": ("sha256", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
    "cifar10": {
        "cifar-10-python.tar.gz": ("md5", "c58f30108f718f92721af3b95e74349a"),
        "cifar-10-binary.tar.gz": ("sha256", "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
        "data_batch_1": ("md5", "c99cafc152244af753f735de768cd75f"),
        "data_batch_2": ("md5", "d4bba439e000b95fd0a9bffe97cbabec"),
        "data_batch_3": ("md5", "54ebc095f3ab1f0389bbae665268c751"),
        "data_batch_4": ("md5", "634d18415352ddfa80567beed471001a"),
        "data_batch_5": ("md5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        "test_batch": ("md5", "40351d587109b95175f43aff81a1287e"),
        "batches.meta": ("md5", "5ff9c542aee3614f3951f8cda6e48888"),
    },
    "cifar100": {
        "cifar-100-python.tar.gz": ("md5", "eb9058c3a382ffc7106e4002c42a8d85"),
        "cifar-100-binary.tar.gz": ("sha256", "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
        "train": ("md5", "16019d7e3df5f24257cddd939b257f8d"),
        "test": ("md5", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
        "meta": ("md5", "7973b15100ade9c7d40fb424638fde48"),
    },
}


def file_digest(path: pathlib.Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(dataset: str, path: pathlib.Path) -> None:
    """Checks `path` against the published digest of its file name, if one is known.

    Raises:
      ValueError: the digest differs (names the file, the expected and the actual digest).
    """
    known = KNOWN_CHECKSUMS.get(dataset, {}).get(path.name)
    if known is None:
        return
    algorithm, expected = known
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise ValueError(
            f"{dataset}: checksum mismatch for {path} ({path.stat().st_size} bytes): {algorithm} is {actual}, "
            f"the original distribution file has {expected}. The file is corrupted or truncated; replace it "
            "with the original (or pass verify_checksums=False for a deliberately modified copy)."
        )


# --------------------------------------------------------------------------------------------
# Locating files.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way a dataset's raw files can be laid out on disk.

    Attributes:
      kind: the reader to use ("idx", "cifar_python", "cifar_binary", "cifar_python_tar", ...).
      files: role -> file name; a role is satisfied by the name itself or, when `gz_optional`,
        by the same name without `.gz` (already decompressed).
      subdirs: folders under each candidate directory that may hold the files ("" = the directory).
      gz_optional: accept the decompressed form of `.gz` files.
    """

    kind: str
    files: Mapping[str, str]
    subdirs: Sequence[str] = ("",)
    gz_optional: bool = False


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "mnist": (Layout("idx", _IDX_FILES, gz_optional=True),),
    "fashion_mnist": (Layout("idx", _IDX_FILES, gz_optional=True),),
    "cifar10": (
        Layout(
            "cifar_python",
            {f"data_batch_{i}": f"data_batch_{i}" for i in range(1, 6)} | {"test_batch": "test_batch"},
            subdirs=("cifar-10-batches-py", ""),
        ),
        Layout("cifar_python_tar", {"archive": "cifar-10-python.tar.gz"}),
        Layout(
            "cifar_binary",
            {f"data_batch_{i}": f"data_batch_{i}.bin" for i in range(1, 6)} | {"test_batch": "test_batch.bin"},
            subdirs=("cifar-10-batches-bin", ""),
        ),
        Layout("cifar_binary_tar", {"archive": "cifar-10-binary.tar.gz"}),
    ),
    "cifar100": (
        Layout("cifar_python", {"train": "train", "test": "test"}, subdirs=("cifar-100-python",)),
        Layout("cifar_python_tar", {"archive": "cifar-100-python.tar.gz"}),
        Layout("cifar_binary", {"train": "train.bin", "test": "test.bin"}, subdirs=("cifar-100-binary",)),
        Layout("cifar_binary_tar", {"archive": "cifar-100-binary.tar.gz"}),
    ),
}

# Folder names a dataset's files are commonly kept under (first is the canonical one).
ALIASES: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist",),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist"),
    "cifar10": ("cifar10", "cifar-10"),
    "cifar100": ("cifar100", "cifar-100"),
}


@dataclasses.dataclass(frozen=True)
class RawFiles:
    """The located raw files of a dataset: which layout matched and where each role's file is."""

    dataset: str
    layout: Layout
    directory: pathlib.Path
    paths: Mapping[str, pathlib.Path]

    def fingerprint(self) -> dict[str, dict[str, int | str]]:
        """Path, size and modification time of every file: cheap to compare, changes with the files."""
        out = {}
        for role, path in sorted(self.paths.items()):
            stat = path.stat()
            out[role] = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return out


def candidate_dirs(dataset: str, base: pathlib.Path) -> list[pathlib.Path]:
    """Directories searched for `dataset`'s raw files under `base`, in search order."""
    aliases = ALIASES[dataset]
    manual = base / "downloads" / "manual"
    dirs = [base / a for a in aliases] + [manual / a for a in aliases] + [manual, base]
    return list(dict.fromkeys(dirs))  # de-duplicate, keep order


def _find_in(directory: pathlib.Path, layout: Layout) -> tuple[dict[str, pathlib.Path], list[str]]:
    found, missing = {}, []
    for role, name in layout.files.items():
        options = [directory / name]
        if layout.gz_optional and name.endswith(".gz"):
            options.append(directory / name[: -len(".gz")])
        hit = next((p for p in options if p.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[role] = hit
    return found, missing


def locate(dataset: str, data_dir: str | os.PathLike | None = None) -> RawFiles:
    """Finds the raw files of `dataset` ("mnist", "fashion_mnist", "cifar10", "cifar100").

    Raises:
      ValueError: unknown `dataset`.
      FileNotFoundError: no searched directory holds a complete set; the message names each
        missing file of the closest match and lists every directory searched.
    """
    if dataset not in LAYOUTS:
        raise ValueError(f"dataset={dataset!r} has no offline raw-file reader; valid: {sorted(LAYOUTS)}")
    base = resolve_data_dir(data_dir)
    searched: list[str] = []
    best: tuple[int, pathlib.Path, Layout, list[str]] | None = None
    for directory in candidate_dirs(dataset, base):
        for layout in LAYOUTS[dataset]:
            for subdir in layout.subdirs:
                where = directory / subdir if subdir else directory
                if not where.is_dir():
                    if str(where) not in searched:
                        searched.append(str(where))
                    continue
                found, missing = _find_in(where, layout)
                if not missing:
                    return RawFiles(dataset, layout, where, found)
                if str(where) not in searched:
                    searched.append(str(where))
                if found and (best is None or len(found) > best[0]):
                    best = (len(found), where, layout, missing)
    if best is not None:
        _, where, layout, missing = best
        problem = f"{dataset}: incomplete raw files in {where}: missing {', '.join(missing)}" + (
            " (the decompressed name without .gz is accepted too)" if layout.gz_optional else ""
        )
    else:
        wanted = " or ".join("{" + ", ".join(layout.files.values()) + "}" for layout in LAYOUTS[dataset])
        problem = f"{dataset}: raw files not found; need {wanted}"
    raise FileNotFoundError(
        problem
        + ".\nLooked in (base directory "
        + f"{base}, from the data_dir argument, else env CNN_DATA_DIR, else {DEFAULT_DATA_DIR}):\n  "
        + "\n  ".join(searched)
        + "\nPut the original distribution files in one of these directories."
    )


# --------------------------------------------------------------------------------------------
# Readers.
# --------------------------------------------------------------------------------------------


def _open_maybe_gz(path: pathlib.Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read {path}: {error} (the file is truncated or corrupted)") from error


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decodes an IDX file (optionally gzipped) of unsigned bytes.

    Format (big-endian): magic `0x0000 0x08 ndim` (0x08 = uint8), then `ndim` uint32 sizes, then
    the data in C order. Returns uint8 `[n]` (labels) or `[n, rows, cols]` (images).

    Raises:
      ValueError: bad magic number, unsupported element type, or a payload shorter or longer
        than the header says (names the file and both sizes).
    """
    path = pathlib.Path(path)
    raw = _open_maybe_gz(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (first bytes {raw[:4]!r}, expected 00 00 08 <ndim>)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{raw[2]:02x} is not uint8 (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes) but the file holds {len(raw)} bytes "
            "(truncated or corrupted)"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR python batches without executing arbitrary code: only numpy arrays are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _unpickle(blob: bytes, origin: str) -> dict[str, object]:
    try:
        content = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as error:  # pickle raises many types on damaged input
        raise ValueError(f"cannot unpickle {origin}: {error!r} (the file is truncated or corrupted)") from error
    if not isinstance(content, dict):
        raise ValueError(f"{origin}: expected a pickled dict, got {type(content).__name__}")
    # Batches written by Python 2 load with bytes keys; normalise to str.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def decode_cifar_python_batch(blob: bytes, origin: str, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Decodes one CIFAR python batch (a pickled dict with `data` [n, 3072] uint8 and labels).

    Each row of `data` is 1024 red, then 1024 green, then 1024 blue values of a 32x32 image in
    row-major order. Returns images uint8 `[n, 32, 32, 3]` and labels int64 `[n]`.
    """
    batch = _unpickle(blob, origin)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{origin}: expected keys 'data' and {label_key!r}, found {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{origin}: 'data' must be uint8 [n, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{origin}: {data.shape[0]} images but {labels.shape} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def decode_cifar_binary_batch(blob: bytes, origin: str, label_bytes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a CIFAR binary batch: records of `label_bytes` label bytes + 3072 pixel bytes.

    CIFAR-10 records have one label byte; CIFAR-100 records have two (coarse, fine): the fine
    label (the last byte) is returned. Returns images uint8 `[n, 32, 32, 3]` and labels int64 `[n]`.
    """
    record = label_bytes + 3072
    if len(blob) == 0 or len(blob) % record:
        raise ValueError(
            f"{origin}: {len(blob)} bytes is not a whole number of {record}-byte records (truncated or corrupted)"
        )
    rows = np.frombuffer(blob, np.uint8).reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, rows[:, label_bytes - 1].astype(np.int64)


def _read_tar_members(path: pathlib.Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """Reads the members of a .tar.gz whose base names are in `wanted` (one sequential pass)."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in out:
                    out[base] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"cannot read {path}: {error} (the archive is truncated or corrupted)") from error
    missing = [name for name in wanted if name not in out]
    if missing:
        raise FileNotFoundError(f"{path} lacks the members {missing}")
    return out


# Which batch files make up each split, per dataset.
CIFAR_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "cifar10": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "cifar100": {"train": ("train",), "test": ("test",)},
}
_CIFAR_META = {
    "cifar10": {"python": ("batches.meta", "label_names"), "binary": "batches.meta.txt"},
    "cifar100": {"python": ("meta", "fine_label_names"), "binary": "fine_label_names.txt"},
}


def read_cifar_split(raw: RawFiles, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split ("train"/"test") of located CIFAR raw files: uint8 `[n,32,32,3]`, int64 `[n]`."""
    batches = CIFAR_SPLITS[raw.dataset][split]
    python_label_key = "labels" if raw.dataset == "cifar10" else "fine_labels"
    label_bytes = 1 if raw.dataset == "cifar10" else 2
    kind = raw.layout.kind
    if kind.endswith("_tar"):
        suffix = ".bin" if kind.startswith("cifar_binary") else ""
        blobs = _read_tar_members(raw.paths["archive"], [b + suffix for b in batches])
        blobs = {name[: len(name) - len(suffix)] if suffix else name: blob for name, blob in blobs.items()}
        origins = {b: f"{raw.paths['archive']}:{b}{suffix}" for b in batches}
    else:
        blobs = {b: raw.paths[b].read_bytes() for b in batches}
        origins = {b: str(raw.paths[b]) for b in batches}
    images, labels = [], []
    for b in batches:
        if kind.startswith("cifar_python"):
            x, y = decode_cifar_python_batch(blobs[b], origins[b], python_label_key)
        else:
            x, y = decode_cifar_binary_batch(blobs[b], origins[b], label_bytes)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar_label_names(raw: RawFiles) -> list[str] | None:
    """The class names stored beside located CIFAR files (`batches.meta` etc.), or None if absent."""
    meta = _CIFAR_META[raw.dataset]
    kind = raw.layout.kind
    python = kind.startswith("cifar_python")
    name = meta["python"][0] if python else meta["binary"]
    if kind.endswith("_tar"):
        try:
            blob = _read_tar_members(raw.paths["archive"], [name])[name]
        except FileNotFoundError:
            return None
        origin = f"{raw.paths['archive']}:{name}"
    else:
        path = raw.directory / name
        if not path.is_file():
            return None
        blob, origin = path.read_bytes(), str(path)
    if python:
        names = _unpickle(blob, origin)[meta["python"][1]]
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return [line.strip() for line in blob.decode().splitlines() if line.strip()]


def verify_raw_checksums(raw: RawFiles) -> None:
    """Verifies every located file whose name has a published checksum (see `KNOWN_CHECKSUMS`)."""
    for path in raw.paths.values():
        verify_checksum(raw.dataset, path)
    if raw.layout.kind == "cifar_python":
        meta = raw.directory / _CIFAR_META[raw.dataset]["python"][0]
        if meta.is_file():
            verify_checksum(raw.dataset, meta)


def read_split(raw: RawFiles, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split ("train"/"test") of located raw files as arrays: uint8 `[n, H, W, C]`, int64 `[n]`.

    IDX datasets (MNIST, Fashion-MNIST) get a trailing channel axis; CIFAR batches are decoded
    from their pickled or binary form. Needs neither TFDS nor TensorFlow.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: raw files hold 'train' and 'test'")
    if raw.layout.kind == "idx":
        images = read_idx(raw.paths[f"{split}_images"])
        labels = read_idx(raw.paths[f"{split}_labels"]).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{raw.paths[f'{split}_images']}: expected [n, rows, cols] images and [n] labels, "
                f"got {images.shape} and {labels.shape}"
            )
        return images[..., None], labels
    return read_cifar_split(raw, split)
