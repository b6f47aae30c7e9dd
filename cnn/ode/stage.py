"""`ODEStage`: one residual stage of a network, stepped by any `Scheme`, under `nn.scan`.

A stage is a stack of residual functions `F_0, ..., F_{N-1}` (Flax modules that compute only
the residual branch, `[batch, height, width, channels] -> same`) and a scheme that turns them
into the update `x_t -> x_{t+1}` (`Scheme.step`, the same code `cnn.ode.analysis` validates).
Optionally block 0 changes shape (`entry_block` with stride / more channels, plus
`entry_shortcut` S mapping `x_0` to the new shape).

    stage = ODEStage(
        scheme=get_scheme("lm"),
        block=functools.partial(MyResidual, features=32),                 # F_1 .. F_{N-1}
        entry_block=functools.partial(MyResidual, features=32, strides=2),
        entry_shortcut=functools.partial(MyProjection, features=32, strides=2),
        num_blocks=N,
    )
    y, history = stage(x, history=None, train=True)

BatchNorm inside `F`: a scheme that evaluates `F` several times per step (Runge-Kutta stages,
implicit sweeps) calls the same BatchNorm layers on each evaluation's input. In training each
call normalizes with its own batch statistics; one running average would mix all calls, and
eval-mode accuracy of such schemes fell far below their training accuracy (measured:
experiments/RESULTS.md, section 2b). So the stage numbers the evaluations of each step and
passes `evaluation=k` to blocks that take it, whose `cnn.ode.EvaluationBatchNorm`s keep running
statistics per evaluation (`per_evaluation_stats`, below). Single-evaluation schemes are
unaffected.

Options:
- `start` ("euler" | "copy"): how the first step of a multistep scheme is taken (see
  `cnn.ode.schemes`); it applies to block 0 when the stage receives no history.
- `history_at_entry` ("restart" | "project"): at a shape-changing block 0, "restart" discards
  the incoming history and takes the start step `x_1 = S(x_0) + h F_0(x_0)` (the history
  becomes `(S(x_0), F_0(x_0))`); "project" maps every incoming past state and derivative
  through S and applies the scheme's own formula. Runge-Kutta schemes always take the Euler
  step at a transition. Default "restart" with `start="euler"` is what the LM-ResNet reference
  code does (`cnn.ode.schemes.lm`). A stage without an entry block continues the history it is
  given in both modes.
- `tied`: share the residual function's weights over the identical blocks (a time-invariant
  ODE; depth N with `h = T/N` approximates the flow to time T). BatchNorm statistics are then
  shared too, so `F` is the same function at every step (in training they are carried through
  the scan, so they must keep their dtype: flax stores them in float32, which suits float32 and
  bfloat16 compute but not float64 compute with float32 statistics). With an entry block, block
  0 keeps its own weights.
- `drop_path_rates`: stochastic depth, one drop probability per block. In training each
  sample's `F_t` is replaced by `mask / (1 - rate) * F_t` with `mask ~ Bernoulli(1 - rate)`
  (rng stream "dropout"), so e.g. LM-ResNet becomes `x_{t+1} = (1-k) x_t + k x_{t-1} + h m F`.
- `step_activation`: applied to each step's result (`nn.relu` gives He et al.'s original
  post-activation ResNet, `x_{t+1} = relu(x_t + F(x_t))`); None is the pure scheme.
- `scan`: True runs the identical blocks under `nn.scan` (compile time independent of depth);
  False unrolls them into modules `blocks_0 .. blocks_{M-1}` with identical results. Convert
  parameters between the layouts with `stack_unrolled` / `unstack_scanned`.
- `remat`: recompute each step's activations in the backward pass.
- `per_evaluation_stats`: schemes that evaluate `F` several times per step (Runge-Kutta stages,
  implicit sweeps) number those evaluations `0, 1, ...` and pass `evaluation=k` to blocks whose
  `__call__` takes it; their `cnn.ode.EvaluationBatchNorm`s then keep running statistics per
  evaluation (`batch_stats/.../eval{k}/{mean,var}` for k >= 1), sharing scale and bias. A
  single shared average mixes differently distributed inputs and spoils eval mode (see
  `cnn.ode.norm`). False restores shared statistics; one-evaluation schemes are unaffected.

Parameter tree of a stage: `entry/{block,shortcut}` (when there is an entry block), `blocks`
(scanned, leading axis = number of identical blocks), or `blocks_{i}` (unrolled), or `tied_block`
(tied), and `knobs/<name>` of shape `[num_blocks]` when the scheme has learnable knobs -- one
scalar per block, including blocks whose start step does not use it (its gradient is then 0).
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.ode.schemes import START_MODES, History, Scheme, get_scheme

ModuleDef = Any
HISTORY_MODES = ("restart", "project")


def linear_drop_path_rates(num_blocks: int, final_survival: float) -> tuple[float, ...]:
    """Stochastic-depth drop rates with survival probability linear in depth (Huang et al. 2016).

    Block `l = 1..L` survives with probability `p_l = 1 - l/L * (1 - final_survival)`; returns
    the drop rates `1 - p_l` (so the last block has `1 - final_survival`).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
    if not 0.0 < final_survival <= 1.0:
        raise ValueError(f"final_survival={final_survival}: must be in (0, 1]")
    return tuple(float(l / num_blocks * (1.0 - final_survival)) for l in range(1, num_blocks + 1))


