"""What failed, by name: the exceptions of the trainer and the one-line messages of its command lines.

    ConfigError(ValueError)          the config asks for something impossible or unknown (a typo, a
                                     model that rejects its options, a workdir made by another config)
    RunConfigMismatchError(ConfigError)   the run directory was made by a config that differs in keys
                                     that change results; `differences` lists `(key, old, new)`
    DataError(RuntimeError)          the data cannot be found, read or verified (missing or corrupted
                                     raw files, a failed preparation)
    CheckpointError(RuntimeError)    no checkpoint of the run can be restored (every step is broken)
    FileSystemError(OSError)         a folder or file of the run cannot be written (permission
                                     denied, a file where a folder should be, a full disk)

The command lines (`python -m cnn.train`, the experiment scripts through `experiments.grid`)
print one line per failure, `<prefix>: <message>`, with the prefix of `describe_error` and exit
with its code, instead of a traceback:

    config error: ...       exit 2   (also plain ValueError / KeyError, and Flax's errors: the model
                                     rejects its options)
    non-finite loss: ...    exit 3   (cnn.train.loop.NonFiniteLossError)
    data error: ...         exit 4
    checkpoint error: ...   exit 5
    file system error: ...  exit 6   (also plain OSError: FileNotFoundError, PermissionError, ...)

`unknown_key_error` builds the message for a mistyped config key with the closest existing keys
(`lerning_rate` -> `optimizer.learning_rate`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any


class ConfigError(ValueError):
    """The config is invalid: an unknown key or value, or options the model rejects."""


class RunConfigMismatchError(ConfigError):
    """A run directory holds results of another config (keys that change results differ).

    Attributes:
      differences: `(dotted key, stored value, requested value)` for every differing key.
      workdir: the run directory.
    """

    def __init__(self, message: str, *, differences: Sequence[tuple[str, Any, Any]], workdir: Any = None):
        super().__init__(message)
        self.differences: list[tuple[str, Any, Any]] = list(differences)
        self.workdir = workdir


class DataError(RuntimeError):
    """The data cannot be found, read or verified (names the dataset, the file and the fix)."""


class CheckpointError(RuntimeError):
    """No checkpoint can be restored (names the step directories, what is wrong and the fix)."""


class FileSystemError(OSError):
    """A path of the run cannot be written (names the path, the OS error and the fix).

    `str(error)` is the message; `errno` and `filename` are those of the OS error, when given.
    """

    def __init__(self, message: str, *, path: Any = None, cause: OSError | None = None):
        super().__init__(message)
        self.errno = getattr(cause, "errno", None)
        self.strerror = getattr(cause, "strerror", None)
        self.filename = None if path is None else str(path)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # picklable across processes, like other exceptions
        return (_rebuild_file_system_error, (self.args[0] if self.args else "", self.filename, self.errno))


def _rebuild_file_system_error(message: str, path: Any, errno: int | None) -> FileSystemError:
    error = FileSystemError(message, path=path)
    error.errno = errno
    return error


# Prefix and exit code per failure; checked in order (subclasses before their bases).
_KINDS: tuple[tuple[type[BaseException], str, int], ...] = (
    (ConfigError, "config error", 2),
    (DataError, "data error", 4),
    (CheckpointError, "checkpoint error", 5),
    (FileSystemError, "file system error", 6),
    (FloatingPointError, "non-finite loss", 3),  # cnn.train.loop.NonFiniteLossError
    (OSError, "file system error", 6),  # FileNotFoundError, PermissionError, ... not wrapped by the caller
    (ValueError, "config error", 2),  # validate_config and the model's own checks raise ValueError
    (KeyError, "config error", 2),
)


def describe_error(error: BaseException) -> tuple[str, int] | None:
    """`(prefix, exit code)` of an error the command lines report in one line, else None.

    Anything else (a bug) is left to propagate with its traceback.
    """
    for kind, prefix, code in _KINDS:
        if isinstance(error, kind):
            return prefix, code
    if type(error).__module__.startswith("flax."):  # e.g. ScopeParamShapeError: the model rejects its options
        return "config error", 2
    return None


def one_line(error: BaseException, prefix: str) -> str:
    """`"<prefix>: <message>"`; a KeyError's message without the quotes Python adds around it."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{prefix}: {message}"


def closest_keys(key: str, known: Iterable[str], count: int = 3, cutoff: float = 0.6) -> list[str]:
    """The `count` known dotted keys most similar to `key`, by the whole key or its last part.

    `lerning_rate` is far from `optimizer.learning_rate` as a whole string but close to its last
    part, so both similarities are computed (difflib's ratio) and the larger counts.
    """
    leaf = key.rsplit(".", 1)[-1]
    scored = []
    for candidate in set(known):
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        last = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
        score = max(whole, last)
        if score >= cutoff:
            scored.append((-score, candidate))
    return [candidate for _, candidate in sorted(scored)[:count]]


def unknown_key_error(key: str, known: Iterable[str], *, flag: str = "config") -> ConfigError:
    """The error for an override of a key the config does not have, with the closest keys."""
    known = sorted(set(known))
    close = closest_keys(key, known)
    hint = (
        f"did you mean {' or '.join(f'--{flag}.{name}' for name in close)}?"
        if close
        else f"the config's top-level keys are {', '.join(sorted({name.split('.', 1)[0] for name in known}))}."
    )
    return ConfigError(
        f"unknown config key {key!r} (--{flag}.{key}); {hint} New keys can be added only under "
        "free-form options such as model_options."
    )


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FileSystemError",
    "RunConfigMismatchError",
    "closest_keys",
    "describe_error",
    "one_line",
    "unknown_key_error",
]
