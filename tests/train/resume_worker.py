"""Subprocess of the exact-resume test: trains, and stalls after a checkpoint until it is killed.

    python -m tests.train.resume_worker WORKDIR CHECKPOINT_STEP STALL_STEP

Runs `fit(resume_config(), WORKDIR)`. At step STALL_STEP (> CHECKPOINT_STEP) it waits until
checkpoint CHECKPOINT_STEP is committed, prints "STALLED" and sleeps, so that the test can
SIGKILL it in the middle of the run (with metrics already logged past the checkpoint).
"""

import pathlib
import sys
import time

from cnn.train import loop
from tests.train.helpers import digits_datasets, tiny_config


def resume_config():
    """30 steps; logs every 3 steps (so step 10 is mid-window), evaluates and saves every 10."""
    return tiny_config(num_train_steps=30, log_every_steps=3, eval_every_steps=10, **{"checkpoint.every_steps": 10})


def main(workdir: str, checkpoint_step: int, stall_step: int) -> None:
    checkpoint_dir = pathlib.Path(workdir) / "checkpoints" / str(checkpoint_step)

    def stall(step, state):
        if step == stall_step:
            while not checkpoint_dir.is_dir():  # the async save renames its directory on commit
                time.sleep(0.02)
            print("STALLED", flush=True)
            time.sleep(600)

    loop.fit(resume_config(), workdir, datasets=digits_datasets, callbacks=[stall])
    print("FINISHED", flush=True)  # the test kills the process before this


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
