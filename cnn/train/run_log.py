"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events, learning-curve plots,
and the host-side window of training metrics between two log lines.

    logger = RunLogger(workdir, enabled=is_primary(), resume_step=-1)
    logger.write(step, {"train/loss": 0.3})        # a metrics.jsonl line and TensorBoard scalars
    plot_learning_curves(logger.records, workdir / "plots" / "learning_curve.png")
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any


class RunLogger:
    """Writes metrics to metrics.jsonl and TensorBoard (process 0 only; others do nothing).

    Args:
      workdir: the run directory.
      enabled: write files (process 0); other processes only keep `records`.
      resume_step: the checkpoint step the run resumes from, -1 for a fresh start. Records of
        later steps (from an interrupted attempt) are dropped from metrics.jsonl.
    """

    def __init__(self, workdir: pathlib.Path, *, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            # Keep what the checkpoint covers; later lines belong to the interrupted attempt.
            kept = []
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= resume_step:
                        kept.append(record)
            self.records = kept
            if enabled:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            # TensorBoard then drops earlier attempts' events after the checkpoint.
            self._writer = SummaryWriter(str(workdir / "events"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, float], *, member: int | None = None) -> None:
        """One record `{"step", ("member",) **metrics}`; an ensemble member's scalars go to
        TensorBoard as `<metric>/member_<i>`, one curve per member."""
        record = {"step": int(step), **({} if member is None else {"member": int(member)})}
        record.update({k: float(v) for k, v in metrics.items()})
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        suffix = "" if member is None else f"/member_{member}"
        for key, value in metrics.items():
            self._writer.add_scalar(key + suffix, float(value), int(step))

    def history(self, prefix: str) -> list[dict[str, Any]]:
        """The records that have `prefix/...` keys (e.g. "train", "eval")."""
        return [r for r in self.records if any(k.startswith(prefix + "/") for k in r)]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def plot_learning_curves(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, metric: str = "accuracy"
) -> pathlib.Path:
    """Saves the loss and `metric` against the step (train and eval, where logged) as a PNG;
    returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, name in zip(axes, ("loss", metric)):
        for split, style in (("train", "-"), ("eval", "o-")):
            key = f"{split}/{name}"
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, style, label=split, markersize=3)
        axis.set_xlabel("step")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class MetricWindow:
    """Host-side running sums of the training metrics between two log lines (checkpointed).

    Every metric a step returns is averaged over the window, except `learning_rate`, which is
    reported as its last value.
    """

    def __init__(self, state: Mapping[str, Any] | None = None):
        state = dict(state or {})
        self.sums = {k: float(v) for k, v in state.get("sums", {}).items()}
        self.count = int(state.get("count", 0))
        self.learning_rate = float(state.get("learning_rate", float("nan")))
        self.started = time.perf_counter()

    def add(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if key != "learning_rate":
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.learning_rate = metrics.get("learning_rate", self.learning_rate)

    def summary(self, batch_size: int) -> dict[str, float]:
        """`{"train/<metric>": mean, "train/learning_rate", "train/examples_per_sec"}`."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        summary = {f"train/{k}": v / max(self.count, 1) for k, v in self.sums.items()}
        summary["train/learning_rate"] = self.learning_rate
        summary["train/examples_per_sec"] = self.count * batch_size / elapsed
        return summary

    def to_json(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count, "learning_rate": self.learning_rate}

    def reset(self) -> None:
        self.sums = {}
        self.count = 0
        self.started = time.perf_counter()


__all__ = ["MetricWindow", "RunLogger", "plot_learning_curves"]
