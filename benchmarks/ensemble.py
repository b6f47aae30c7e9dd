"""Ensembles vs separate runs: aggregate training throughput of M CIFAR ResNets in one program.

    python benchmarks/ensemble.py --out runs/bench                  # ResNet-20, batch 128, M = 1 2 4 8
    python benchmarks/ensemble.py --out runs/bench --sizes 1 5 --batch-size 64 --image-size 14 --channels 1
                                                                    # make demo's shapes
    python benchmarks/ensemble.py --quick --out /tmp/bench          # ResNet-8, batch 8, M = 1 2, stage 1 (< 1 minute)

For each ensemble size M, three candidates train M independently initialized networks on the
same batch (`config.ensemble.data="shared"`): the ensemble (`cnn.train.ensemble`, one jitted
program: the package's train step `jax.vmap`ped over a member axis, "vmap"), the same program
with JAX's own batching of the convolutions ("grouped": the members folded into one grouped
convolution, what the package did before its CPU member loop, `cnn.ops.conv`), and M separate
single-model states stepped one after the other by the one jitted single-model step (what M
separate runs cost on one device, without their start-up). All candidates take turns (side by
side in one run); the table gives seconds per step of all M members, aggregate images/s
(M x batch / time) and the speed-ups over separate runs.

The convolution profile (largest M, one 3x3 stride-1 convolution per stage at the model's
shapes) times each pass of the step -- forward, input gradient, kernel gradient -- the same
three ways: grouped, per member (the package's vmap), and M separate calls. It says which
convolutions the member axis slows. Writes ensemble.json and ensemble.md.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

from cnn import ops  # noqa: E402
from cnn.ops.conv import MEMBER_AXIS  # noqa: E402
from cnn.train import ensemble as ensemble_lib  # noqa: E402
from cnn.train import parallel, steps  # noqa: E402

CONV_PASSES = ("forward", "input gradient", "kernel gradient")


def _compiled(jitted, args, *, grouped: bool):
    """`jitted` compiled for `args`; `grouped`: with JAX's own batching of the convolutions."""
    with common.grouped_member_convolutions() if grouped else contextlib.nullcontext():
        return jitted.lower(*args).compile()


class EnsembleStepper:
    """Runs the vmapped train step of a stacked state `k` times (`grouped`: JAX's batching of
    the convolutions instead of the package's per-member loop)."""

    def __init__(self, states, batch, grouped: bool = False):
        self.state = jax.device_put(ensemble_lib.stack([jax.device_get(s) for s in states]))
        self.rng = jax.device_put(self.state.rng[0])
        self.batch = {k: jax.device_put(v) for k, v in batch.items()}
        vmapped = ensemble_lib.vmap_train_step(steps.make_train_step(), shared_data=True)
        step = jax.jit(vmapped, donate_argnums=parallel.donated_arguments(),
                       **parallel.resolve_compiler_options("auto"))
        self.step = _compiled(step, (self.state, self.batch, self.rng), grouped=grouped)

    def __call__(self, k: int) -> None:
        metrics = None
        for _ in range(k):
            self.state, metrics = self.step(self.state, self.batch, self.rng)
        jax.block_until_ready((self.state.params, metrics))


class SeparateStepper:
    """Steps M single-model states one after the other with the single-model jitted step."""

    def __init__(self, states, batch):
        # Own copies: the jitted step donates its state, and candidates share the initial states.
        self.runners = [common.JaxStepper(common.jit_train_step(), jax.device_put(jax.device_get(state)), batch)
                        for state in states]

    def __call__(self, k: int) -> None:
        for _ in range(k):
            for runner in self.runners:
                runner(1)


def _conv_pass(name: str) -> Callable:
    """`(x [b, h, w, c], kernel [3, 3, c, c], dy [b, h, w, c]) -> array`: one pass of a 3x3
    stride-1 "same" package convolution (its forward, or one of its two gradients)."""

    def conv(x, kernel):
        return ops.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def run(x, kernel, dy):
        if name == "forward":
            return conv(x, kernel)
        _, vjp = jax.vjp(conv, x, kernel)
        return vjp(dy)[0 if name == "input gradient" else 1]

    return run


class ConvStepper:
    """Runs one convolution pass for M members `k` times: vmapped over the ensemble's member
    axis (per-member loop or grouped) or as M separate calls of the single-model program."""

    def __init__(self, pass_name: str, x, kernel, dy, how: str):
        options = parallel.resolve_compiler_options("auto")
        run = _conv_pass(pass_name)
        if how == "separate":  # one program, called once per member
            self.calls = [(x[i], kernel[i], dy[i]) for i in range(x.shape[0])]
            self.call = _compiled(jax.jit(run, **options), self.calls[0], grouped=False)
        else:  # one program for all members
            self.calls = [(x, kernel, dy)]
            self.call = _compiled(jax.jit(jax.vmap(run, axis_name=MEMBER_AXIS), **options), self.calls[0],
                                  grouped=how == "grouped")

    def __call__(self, k: int) -> None:
        outputs = []
        for _ in range(k):
            outputs = [self.call(*args) for args in self.calls]
        jax.block_until_ready(outputs)


