"""Command line: `python -m cnn.train --config experiments/configs/train_digits.py --workdir runs/x`.

Any config field can be overridden, e.g. `--config.optimizer.learning_rate=0.05
--config.num_train_steps=500 --config.parallelism=pmap`. Re-running with the same `--workdir`
resumes from its latest checkpoint. For several hosts, start one process per host with
`CNN_COORDINATOR=host0:port CNN_NUM_PROCESSES=n CNN_PROCESS_ID=i` in the environment.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cnn.train import parallel

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file with get_config() (e.g. experiments/configs/train_digits.py)"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (config, metrics, checkpoints, plots)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides look like --config.field=value")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if _CONFIG.value.get("deterministic", True):
        parallel.request_deterministic_gpu()  # before the backend starts (bit-exact GPU resume)
    parallel.maybe_initialize_distributed()  # before anything touches the JAX backend

    from cnn.train.loop import NonFiniteLossError, fit

    try:
        result = fit(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, FileNotFoundError) as error:  # invalid config, found before compiling
        print(f"error: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    if parallel.is_primary():
        print(json.dumps({"workdir": str(result.workdir), "steps": result.steps, "final_eval": result.final_eval}))


if __name__ == "__main__":
    app.run(main)