def takes_evaluation(module: nn.Module) -> bool:
    """Whether a residual block's `__call__` takes `evaluation` (the index of the scheme's `F`
    evaluation within a step), i.e. keeps per-evaluation BatchNorm statistics."""
    try:
        parameters = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return False
    return "evaluation" in parameters


class SchemeKnobs(nn.Module):
    """The scheme's learnable scalars for a stage: one raw parameter array `[num_blocks]` per knob.

    Returns `{name: values [num_blocks]}` (after the knob's reparametrization).
    """

    scheme: Scheme
    num_blocks: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, jnp.ndarray]:
        values = {}
        for knob in self.scheme.knobs:
            low, high = knob.init_range

            def init(key: jax.Array, shape: Sequence[int], dtype: Any = self.param_dtype, knob=knob, low=low, high=high):
                value = jax.random.uniform(key, shape, jnp.float32, low, high) if high > low else jnp.full(shape, low)
                return knob.to_raw(value).astype(dtype)

            raw = self.param(knob.name, init, (self.num_blocks,), self.param_dtype)
            values[knob.name] = knob.to_value(raw)
        return values


class SchemeStep(nn.Module):
    """One residual block stepped by the scheme: the body of the stage's scan.

    `__call__((x, history), (knobs, drop_rate, drop_key, first)) -> ((x_next, history_next), None)`
    with `x: [batch, height, width, channels]`, `knobs: {name: scalar}`, `drop_rate: scalar`
    (ignored unless `drop_path`), `drop_key`: PRNG key or None, `first`: bool or None.
    """

    scheme: Scheme
    block: ModuleDef
    shortcut: ModuleDef | None = None
    train: bool = False
    start: str = "euler"
    drop_path: bool = False
    step_activation: Callable[[jnp.ndarray], jnp.ndarray] | None = None
    per_evaluation_stats: bool = True

    @nn.compact
    def __call__(self, carry: tuple[jnp.ndarray, History | None], xs: tuple[Any, ...]):
        x, history = carry
        knobs, drop_rate, drop_key, first = xs
        residual = self.block(name="block")
        scale = None
        if self.drop_path and self.train:
            survival = 1.0 - drop_rate
            keep = jax.random.bernoulli(drop_key, survival, (x.shape[0],) + (1,) * (x.ndim - 1))
            scale = keep / survival
        # The scheme calls f once per evaluation of F, in a fixed Python order: number them, so
        # that blocks taking `evaluation` keep BatchNorm statistics per evaluation (cnn.ode.norm).
        numbered = self.per_evaluation_stats and takes_evaluation(residual)
        evaluations = itertools.count()

        def f(z: jnp.ndarray) -> jnp.ndarray:
            if numbered:
                out = residual(z, train=self.train, evaluation=next(evaluations))
            else:
                out = residual(z, train=self.train)
            return out if scale is None else out * scale.astype(out.dtype)

        shortcut = None
        if self.shortcut is not None:
            module = self.shortcut(name="shortcut")

            def shortcut(z: jnp.ndarray) -> jnp.ndarray:
                return module(z, train=self.train)

        x_next, history_next = self.scheme.step(
            f, x, history, knobs, first=first, start=self.start, shortcut=shortcut
        )
        if self.step_activation is not None:
            x_next = self.step_activation(x_next)
        return (x_next, history_next), None


