"""Ensembles vs separate runs: aggregate training throughput of M CIFAR ResNets in one program.

    python benchmarks/ensemble.py --out runs/bench                  # ResNet-20, batch 128, M = 1 2 4 8
    python benchmarks/ensemble.py --quick --out /tmp/bench          # ResNet-8, batch 8, M = 1 2 (< 1 minute)

For each ensemble size M, three candidates train M independently initialized networks on the
same batch (`config.ensemble.data="shared"`): the ensemble (`cnn.train.ensemble`, one jitted
program: the package's train step `jax.vmap`ped over a member axis, "vmap"), the same step looped
over the members inside one program with `jax.lax.map` ("map", measured here only), and M
separate single-model states stepped one after the other by the one jitted single-model step
(what M separate runs cost on one device, without their start-up). All candidates take turns (side by side in one
run); the table gives seconds per step of all M members, aggregate images/s (M x batch / time)
and the ensemble's speed-up over separate runs. Writes ensemble.json and ensemble.md.
"""

from __future__ import annotations

import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

from cnn.train import ensemble as ensemble_lib  # noqa: E402
from cnn.train import parallel, steps  # noqa: E402


def map_train_step(train_step, *, shared_data: bool):
    """The alternative to `cnn.train.ensemble.vmap_train_step` measured here: a loop over the
    members inside the program (`jax.lax.map`), each iteration the single model's step (shared
    data only). Not in the package: on this CPU it was no faster than vmap (benchmarks/RESULTS.md)."""
    assert shared_data

    def step(state, batch, augment_rng):
        return jax.lax.map(lambda one: train_step(one, batch, augment_rng), state)

    return step


class EnsembleStepper:
    """Runs the vmapped train step of a stacked state `k` times."""

    def __init__(self, states, batch, layout: str = "vmap"):
        self.state = jax.device_put(ensemble_lib.stack([jax.device_get(s) for s in states]))
        self.rng = jax.device_put(self.state.rng[0])
        self.batch = {k: jax.device_put(v) for k, v in batch.items()}
        over_members = map_train_step if layout == "map" else ensemble_lib.vmap_train_step
        vmapped = over_members(steps.make_train_step(), shared_data=True)
        self.step = jax.jit(vmapped, donate_argnums=parallel.donated_arguments(),
                            **parallel.resolve_compiler_options("auto"))

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
        runners[f"map M={size}"] = EnsembleStepper(states[:size], batch, layout="map")
        runners[f"separate M={size}"] = SeparateStepper(states[:size], batch)
    timing = common.interleaved_seconds_per_step(runners, repeats=repeats, steps_per_repeat=args.steps)
    for size in sizes:
        together, apart = timing[f"ensemble M={size}"], timing[f"separate M={size}"]
        looped = timing[f"map M={size}"]
        record["rows"].append({
            "map_seconds_per_step": looped["median"],
            "map_speedup": apart["median"] / looped["median"],
            "map_samples": looped["samples"],
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
    common.write(args.out, "ensemble", record, markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    header = ["members M", "vmap s / step", "map s / step", "separate s / step", "vmap images/s", "separate images/s",
              "vmap speed-up", "map speed-up", "vmap time vs M=1"]
    rows = [
        [r["members"], f"{r['ensemble_seconds_per_step']:.3f}", f"{r['map_seconds_per_step']:.3f}",
         f"{r['separate_seconds_per_step']:.3f}",
         f"{r['ensemble_images_per_second']:.0f}", f"{r['separate_images_per_second']:.0f}", f"{r['speedup']:.2f}x",
         f"{r['map_speedup']:.2f}x",
         "" if r["time_vs_one_member"] is None else f"{r['time_vs_one_member']:.2f}x"]
        for r in record["rows"]
    ]
    return (
        f"# Ensembles vs separate runs: CIFAR ResNet-{record['depth']}, batch {record['batch_size']} of "
        f"{record.get('image_size', 32)}x{record.get('image_size', 32)}x{record.get('channels', 3)}\n\n"
        f"{common.machine_line(record)}\n\n" + common.markdown_table(header, rows) + "\n"
    )


if __name__ == "__main__":
    main()
