"""Learned integrators of an ODE: one residual MLP field per scheme, fitted to sampled trajectories.

A residual step `x_{t+1} = x_t + h F(x_t)` is forward Euler for `x' = F(x)`. Here the network IS
the integrator (`cnn.models.dynamics`, "mlp_integrator"): one residual function `F_theta` shared
by every step, stepped by a scheme with `h = dt`, trained by `cnn.train.fit` with the dynamics
task (`cnn.tasks.dynamics`) on teacher-forced one-step (or short multi-step) windows of pendulum
(or Lotka-Volterra) trajectories. Reported per scheme: one-step RMSE and rollout error against
the true test trajectories (the task's evaluation), the error of the conserved quantity
(pendulum energy), how far the learned field is from the true one, and a rollout with the learned
`F` at a smaller step. Plots: trajectories, phase portraits, error growth, training loss.

Multistep schemes need a past. With `config.start = "data"` (default) the true past states seed
the history, so a one-step target really is one step of the scheme's own formula; rollouts start
from the true `x_0 .. x_c` for every scheme alike (`c` the longest past any compared scheme
keeps). `"euler"` / `"copy"` use the scheme's own start rule from `x_0` alone.

Run directory: `results.md`, `results.csv`, `results.json`, `config.json`, `plots/*.png`, and one
`cnn.train.fit` run directory per scheme (`<workdir>/<scheme>/`, resumable).

    python -m experiments.dynamics_ode --config=experiments/configs/dynamics_ode.py --workdir=runs/dynamics_ode
    python -m experiments.dynamics_ode --config=experiments/configs/dynamics_ode.py:tiny --workdir=runs/dyn_tiny
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn import models
from cnn.data import synthetic
from cnn.models.dynamics import field_variables, history_length
from cnn.ode import Scheme, get_scheme, implicit_scheme_label, implicit_solve_stats, knob_values, summarize_implicit_solve
from cnn.tasks import dynamics as dynamics_task
from cnn.train import fit
from experiments import dynamics_common as common
from experiments import grid
from experiments.dynamics_common import plt  # pyplot with the Agg backend

SYSTEMS = ("pendulum", "lotka_volterra")


@dataclasses.dataclass(frozen=True)
class System:
    """An autonomous ODE with its data generator.

    Attributes:
      name: "pendulum" or "lotka_volterra".
      state_names: names of the state components, e.g. ("theta", "omega").
      invariant_name: what `invariant` measures ("energy" for the pendulum).
      vector_field: `f(x)`, `[..., d] -> [..., d]` (numpy or JAX arrays).
      invariant: `[..., d] -> [...]`, conserved along exact trajectories when undamped.
      options: the generator options in use (all of them, defaults filled in).
    """

    name: str
    state_names: tuple[str, ...]
    invariant_name: str
    vector_field: Callable[[Any], Any]
    invariant: Callable[[Any], Any]
    options: Mapping[str, Any]

    def generate(self, num_trajectories: int, num_steps: int, dt: float, seed: int) -> np.ndarray:
        """True trajectories, float64 `[num_trajectories, num_steps + 1, d]` (accurate RK4)."""
        return getattr(synthetic, self.name)(num_trajectories, num_steps, dt, seed=seed, **self.options)["states"]


def _xp(x: Any):
    return jnp if isinstance(x, jax.Array) else np


def make_system(name: str, options: Mapping[str, Any] | None = None) -> System:
    """The system `name` with generator `options` (keyword arguments of `cnn.data.synthetic.<name>`);
    the vector field and invariant use the generator's parameters (its defaults where unset).

    Raises:
      ValueError: unknown system, or an option the generator does not take.
    """
    if name not in SYSTEMS:
        raise ValueError(f"system={name!r} is not supported; valid: {list(SYSTEMS)}")
    signature = inspect.signature(getattr(synthetic, name))
    defaults = {p.name: p.default for p in signature.parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name not in ("seed", "initial_states")}
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"{name} options {unknown} are not options of cnn.data.synthetic.{name}; valid: {sorted(defaults)}"
        )
    full = {**defaults, **options}
    if name == "pendulum":
        nu2, damping = float(full["natural_frequency"]) ** 2, float(full["damping"])

        def field(x):
            return _xp(x).stack([x[..., 1], -nu2 * _xp(x).sin(x[..., 0]) - damping * x[..., 1]], axis=-1)

        def energy(x):
            return 0.5 * x[..., 1] ** 2 - nu2 * _xp(x).cos(x[..., 0])

        return System(name, ("theta", "omega"), "energy", field, energy, full)

    alpha, beta, gamma, delta = (float(full[k]) for k in ("alpha", "beta", "gamma", "delta"))

    def lv_field(x):
        prey, predator = x[..., 0], x[..., 1]
        return _xp(x).stack([alpha * prey - beta * prey * predator, delta * prey * predator - gamma * predator], -1)

    def lv_invariant(x):
        prey, predator = x[..., 0], x[..., 1]
        return delta * prey - gamma * _xp(x).log(prey) + beta * predator - alpha * _xp(x).log(predator)

    return System(name, ("prey", "predator"), "V", lv_field, lv_invariant, full)


def field_scale(scheme: Scheme, knobs: Mapping[str, float] | None = None) -> float:
    """`c` such that the scheme is a consistent discretization of `x' = c F(x)`.

    Runge-Kutta: `c = sum(b)` (1). Linear multistep `x_{t+1} = sum_j alpha_j x_{t-j} + h sum_j
    beta_j F(x_{t-j})` with `k` steps: `rho(z) = z^k - sum_j alpha_j z^{k-1-j}`, `sigma(1) =
    sum_j beta_j`, `c = sigma(1) / rho'(1)`; for LM-ResNet `c = 1 / (1 + k)`.
    """
    if scheme.kind == "runge_kutta":
        return float(sum(scheme.rk_b))
    coefficients = scheme.coefficients(knobs if knobs is not None else scheme.default_knobs())
    alpha = [float(a) for a in coefficients["alpha"]]
    beta = [float(b) for b in coefficients["beta"]]
    k = max(len(alpha), len(beta))
    rho_prime = k - sum(a * (k - 1 - j) for j, a in enumerate(alpha))
    return float(sum(beta) / rho_prime)


def learned_knobs(params: Mapping[str, Any], scheme: Scheme) -> dict[str, float]:
    """The integrator's scheme knobs `{name: value}` (one scalar each; empty without knobs)."""
    if not scheme.knobs:
        return {}
    (values,) = knob_values(params, scheme).values()
    return {name: float(np.asarray(v).reshape(-1)[0]) for name, v in values.items()}