def convolution_profile(members: int, batch_size: int, image_size: int, width: int, *, repeats: int,
                        steps_per_repeat: int, stages: int = 3) -> list[dict]:
    """Milliseconds per pass of M members' 3x3 convolutions at the shape of each of the first
    `stages` stages (side halves and width doubles per stage, as in a CIFAR ResNet), grouped vs
    per member vs separate."""
    rng = np.random.default_rng(0)
    rows = []
    for stage in range(stages):
        side, channels = -(-image_size // 2**stage), width * 2**stage
        x, dy = (jnp.asarray(rng.standard_normal((members, batch_size, side, side, channels)), jnp.float32)
                 for _ in range(2))
        kernel = jnp.asarray(rng.standard_normal((members, 3, 3, channels, channels)) * 0.1, jnp.float32)
        for pass_name in CONV_PASSES:
            runners = {how: ConvStepper(pass_name, x, kernel, dy, how) for how in ("grouped", "per member", "separate")}
            timing = common.interleaved_seconds_per_step(runners, repeats=repeats, steps_per_repeat=steps_per_repeat)
            row = {"stage": stage + 1, "side": side, "channels": channels, "pass": pass_name, "members": members}
            for how in runners:
                row[f"{how} ms"] = 1e3 * timing[how]["median"]
            row["grouped vs separate"] = row["grouped ms"] / row["separate ms"]
            row["per member vs separate"] = row["per member ms"] / row["separate ms"]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--sizes", nargs="+", type=common.positive_int, default=None,
                        help="ensemble sizes M (default 1 2 4 8; quick 1 2)")
    parser.add_argument("--depth", type=int, default=None, help="default 20 (quick: 8)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None, help="default 128 (quick: 8)")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="turns (default 3; quick 1)")
    parser.add_argument("--steps", type=common.positive_int, default=1, help="steps per turn")
    parser.add_argument("--image-size", type=common.positive_int, default=32, help="input side (14: make demo's)")
    parser.add_argument("--channels", type=common.positive_int, default=3, help="input channels (1: Fashion-MNIST)")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([1, 2] if args.quick else [1, 2, 4, 8])
    depth = args.depth or (8 if args.quick else 20)
    batch_size = args.batch_size or (8 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)

    record = common.machine_record(args.quick, "ensemble.py", argv)
    record.update(depth=depth, batch_size=batch_size, sizes=sizes, repeats=repeats, steps_per_repeat=args.steps,
                  image_size=args.image_size, channels=args.channels, rows=[])
    batch = common.random_batch(batch_size, args.image_size, args.channels)
    model = common.cifar_model(depth, "euler")
    states = [common.random_train_state(model, (1, args.image_size, args.image_size, args.channels), seed=seed)
              for seed in range(max(sizes))]
    runners = {}
    for size in sizes:
        runners[f"ensemble M={size}"] = EnsembleStepper(states[:size], batch)
        runners[f"grouped M={size}"] = EnsembleStepper(states[:size], batch, grouped=True)
        runners[f"separate M={size}"] = SeparateStepper(states[:size], batch)
    timing = common.interleaved_seconds_per_step(runners, repeats=repeats, steps_per_repeat=args.steps)
    for size in sizes:
        together, apart = timing[f"ensemble M={size}"], timing[f"separate M={size}"]
        grouped = timing[f"grouped M={size}"]
        record["rows"].append({
            "grouped_seconds_per_step": grouped["median"],
            "grouped_speedup": apart["median"] / grouped["median"],
            "grouped_samples": grouped["samples"],
            "members": size,
            "ensemble_seconds_per_step": together["median"],
            "separate_seconds_per_step": apart["median"],
            "ensemble_images_per_second": size * batch_size / together["median"],
            "separate_images_per_second": size * batch_size / apart["median"],
            "speedup": apart["median"] / together["median"],
            "ensemble_samples": together["samples"],
            "separate_samples": apart["samples"],
        })
    one = record["rows"][0]["ensemble_seconds_per_step"] if sizes[0] == 1 else None
    for row in record["rows"]:
        row["time_vs_one_member"] = row["ensemble_seconds_per_step"] / one if one else None
    record["convolutions"] = convolution_profile(max(sizes), batch_size, args.image_size, model.width, repeats=repeats,
                                                 steps_per_repeat=max(args.steps, 3), stages=1 if args.quick else 3)
    common.write(args.out, "ensemble", record, markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    header = ["members M", "vmap s / step", "grouped s / step", "separate s / step", "vmap images/s",
              "separate images/s", "vmap speed-up", "grouped speed-up", "vmap time vs M=1"]
    rows = [
        [r["members"], f"{r['ensemble_seconds_per_step']:.3f}", f"{r['grouped_seconds_per_step']:.3f}",
         f"{r['separate_seconds_per_step']:.3f}",
         f"{r['ensemble_images_per_second']:.0f}", f"{r['separate_images_per_second']:.0f}", f"{r['speedup']:.2f}x",
         f"{r['grouped_speedup']:.2f}x",
         "" if r["time_vs_one_member"] is None else f"{r['time_vs_one_member']:.2f}x"]
        for r in record["rows"]
    ]
    text = (
        f"# Ensembles vs separate runs: CIFAR ResNet-{record['depth']}, batch {record['batch_size']} of "
        f"{record.get('image_size', 32)}x{record.get('image_size', 32)}x{record.get('channels', 3)}\n\n"
        f"{common.machine_line(record)}\n\n" + common.markdown_table(header, rows) + "\n"
    )
    convolutions = record.get("convolutions")
    if convolutions:
        header = ["stage (side, channels)", "pass", "grouped ms", "per member ms", "separate ms",
                  "grouped / separate", "per member / separate"]
        rows = [[f"{r['stage']} ({r['side']}, {r['channels']})", r["pass"], f"{r['grouped ms']:.2f}",
                 f"{r['per member ms']:.2f}", f"{r['separate ms']:.2f}", f"{r['grouped vs separate']:.2f}x",
                 f"{r['per member vs separate']:.2f}x"] for r in convolutions]
        text += (f"\n## One 3x3 convolution per stage, {convolutions[0]['members']} members (time: lower is "
                 "better)\n\n" + common.markdown_table(header, rows) + "\n")
    return text


if __name__ == "__main__":
    main()
