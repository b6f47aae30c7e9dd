"""Command line: `python -m cnn.train --config experiments/configs/train_digits.py --workdir runs/x`.

Any config field can be overridden, e.g. `--config.optimizer.learning_rate=0.05
--config.num_train_steps=500 --config.parallelism=pmap`; keys the model accepts can be added
under `model_options` (`--config.model_options.depth=2`). An unknown key stops with the closest
existing ones (`--config.lerning_rate` -> `optimizer.learning_rate`).

Re-running with the same `--workdir` and config resumes from its latest intact checkpoint. A
workdir made by a config that differs in keys that change results is refused with the list of
differing keys (`cnn.train.rundir`); `--config.on_mismatch=restart` trains it again from step 0,
`--config.on_mismatch=extend` continues it to a larger budget.

Failures print one line (or a short list) and exit with a code per kind (`cnn.train.errors`):
config error 2, non-finite loss 3, data error 4, checkpoint error 5, file system error 6.

For several hosts, start one process per host with `CNN_COORDINATOR=host0:port
CNN_NUM_PROCESSES=n CNN_PROCESS_ID=i` in the environment.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cnn.train import errors, parallel, rundir

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "experiment config file with get_config() (e.g. experiments/configs/train_digits.py)",
    # New keys are accepted here, after run() has checked them: only free-form options
    # (model_options, ...) may gain keys; anything else unknown got a one-line error.
    accept_new_attributes=True,
    lock_config=False,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (config, metrics, checkpoints, plots)")
flags.mark_flags_as_required(["config", "workdir"])


def report(error: BaseException) -> None:
    """Prints `error` as `<kind> error: <message>` and exits with the kind's code; re-raises
    errors that are not one of the reported kinds (bugs keep their traceback)."""
    described = errors.describe_error(error)
    if described is None:
        raise error
    prefix, code = described
    print(errors.one_line(error, prefix), file=sys.stderr)
    sys.exit(code)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.field=value")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if _CONFIG.value.get("deterministic", True):
        parallel.request_deterministic_gpu()  # before the backend starts (bit-exact GPU resume)
    parallel.maybe_initialize_distributed()  # before anything touches the JAX backend

    from cnn.train import fit

    try:
        result = fit(_CONFIG.value, _WORKDIR.value)
    except Exception as error:  # noqa: BLE001 - report() re-raises what it does not describe
        report(error)
    if parallel.is_primary():
        print(json.dumps({"workdir": str(result.workdir), "steps": result.steps, "final_eval": result.final_eval}))


def run(argv: list[str]) -> None:
    """Checks the override keys (before absl parses them: an unknown key would end there in a
    traceback), then runs `main` under absl."""
    from cnn.train import default_config

    try:
        rundir.check_command_line(argv[1:], known_configs=[default_config()])
    except errors.ConfigError as error:
        report(error)
    app.run(main, argv)


if __name__ == "__main__":
    run(sys.argv)