def context_for(config: ml_collections.ConfigDict) -> int:
    """The common rollout start index `c`: the longest past of the compared schemes ("data"
    start), or 0 (the schemes' own start rules)."""
    if config.start != "data":
        return 0
    return max(history_length(spec.build()) for spec in common.specs(config).values())


def relative_l2(prediction: np.ndarray, truth: np.ndarray) -> float:
    """||prediction - truth|| / ||truth|| over everything; inf when the prediction blew up."""
    if not np.all(np.isfinite(prediction)):
        return math.inf
    return float(np.linalg.norm(prediction - truth) / np.linalg.norm(truth))


def ode_data(config: ml_collections.ConfigDict, system: System, context: int) -> dict[str, np.ndarray]:
    """`{"train": windows [n, context + 1 + horizon, d], "test": trajectories [n_test, context +
    rollout_steps + 1, d]}` (float64), test trajectories from `data_seed + 1`."""
    dt, seed = float(config.dt), int(config.data_seed)
    train = system.generate(int(config.num_train), int(config.train_steps_per_trajectory), dt, seed)
    test = system.generate(int(config.num_test), context + int(config.rollout_steps), dt, seed + 1)
    return {"train": dynamics_task.make_windows(train, context + 1 + int(config.train_horizon)), "test": test}


