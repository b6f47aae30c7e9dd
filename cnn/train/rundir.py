"""A run directory is reused only for the config that made it.

`fit` writes the resolved config to `<workdir>/config.json`. On a rerun, `check_run_config`
compares the keys that change results with the stored ones before anything is compiled:

    check_run_config(workdir, config, on_mismatch="error")
      "fresh"    no config.json: a new run
      "same"     every result key is equal: resume from the latest checkpoint
      "restart"  keys differ and on_mismatch="restart": the caller clears the run
                 (`reset_run_directory`) and trains from step 0
      "extend"   only the budget grew (num_train_steps, or num_epochs when both count in epochs)
                 and on_mismatch="extend": the caller resumes and trains to the new total, with the
                 learning-rate schedule recomputed over it, and says so (`extension_record`,
                 kept in results.json's "extensions" by `record_extension`)
      otherwise  RunConfigMismatchError listing each differing key (old -> new) and the fixes

Which keys change results: every key except those in `IGNORED_KEYS` (a new key, e.g. a future
`ensemble.*` or task option, counts as result-changing until it is listed here). `RESULT_KEYS`
names the ones known today. The ignored keys, and why they cannot change results:

    log_every_steps     how often training metrics are averaged and written; the steps are the same.
    eval_every_steps    evaluation reads the state and never changes it; only when eval lines (and,
                        with checkpoint.every_steps=-1, checkpoints) appear changes.
    eval_batch_size     evaluation is summed over masked, padded batches: counts and accuracy are
                        exact, the mean loss equal within float rounding.
    progress            the progress bar.
    plot                the learning-curve PNG, drawn from metrics.jsonl.
    checkpoint.*        how often and how many checkpoints are kept; resuming from any of them is
                        bit-identical to an uninterrupted run.
    parallelism         single / pmap / sharded compute the same steps; they reduce in a different
                        order, so results agree within float rounding (not bit for bit).
    deterministic       whether the GPU is asked for deterministic kernels: bit-exactness of
                        repeated runs, not what is computed.
    data_dir            where the raw files are read from, not which data: the dataset and splits
                        are compared, and the raw files of the offline datasets are verified
                        against their published checksums.
    on_mismatch         what to do about a mismatch, not part of the run.
    num_epochs          only while num_train_steps > 0 on both sides (fit then ignores it).

`ensure_writable(directory)` checks within a second that a folder can be written (creates it,
writes and removes a probe file) and raises `FileSystemError` naming the path and the OS error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from cnn.train.errors import ConfigError, FileSystemError, RunConfigMismatchError, unknown_key_error

CONFIG_FILE = "config.json"
ON_MISMATCH = ("error", "restart", "extend")
BUDGET_KEYS = ("num_train_steps", "num_epochs")

# Dotted keys (a trailing ".*" covers a whole sub-config) that change results. Informational:
# `is_result_key` treats every key not in IGNORED_KEYS as result-changing.
RESULT_KEYS: tuple[str, ...] = (
    "model",
    "model_options.*",
    "dataset",
    "train_split",
    "eval_split",
    "num_classes",
    "batch_size",
    "num_train_steps",
    "num_epochs",
    "optimizer.*",
    "loss.*",
    "augment",
    "augment_options.*",
    "seed",
    "data_seed",
    "dtype",
    "task_options.*",
    "ensemble.*",
)

# Keys that cannot change results (see the module docstring for why, one sentence each).
IGNORED_KEYS: tuple[str, ...] = (
    "log_every_steps",
    "eval_every_steps",
    "eval_batch_size",
    "progress",
    "plot",
    "checkpoint.*",
    "parallelism",
    "deterministic",
    "data_dir",
    "on_mismatch",
)

# Sub-configs whose keys are free-form (the model's, the augmentation's, the task's arguments):
# a command line may add keys under them.
FREE_FORM_KEYS: tuple[str, ...] = (
    "model_options",
    "augment_options",
    "task_options",
    "param_groups",
    "scheme_options",
    "scheme_model_options",
    "variants",
)


class _Absent:
    """A key one of the two configs does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def _matches(key: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith(".*"):
            if key == pattern[:-2] or key.startswith(pattern[:-1]):
                return True
        elif key == pattern:
            return True
    return False


def is_result_key(key: str) -> bool:
    """Whether a dotted config key can change results (everything not in `IGNORED_KEYS`)."""
    return not _matches(key, IGNORED_KEYS)


def is_free_form_key(key: str) -> bool:
    """Whether `key` lies under a free-form sub-config (e.g. `model_options.widths`), where keys
    may be added."""
    parts = key.split(".")
    return any(part in FREE_FORM_KEYS for part in parts[:-1])


def _normalized(value: Any) -> Any:
    """Lists and tuples compare equal (JSON has no tuples); nested ones too."""
    if isinstance(value, (list, tuple)):
        return tuple(_normalized(v) for v in value)
    return value


def _as_dict(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return config.to_dict()
    return dict(config)


def flatten_config(config: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """`{"optimizer": {"learning_rate": 0.1}}` -> `{"optimizer.learning_rate": 0.1}`.

    An empty sub-config contributes no key (an empty `model_options` equals an absent one).
    """
    flat: dict[str, Any] = {}
    for key, value in _as_dict(config).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = _normalized(value)
    return flat


def config_paths(config: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    """Every dotted path of a config: sub-configs (`optimizer`) and leaves (`optimizer.learning_rate`)."""
    paths = set()
    for key, value in _as_dict(config).items():
        dotted = f"{prefix}{key}"
        paths.add(dotted)
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            paths |= config_paths(value, dotted + ".")
    return paths


def check_override_keys(overrides: Iterable[str], known: Iterable[str], *, flag: str = "config") -> None:
    """Checks command-line override keys (`optimizer.learning_rate` of `--config.optimizer.learning_rate=`)
    against the keys a config has (`config_paths`).

    A key may be new only under a free-form sub-config the config has (`model_options.depth`,
    `train.model_options.width`; see `FREE_FORM_KEYS`).

    Raises:
      ConfigError: the first unknown key, with the closest known keys (`unknown_key_error`).
    """
    known = set(known)
    for key in overrides:
        if key in known:
            continue
        parts = key.split(".")
        free_form = any(
            part in FREE_FORM_KEYS and ".".join(parts[: index + 1]) in known
            for index, part in enumerate(parts[:-1])
        )
        if not free_form:
            leaves = {path for path in known if not any(other.startswith(path + ".") for other in known)}
            raise unknown_key_error(key, leaves, flag=flag)


_OVERRIDE = re.compile(r"^--?(?:no)?(?P<flag>[A-Za-z_][A-Za-z0-9_]*)\.(?P<key>[^=]+)")


def command_line_overrides(argv: Sequence[str], flag: str = "config") -> tuple[str | None, list[str]]:
    """`(config file argument, override keys)` of `--<flag>=file.py --<flag>.key=value ...` in argv.

    The file argument is None when `--<flag>` is not given (the caller's default applies).
    """
    path, keys = None, []
    for index, arg in enumerate(argv):
        if arg.startswith((f"--{flag}=", f"-{flag}=")):
            path = arg.split("=", 1)[1]
        elif arg in (f"--{flag}", f"-{flag}") and index + 1 < len(argv):
            path = argv[index + 1]
        else:
            match = _OVERRIDE.match(arg)
            if match and match.group("flag") == flag:
                keys.append(match.group("key"))
    return path, keys


def load_config_file(argument: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as ml_collections' config flags load it (`file.py[:arg]`)."""
    path, *extra = argument.split(":", 1)
    spec = importlib.util.spec_from_file_location(f"_cnn_config_{uuid.uuid4().hex}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load the config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*extra)


def check_command_line(
    argv: Sequence[str],
    *,
    known_configs: Iterable[Mapping[str, Any] | ml_collections.ConfigDict] = (),
    default_config_file: str | None = None,
    flag: str = "config",
) -> None:
    """Checks the `--<flag>.<key>=` overrides of a command line before the flags are parsed (where an
    unknown key would end in a traceback): every key must exist in the config file or in one of
    `known_configs`, or lie under a free-form sub-config (`model_options`, ...).

    A config file that cannot be loaded is left to the flag parser to report.

    Raises:
      ConfigError: the first unknown key, with the closest known keys.
    """
    argument, keys = command_line_overrides(argv, flag)
    argument = argument or default_config_file
    if not keys:
        return
    configs = list(known_configs)
    if argument:
        try:
            configs.append(load_config_file(argument))
        except Exception:  # noqa: BLE001 - reported by the flag parser with its own message
            return
    known = set().union(*(config_paths(config) for config in configs)) if configs else set()
    check_override_keys(keys, known, flag=flag)


def _budget_in_steps(flat: Mapping[str, Any]) -> bool:
    steps = flat.get("num_train_steps", 0)
    return isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps > 0


def config_differences(
    stored: Mapping[str, Any] | ml_collections.ConfigDict,
    requested: Mapping[str, Any] | ml_collections.ConfigDict,
) -> list[tuple[str, Any, Any]]:
    """`(dotted key, stored value, requested value)` for every result key that differs, sorted.

    Keys in `IGNORED_KEYS` are skipped; a key only one side has is reported with `ABSENT` on the
    other; lists and tuples with equal items are equal (config.json stores tuples as lists), as
    are numbers of equal value (`2` and `2.0`). `num_epochs` is skipped while both sides count
    in steps (`num_train_steps > 0`), since the run length then ignores it.
    """
    old, new = flatten_config(stored), flatten_config(requested)
    skip_epochs = _budget_in_steps(old) and _budget_in_steps(new)
    differences = []
    for key in sorted(set(old) | set(new)):
        if not is_result_key(key) or (skip_epochs and key == "num_epochs"):
            continue
        before, after = old.get(key, ABSENT), new.get(key, ABSENT)
        if before is ABSENT or after is ABSENT:
            if before is not after:
                differences.append((key, before, after))
        elif before != after or isinstance(before, bool) != isinstance(after, bool):
            differences.append((key, before, after))
    return differences


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_extension(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> bool:
    """Only the budget differs and it grew, in the same unit on both sides (steps, or epochs
    when neither sets num_train_steps): a well-defined continuation of the stored run."""
    differences = config_differences(stored, requested)
    if not differences or any(key not in BUDGET_KEYS for key, _, _ in differences):
        return False
    old, new = flatten_config(stored), flatten_config(requested)
    if not all(_number(flat.get(key, 0)) for flat in (old, new) for key in BUDGET_KEYS):
        return False
    if _budget_in_steps(old) and _budget_in_steps(new):
        return new["num_train_steps"] > old["num_train_steps"]
    if not _budget_in_steps(old) and not _budget_in_steps(new):
        return new.get("num_epochs", 0) > old.get("num_epochs", 0)
    return False  # steps on one side, epochs on the other: the old length in steps is not known here


def show_value(value: Any) -> str:
    """A config value as a message shows it (tuples as lists, as config.json and the command line do)."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def mismatch_message(
    workdir: str | os.PathLike, differences: list[tuple[str, Any, Any]], *, extendable: bool
) -> str:
    """The refusal: each differing key old -> new, then the fixes."""
    lines = [
        f"{workdir} was made by another config: {len(differences)} key(s) that change results differ "
        f"from its {CONFIG_FILE}:"
    ]
    lines += [f"  {key}: {show_value(before)} -> {show_value(after)}" for key, before, after in differences]
    fixes = [
        "use a new --workdir for this config (keeps these results)",
        "or pass --config.on_mismatch=restart to delete this run's checkpoints and metrics and train from step 0",
    ]
    if extendable:
        fixes.append(
            "or pass --config.on_mismatch=extend to continue this run to the new budget (the learning-rate "
            "schedule is recomputed over the new total from the current step)"
        )
    lines.append("Fix: " + ";\n     ".join(fixes) + ".")
    if not extendable:
        lines.append(
            "(on_mismatch=extend applies only when nothing but the budget grows: num_train_steps, or num_epochs "
            "when neither run sets num_train_steps.)"
        )
    return "\n".join(lines)


def read_run_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The config stored in `<workdir>/config.json`, or None if there is none.

    Raises:
      ConfigError: the file is not valid JSON (names the file and the fix).
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path} is not valid JSON ({error}): the run's config cannot be compared with the requested one. "
            "Use a new --workdir, or pass --config.on_mismatch=restart to start this run over."
        ) from error
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} holds {type(stored).__name__}, not a config object")
    return stored


def check_run_config(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict | Mapping[str, Any],
    *,
    on_mismatch: str = "error",
) -> str:
    """Compares `config` with the config stored in `workdir` (reads `config.json`, writes nothing).

    Args:
      workdir: the run directory.
      config: the requested config, resolved as `fit` stores it (defaults filled in).
      on_mismatch: "error" (refuse), "restart" or "extend" (see the module docstring).
    Returns:
      "fresh", "same", "restart" or "extend".
    Raises:
      RunConfigMismatchError: result keys differ and `on_mismatch` does not allow the change;
        lists each key old -> new and the fixes.
      ConfigError: `on_mismatch` is not one of `ON_MISMATCH`, or config.json is unreadable and
        `on_mismatch` is not "restart".
    """
    if on_mismatch not in ON_MISMATCH:
        raise ConfigError(f"config.on_mismatch={on_mismatch!r} must be one of {list(ON_MISMATCH)}")
    try:
        stored = read_run_config(workdir)
    except ConfigError:
        if on_mismatch == "restart":
            return "restart"
        raise
    if stored is None:
        return "fresh"
    differences = config_differences(stored, config)
    if not differences:
        return "same"
    extendable = is_extension(stored, config)
    if on_mismatch == "restart":
        return "restart"
    if on_mismatch == "extend" and extendable:
        return "extend"
    message = mismatch_message(workdir, differences, extendable=extendable)
    if on_mismatch == "extend":
        message += "\n(on_mismatch=extend was given, but these differences are not a longer budget.)"
    raise RunConfigMismatchError(message, differences=differences, workdir=pathlib.Path(workdir))


def extension_record(
    stored: Mapping[str, Any], config: ml_collections.ConfigDict | Mapping[str, Any], *, from_step: int,
    total_steps: int,
) -> dict[str, Any]:
    """What an extended run writes into metrics.jsonl / results.json: the old and new budget, the
    step it continued from, and that the learning-rate schedule was recomputed over the new total."""
    differences = config_differences(stored, config)
    changed = {key: {"old": before, "new": after} for key, before, after in differences}
    return {
        "extended_from_step": int(from_step),
        "total_steps": int(total_steps),
        "budget": changed,
        "note": (
            f"run extended at step {from_step} to {total_steps} steps: the learning-rate schedule was recomputed "
            f"over {total_steps} steps and continues from step {from_step} (steps before it followed the "
            "schedule of the old budget)"
        ),
    }


RESULTS_FILE = "results.json"


def read_extensions(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The `extension_record`s of a run, oldest first (`results.json`'s "extensions")."""
    path = pathlib.Path(workdir) / RESULTS_FILE
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    return list(results.get("extensions", [])) if isinstance(results, dict) else []


def record_extension(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Appends `record` to `results.json`'s "extensions" at once (atomically), so that an extended
    run interrupted before its end still says so; `fit` keeps the list when it rewrites the file."""
    path = pathlib.Path(workdir) / RESULTS_FILE
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        results = {}
    results = results if isinstance(results, dict) else {}
    results["extensions"] = [*results.get("extensions", []), dict(record)]
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(temporary, path)


# Everything `fit` writes into a run directory (config.json last: it says whose run it is).
RUN_FILES = ("checkpoints", "metrics.jsonl", "events", "plots", RESULTS_FILE, "results.md", CONFIG_FILE)


def reset_run_directory(workdir: str | os.PathLike, extra: Iterable[str] = ()) -> list[pathlib.Path]:
    """Deletes a run's outputs (`RUN_FILES` and `extra` names) for on_mismatch="restart";
    returns what was deleted. Other files in `workdir` are left alone.

    Raises:
      FileSystemError: a path cannot be deleted (names it and the OS error).
    """
    removed = []
    for name in (*extra, *RUN_FILES):
        path = pathlib.Path(workdir) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
        except OSError as error:
            raise FileSystemError(
                f"cannot delete {path} to restart the run: {error.strerror or error}", path=path, cause=error
            ) from error
        removed.append(path)
    return removed


def ensure_writable(directory: str | os.PathLike) -> None:
    """Creates `directory` (and parents) and writes, then removes, a probe file in it.

    Raises:
      FileSystemError: it cannot be created or written; the message names the path, the OS error
        and what is in the way.
    """
    directory = pathlib.Path(directory)
    # A unique name: every process of a multi-host run may probe a shared folder at once.
    probe = directory / f".write-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        probe.unlink()
    except OSError as error:
        blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
        why = f"; {blocker} is a file, not a folder" if blocker is not None else ""
        raise FileSystemError(
            f"cannot write to {directory}: {error.strerror or error} ({type(error).__name__}){why}. Make it a "
            "writable folder (permissions, free space) or choose another --workdir",
            path=directory,
            cause=error,
        ) from error


__all__ = [
    "ABSENT",
    "BUDGET_KEYS",
    "FREE_FORM_KEYS",
    "IGNORED_KEYS",
    "ON_MISMATCH",
    "RESULTS_FILE",
    "RESULT_KEYS",
    "RUN_FILES",
    "check_command_line",
    "check_override_keys",
    "command_line_overrides",
    "check_run_config",
    "config_differences",
    "config_paths",
    "ensure_writable",
    "extension_record",
    "flatten_config",
    "is_extension",
    "is_free_form_key",
    "is_result_key",
    "load_config_file",
    "mismatch_message",
    "read_extensions",
    "read_run_config",
    "record_extension",
    "reset_run_directory",
    "show_value",
]