class ODEStage(nn.Module):
    """A residual stage `x_0 -> x_N` stepped by `scheme` (see the module docstring).

    Attributes:
      scheme: a `Scheme` or a scheme name for `get_scheme`.
      block: factory of the identical residual modules: `block(name=...)` builds a module with
        `__call__(x, *, train) -> F(x)`, same shape in and out.
      num_blocks: number of blocks N including the entry block.
      entry_block: factory of block 0 when it changes shape (needs `entry_shortcut`), else None.
      entry_shortcut: factory of S for block 0, `__call__(x, *, train)`.
      tied, scan, remat, start, history_at_entry, drop_path_rates, step_activation,
        per_evaluation_stats: see above.
      param_dtype: dtype of the knob parameters.
    """

    scheme: Scheme | str
    block: ModuleDef
    num_blocks: int
    entry_block: ModuleDef | None = None
    entry_shortcut: ModuleDef | None = None
    tied: bool = False
    scan: bool = True
    remat: bool = False
    start: str = "euler"
    history_at_entry: str = "restart"
    drop_path_rates: tuple[float, ...] = ()
    step_activation: Callable[[jnp.ndarray], jnp.ndarray] | None = None
    per_evaluation_stats: bool = True
    param_dtype: Any = jnp.float32

    def _validate(self) -> None:
        if not (isinstance(self.num_blocks, int) and self.num_blocks >= 1):
            raise ValueError(f"num_blocks={self.num_blocks!r}: must be an integer >= 1")
        if (self.entry_block is None) != (self.entry_shortcut is None):
            raise ValueError(
                "entry_block and entry_shortcut go together: a shape-changing block 0 needs the shortcut "
                f"S that maps x_0 to its output shape (got entry_block={self.entry_block!r}, "
                f"entry_shortcut={self.entry_shortcut!r})"
            )
        if self.start not in START_MODES:
            raise ValueError(f"start={self.start!r}: must be one of {START_MODES}")
        if self.history_at_entry not in HISTORY_MODES:
            raise ValueError(f"history_at_entry={self.history_at_entry!r}: must be one of {HISTORY_MODES}")
        rates = tuple(self.drop_path_rates)
        if rates and len(rates) != self.num_blocks:
            raise ValueError(
                f"drop_path_rates has {len(rates)} entries; expected one per block (num_blocks={self.num_blocks})"
            )
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError(f"drop_path_rates={rates}: every rate must be in [0, 1)")

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, history: History | None = None, *, train: bool
    ) -> tuple[jnp.ndarray, History | None]:
        """Runs the stage.

        Args:
          x: `[batch, height, width, channels]` input `x_0`.
          history: the previous stage's history (multistep schemes), or None.
          train: BatchNorm batch statistics and drop path on.

        Returns:
          `(x_N, history)`: the output and the history to pass to the next stage (empty
          `History()` for one-step schemes).
        """
        self._validate()
        scheme = get_scheme(self.scheme)
        n = self.num_blocks
        has_entry = self.entry_block is not None
        drop_path = bool(self.drop_path_rates) and max(self.drop_path_rates) > 0.0

        knobs = SchemeKnobs(scheme, n, self.param_dtype, name="knobs")() if scheme.knobs else {}
        knobs = {name: value.astype(x.dtype) for name, value in knobs.items()}
        rates = jnp.asarray(self.drop_path_rates if drop_path else (0.0,) * n, jnp.float32)
        keys = jax.random.split(self.make_rng("dropout"), n) if (drop_path and train) else None

        def xs_at(i: int, first: Any) -> tuple[Any, ...]:
            return ({k: v[i] for k, v in knobs.items()}, rates[i], None if keys is None else keys[i], first)

        step_cls = nn.remat(SchemeStep) if self.remat else SchemeStep
        common = dict(scheme=scheme, train=train, start=self.start, drop_path=drop_path,
                      step_activation=self.step_activation, per_evaluation_stats=self.per_evaluation_stats)

        index = 0
        if has_entry:
            incoming = history if self.history_at_entry == "project" else None
            entry = step_cls(block=self.entry_block, shortcut=self.entry_shortcut, name="entry", **common)
            (x, history), _ = entry((x, incoming), xs_at(0, incoming is None))
            index = 1

        num_identical = n - index
        if num_identical == 0:
            return x, history
        # Block `index` is the very first step of the stage when nothing came before it.
        starts_here = history is None
        if history is None:
            history = scheme.empty_history(x)

        if self.tied:
            # One module, used at every step. During init (and when unrolled) it is simply called
            # N times; under scan its params are broadcast and its BatchNorm statistics carried.
            if self.is_initializing() or not self.scan:
                tied = step_cls(block=self.block, name="tied_block", **common)
                carry = (x, history)
                for i in range(num_identical):
                    carry, _ = tied(carry, xs_at(index + i, starts_here and i == 0))
                return carry
            stats_mutable = self.is_mutable_collection("batch_stats")
            scanned = nn.scan(
                step_cls,
                variable_broadcast=["params"] if stats_mutable else ["params", "batch_stats"],
                variable_carry=["batch_stats"] if stats_mutable else [],
                split_rngs={"params": False, "dropout": True},
                length=num_identical,
            )
            body = scanned(block=self.block, name="tied_block", **common)
        elif self.scan:
            scanned = nn.scan(
                step_cls,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True, "dropout": True},
                length=num_identical,
            )
            body = scanned(block=self.block, name="blocks", **common)
        else:
            carry = (x, history)
            for i in range(num_identical):
                step = step_cls(block=self.block, name=f"blocks_{i}", **common)
                carry, _ = step(carry, xs_at(index + i, starts_here and i == 0))
            return carry

        stacked_xs = (
            {k: v[index:] for k, v in knobs.items()},
            rates[index:],
            None if keys is None else keys[index:],
            (jnp.arange(num_identical) == 0) if starts_here else None,
        )
        carry, _ = body((x, history), stacked_xs)
        return carry