def evaluate_scheme(
    config: ml_collections.ConfigDict, system: System, model_options: Mapping[str, Any], params: Any,
    test: np.ndarray, context: int,
) -> dict[str, Any]:
    """Host-side measurements of a trained integrator: its rollout `[n, T, d]` of the test
    trajectories, the invariant along it, the learned field's error and (with `config.refine >
    1`) the rollout of the learned `F` at step `dt / refine`."""
    model = models.create("mlp_integrator", **model_options, context=context)
    scheme = get_scheme(model.scheme)
    variables = {"params": params}
    test32 = jnp.asarray(test, jnp.float32)
    rollout = np.asarray(jax.jit(lambda v, w: model.apply(v, w).rollout)(variables, test32), np.float64)
    truth = test[:, context + 1 :]
    finite = bool(np.all(np.isfinite(rollout)))
    with np.errstate(invalid="ignore", divide="ignore"):
        invariant = np.asarray(system.invariant(rollout))
    # nan when a prediction leaves the invariant's domain (Lotka-Volterra: a population <= 0)
    worst = np.max(np.abs(invariant - system.invariant(truth)), axis=1)
    invariant_error = float(np.mean(worst)) if finite else math.inf
    knobs = learned_knobs(params, scheme)
    scale = field_scale(scheme, knobs)
    states = test32[:, context:].reshape(-1, test.shape[-1])
    field = model.field(**dict(model.field_options))
    learned = np.asarray(field.apply(field_variables(params), states), np.float64)
    true_field = np.asarray(system.vector_field(np.asarray(states, np.float64)))
    measured = {
        "rollout": rollout, "errors": np.linalg.norm(rollout - truth, axis=-1), "invariant": invariant,
        "invariant_error": invariant_error, "knobs": knobs, "field_scale": scale,
        "field_relative_error": float(np.linalg.norm(scale * learned - true_field) / np.linalg.norm(true_field)),
        "refined_rollout_relative_l2": math.nan, "fine_errors": None,
        # an implicit step's solve on the test data's first steps: sweeps used and residual reached
        "implicit_solve": summarize_implicit_solve(
            implicit_solve_stats(model, variables, test32[:, : context + 2], train=True)) if scheme.is_implicit else {},
    }
    refine = int(config.get("refine", 0) or 0)
    if refine > 1:  # the same F with a smaller step: accurate only if F is (close to) the true field
        fine_start = "euler" if config.start == "data" else config.start
        fine = models.create("mlp_integrator", **{**model_options, "h": float(config.dt) / refine, "start": fine_start},
                             context=context)
        steps = refine * int(config.rollout_steps)
        rollout_fine = jax.jit(lambda v, past: fine.apply(v, past, steps, method="rollout"))
        fine_rollout = rollout_fine(variables, test32[:, : context + 1])
        fine_rollout = np.asarray(fine_rollout, np.float64)[:, refine - 1 :: refine]  # at the data times
        measured["refined_rollout_relative_l2"] = relative_l2(fine_rollout, truth)
        measured["fine_errors"] = np.linalg.norm(fine_rollout - truth, axis=-1)
    return measured


def run_ode(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains one integrator per scheme with `cnn.train.fit` (run directory `<workdir>/<scheme>`)
    and measures it. Returns `rows` (one dict per scheme) and what the plots need."""
    common.validate(config, "ode")
    refine = int(config.get("refine", 0) or 0)
    if refine < 0:
        raise ValueError(f"config.refine={refine}: must be >= 0 (0 or 1 skips the refined rollout)")
    system_options = config.system_options.get(config.system, None)
    system = make_system(config.system, system_options.to_dict() if system_options is not None else {})
    context = context_for(config)
    data = ode_data(config, system, context)
    datasets = dynamics_task.window_datasets(data)
    task = dynamics_task.dynamics(context=context)
    rows, curves = [], {}
    for scheme_name, spec in common.specs(config).items():
        model_options = {**common.model_scheme_options(spec), "h": float(config.dt), "start": config.start}
        train_config = common.fit_config(config, config.system, **model_options)
        result = fit(train_config, pathlib.Path(workdir) / scheme_name, task=task, datasets=datasets)
        measured = evaluate_scheme(config, system, train_config.model_options.to_dict(), result.state.params,
                                   data["test"], context)
        scheme = spec.build()
        evaluation = result.final_eval
        rows.append({
            "scheme": scheme_name, "order": scheme.order,
            "label": implicit_scheme_label(scheme, measured["implicit_solve"] or None),
            "evals_per_step": (round(measured["implicit_solve"]["mean_sweeps"], 1) if measured["implicit_solve"]
                               else scheme.evals_per_step),
            "knobs": measured["knobs"], "field_scale": measured["field_scale"],
            "train_loss": common.final_loss(result.train_history, result.steps),
            "one_step_rmse": evaluation["one_step_rmse"],
            "rollout_relative_l2": evaluation["rollout_relative_l2"],
            "rollout_final_error": evaluation["rollout_final_error"],
            "invariant_error": measured["invariant_error"],
            "field_relative_error": measured["field_relative_error"],
            "refined_rollout_relative_l2": measured["refined_rollout_relative_l2"],
            "train_seconds": result.seconds,
        })
        curves[scheme_name] = {**measured, "losses": common.loss_curve(result.train_history)}
    test = data["test"]
    return {"system": system, "context": context, "rows": rows, "curves": curves, "test": test,
            "true_invariant": np.asarray(system.invariant(test[:, context + 1 :]))}


def _panel_grid(count: int, width: float, height: float):
    columns = min(4, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, axes


def _save(fig, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_trajectories(results: Mapping[str, Any], config: ml_collections.ConfigDict, plots: pathlib.Path) -> list[str]:
    """trajectories.png (the widest-swinging test trajectory) and phase_portraits.png (a spread of sizes)."""
    system: System = results["system"]
    test, context, curves = results["test"], results["context"], results["curves"]
    times = float(config.dt) * np.arange(test.shape[1])
    amplitude = np.ptp(test[:, :, 0], axis=1)
    example = int(np.argmax(amplitude))
    by_size = np.argsort(amplitude)
    shown = by_size[np.unique(np.linspace(0, len(by_size) - 1, min(4, len(by_size))).round().astype(int))]

    fig, axes = _panel_grid(len(curves), 4, 3)
    for ax, (scheme, curve) in zip(axes.flat, curves.items()):
        for j, (state_name, colour) in enumerate(zip(system.state_names, ("C0", "C1"))):
            ax.plot(times, test[example, :, j], color=colour, lw=1.5, label=f"{state_name} true")
            ax.plot(times[context + 1 :], curve["rollout"][example, :, j], color=colour, ls="--", lw=1.2,
                    label=f"{state_name} learned")
        ax.set_title(scheme)
        ax.set_xlabel("t")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{system.name}: rollout of the learned integrator from the true start (dashed) vs truth")
    names = [_save(fig, plots / "trajectories.png")]

    fig, axes = _panel_grid(len(curves), 3.6, 3.4)
    for ax, (scheme, curve) in zip(axes.flat, curves.items()):
        for colour, i in enumerate(shown):
            ax.plot(test[i, :, 0], test[i, :, 1], color="0.6", lw=2.5)
            ax.plot(curve["rollout"][i, :, 0], curve["rollout"][i, :, 1], color=f"C{colour}", lw=1)
        ax.set_title(scheme)
        ax.set_xlabel(system.state_names[0])
        ax.set_ylabel(system.state_names[1])
    fig.suptitle(f"{system.name}: phase portraits, truth (grey) vs learned (colour)")
    return names + [_save(fig, plots / "phase_portraits.png")]


def plot_errors(results: Mapping[str, Any], config: ml_collections.ConfigDict, plots: pathlib.Path) -> str:
    """rollout_error.png: error growth, invariant error and (refined) the learned F at a smaller step."""
    system: System = results["system"]
    curves = results["curves"]
    rollout_times = float(config.dt) * np.arange(results["test"].shape[1])[results["context"] + 1 :]
    refined = all(curve["fine_errors"] is not None for curve in curves.values())
    fig, axes = plt.subplots(1, 3 if refined else 2, figsize=(16.5 if refined else 11, 4))
    panels = [("|x_pred - x_true| (mean over test trajectories)", "rollout error"),
              (f"|{system.invariant_name}_pred - {system.invariant_name}_true| (mean)",
               f"{system.invariant_name} error"),
              ("|x_pred - x_true| (mean)", f"learned F reused with h = dt/{config.get('refine', 0)}")]
    for scheme, curve in curves.items():
        axes[0].semilogy(rollout_times, curve["errors"].mean(axis=0), label=scheme)
        invariant_error = np.abs(curve["invariant"] - results["true_invariant"]).mean(axis=0)
        axes[1].semilogy(rollout_times, invariant_error, label=scheme)
        if refined:
            axes[2].semilogy(rollout_times, curve["fine_errors"].mean(axis=0), label=scheme)
    for ax, (ylabel, title) in zip(axes, panels):
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plots / "rollout_error.png")


def _listing(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    return ", ".join(f"{r['scheme']} {common.fmt(r[key], 1)}" for r in sorted(rows, key=lambda r: r[key]))


def ode_notes(results: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """What the table shows, from its own numbers (sorted lists, no verdict written in advance)."""
    rows = results["rows"]
    notes = [
        f"Rollout rel. L2 over {config.rollout_steps} steps, best first: {_listing(rows, 'rollout_relative_l2')}. "
        f"One-step RMSE: {_listing(rows, 'one_step_rmse')}.",
        f"Field rel. error, best first: {_listing(rows, 'field_relative_error')}.",
    ]
    if int(config.get("refine", 0) or 0) > 1:
        notes.append(f"Rollout rel. L2 with the learned F at h = dt/{config.refine}, best first: "
                     f"{_listing(rows, 'refined_rollout_relative_l2')}.")
    return notes


def ode_table(results: Mapping[str, Any], config: ml_collections.ConfigDict) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the results table."""
    system: System = results["system"]
    refine = int(config.get("refine", 0) or 0)
    header = ["scheme", "order", "F evals / step", "learned knobs", "one-step RMSE",
              f"rollout rel. L2 ({config.rollout_steps} steps)", "final-time error",
              f"max {system.invariant_name} error", "field rel. error"]
    header += ([f"rollout rel. L2, h = dt/{refine}"] if refine > 1 else []) + ["train loss", "train s"]
    rows = []
    for r in results["rows"]:
        knobs = ", ".join(f"{k}={v:+.3f}" for k, v in r["knobs"].items()) or "-"
        numbers = ["one_step_rmse", "rollout_relative_l2", "rollout_final_error", "invariant_error",
                   "field_relative_error"] + (["refined_rollout_relative_l2"] if refine > 1 else []) + ["train_loss"]
        rows.append([r.get("label", r["scheme"]), r["order"], r["evals_per_step"], knobs] + [common.fmt(r[k]) for k in numbers]
                    + [f"{r['train_seconds']:.1f}"])
    return header, rows


def report_body(results: Mapping[str, Any], config: ml_collections.ConfigDict, head: Sequence[str]) -> list[str]:
    """The text of results.md above the plots."""
    system: System = results["system"]
    train, refine = config.train, int(config.get("refine", 0) or 0)
    context = results["context"]
    options = ", ".join(f"{k}={v}" for k, v in sorted(system.options.items()))
    model = train.model_options
    return [
        f"# Learned integrators: {system.name}",
        "",
        f"- data: {config.num_train} training trajectories of {config.train_steps_per_trajectory} steps, "
        f"{config.num_test} test trajectories; dt = {config.dt:g} (= the scheme's step h); {options}",
        f"- model: residual MLP F(x) hidden {tuple(model.hidden)} ({model.activation}), one field shared over time "
        f"(tied); targets: {config.train_horizon}-step windows, start `{config.start}` (rollouts start from the true "
        f"{'x_0' if context == 0 else f'x_0..x_{context}'}); cnn.train.fit: {train.num_train_steps} steps of "
        f"{train.optimizer.name} lr {train.optimizer.learning_rate:g} ({train.optimizer.schedule}), batch "
        f"{train.batch_size} (epochs of shuffled windows), seed {train.seed}",
        *head,
        "",
        grid.markdown_table(*ode_table(results, config)),
        "",
        "Train loss: mean over the last 5% of steps. One-step RMSE: teacher-forced prediction of the next state on "
        f"the test trajectories. Rollout: {config.rollout_steps} steps ({config.rollout_steps * config.dt:g} time "
        "units) on the model's own predictions; relative L2 = ||X_pred - X_true|| / ||X_true|| over all test "
        "trajectories and times; final-time error = mean |x_pred - x_true| at the last step (these three: the "
        "dynamics task's evaluation in cnn.train.fit, float32); "
        f"max {system.invariant_name} error = mean over trajectories of the largest |{system.invariant_name}"
        f"(x_pred) - {system.invariant_name}(x_true)| along the rollout (undefined: a prediction left its domain, "
        "e.g. a population <= 0); diverged: the rollout overflowed. Field rel. error = ||c F_theta - f|| / ||f|| on "
        "the test states, where c = sigma(1)/rho'(1) makes the scheme a consistent discretization of x' = c F (1 "
        "for all but LM-ResNet, where c = 1/(1+k)): how close the learned residual function is to the true vector "
        "field. A scheme fitted to exact samples learns the field whose step reproduces the flow map; that field "
        "differs from f by O(h^order) (for Euler F = f + h/2 f'f + ...), so the field error is that plus the fit's "
        "own error."
        + (f" Rollout at h = dt/{refine}: the learned F reused with a {refine}x smaller step ({refine} x "
           f"{config.rollout_steps} steps, multistep schemes start with the Euler step, compared at the data "
           "times): it stays accurate only if F is close to the true field." if refine > 1 else "")
        + " train s: the wall time of `fit` (compilation, evaluations and checkpoints included).",
        "",
        "## What it shows",
        "",
        *[f"- {note}" for note in ode_notes(results, config)],
    ]


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, command: str = "") -> pathlib.Path:
    """Runs the ODE experiment and writes the report; returns the path of results.md."""
    workdir = common.start_run(config, pathlib.Path(workdir))
    started = time.perf_counter()
    results = run_ode(config, workdir)
    seconds = time.perf_counter() - started
    command = command or "python -m experiments.dynamics_ode"
    head = [f"- command: `{command}`", f"- machine: {grid.hardware()}; total {seconds:.0f} s"]
    plots = workdir / "plots"
    names = plot_trajectories(results, config, plots) + [plot_errors(results, config, plots)]
    losses = {scheme: curve["losses"] for scheme, curve in results["curves"].items()}
    names.append(common.plot_losses(losses, plots / "training_loss.png"))
    payload = {"experiment": "ode", "rows": results["rows"], "command": command, "machine": grid.hardware(),
               "seconds": seconds}
    return common.write_outputs(workdir, report_body(results, config, head), names, ode_table(results, config), payload)


def main(argv: Sequence[str]) -> None:
    # One training per scheme, nothing compiled twice: no compilation cache.
    grid.cli_main(argv, "experiments/configs/dynamics_ode.py", run, "experiments.dynamics_ode", compilation_cache=False)


if __name__ == "__main__":
    main(sys.argv)