# ------------------------------------------------------------------------------ param layouts

_UNROLLED = re.compile(r"^blocks_(\d+)$")


def stack_unrolled(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Converts variables of unrolled stages (`blocks_0 .. blocks_{M-1}`) to the scanned layout
    (`blocks`, every leaf stacked on a new leading axis). Works on any collection and nesting."""
    out: dict[str, Any] = {}
    unrolled: dict[int, Any] = {}
    for key, value in tree.items():
        match = _UNROLLED.match(key)
        if match:
            unrolled[int(match.group(1))] = value
        else:
            out[key] = stack_unrolled(value) if isinstance(value, Mapping) else value
    if unrolled:
        if sorted(unrolled) != list(range(len(unrolled))):
            raise ValueError(f"unrolled blocks {sorted(unrolled)} are not numbered 0..{len(unrolled) - 1}")
        parts = [stack_unrolled(unrolled[i]) if isinstance(unrolled[i], Mapping) else unrolled[i]
                 for i in range(len(unrolled))]
        out["blocks"] = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *parts)
    return out


def unstack_scanned(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `stack_unrolled`: splits every `blocks` subtree along its leading axis."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "blocks" and isinstance(value, Mapping):
            leaves = jax.tree_util.tree_leaves(value)
            count = int(leaves[0].shape[0])
            for i in range(count):
                out[f"blocks_{i}"] = unstack_scanned(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], value))
        else:
            out[key] = unstack_scanned(value) if isinstance(value, Mapping) else value
    return out


def knob_values(params: Mapping[str, Any], scheme: Scheme | str) -> dict[str, dict[str, np.ndarray]]:
    """The learned knob values of every stage: `{stage_path: {knob_name: values [num_blocks]}}`.

    `params` is a model's `params` collection; stages are found by their `knobs` subtree and
    listed in parameter-tree order (creation order, i.e. stage order). Reparametrized knobs are
    mapped to their values.
    """
    scheme = get_scheme(scheme)
    found: dict[str, dict[str, np.ndarray]] = {}

    def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if not isinstance(value, Mapping):
                continue
            if key == "knobs" and all(name in value for name in scheme.knob_names):
                found["/".join(path)] = {
                    knob.name: np.asarray(knob.to_value(jnp.asarray(value[knob.name]))) for knob in scheme.knobs
                }
            else:
                visit(value, path + (key,))

    visit(params, ())
    return found


__all__ = [
    "HISTORY_MODES",
    "ODEStage",
    "SchemeKnobs",
    "SchemeStep",
    "knob_values",
    "linear_drop_path_rates",
    "stack_unrolled",
    "unstack_scanned",
]
