"""A grid cell trained with backward Euler records the residual and sweeps its implicit solve reached,
and the tables name the scheme by what the solve did ("backward_euler, 2 sweeps, residual 0.3")."""

import json

import jax
import numpy as np
import pytest

from cnn import models
from cnn.ode.stage import implicit_solve_stats
from cnn.tasks.transfer import load_run_variables
from cnn.train import loop
from cnn.train.task import classification
from experiments import ablations, compare_schemes, grid
from experiments.configs import ablations as ablations_config
from tests.experiments.test_compare_schemes import tiny_config as compare_schemes_tiny_config

BACKWARD_EULER = {"name": "backward_euler", "iterations": 2}


def tiny_config(seeds):
    """test_compare_schemes' tiny grid with Euler and two-sweep backward Euler at depth 14, 3 steps."""
    config = compare_schemes_tiny_config()
    config.schemes = ("euler", BACKWARD_EULER)
    config.depths = (14,)
    config.seeds = seeds
    train = config.train
    train.num_train_steps = 3
    train.eval_every_steps = 3
    train.log_every_steps = 3
    return config


def _cell(workdir, name):
    return json.loads((workdir / "cells" / name / "cell.json").read_text())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("implicit_single")
    config = tiny_config((0,))
    config.schemes = (BACKWARD_EULER,)  # one cell: trained alone (grid.run_cell)
    compare_schemes.run(config, workdir)
    return config, workdir


def test_a_backward_euler_cell_records_its_solve_measured_on_the_trained_network(single_run):
    config, workdir = single_run
    record = _cell(workdir, "backward_euler-d14-s0")["implicit_solve"]
    explicit = grid.requested_cell_config(grid.training_base(config), compare_schemes.cells(config)[0])
    explicit.model_options.scheme, explicit.model_options.scheme_options = "midpoint", {}
    assert grid.implicit_solve_record(explicit, state=None) is None  # explicit schemes: no record
    # Implicit steps counted by hand: depth 14 has 2 blocks per stage; stage 1's two blocks and
    # the second block of stages 2 and 3 (a stage's first block there is the shape-changing
    # transition, an explicit Euler step): 4 steps, each with 2 sweeps (no tolerance).
    assert record["steps"] == 4 and record["mode"] == "eval"
    sweeps = [s for block in record["blocks"].values() for s in block["sweeps"]]
    residuals = [r for block in record["blocks"].values() for r in block["residual"]]
    assert sweeps == [2, 2, 2, 2] and record["max_sweeps"] == 2
    assert all(0.0 < r < np.inf for r in residuals)
    assert record["max_residual"] == pytest.approx(max(residuals))
    # The record is the checkpointed network's (eval mode) on the first test batch.
    variables, stored = load_run_variables(workdir / "cells" / "backward_euler-d14-s0")
    task = classification(input_pool=int(stored["task_options"]["input_pool"]))
    batch = next(iter(loop.RunData(loop.resolve_config(stored), task, None).eval_batches()))
    inputs = task.model_input(task.prepare({k: jax.numpy.asarray(v) for k, v in task.select(batch).items()}))
    assert record["examples"] == inputs.shape[0]
    model = models.create("cifar_resnet", num_classes=10, **stored["model_options"])
    again = implicit_solve_stats(model, variables, inputs)
    np.testing.assert_allclose(sorted(residuals), sorted(np.concatenate([s["residual"] for s in again.values()])),
                               rtol=1e-5)


def test_the_table_names_backward_euler_by_its_sweeps_and_residual(single_run):
    config, workdir = single_run
    record = _cell(workdir, "backward_euler-d14-s0")["implicit_solve"]
    rows = (workdir / "results.csv").read_text().splitlines()
    expected = f"backward_euler, 2 sweeps, residual {record['max_residual']:.2g}"
    assert any(row.startswith(f'"{expected}",14,') for row in rows), rows
    assert f"| {expected} | 14 |" in (workdir / "results.md").read_text()


def test_ensemble_members_record_their_own_solve(tmp_path):
    config = tiny_config((0, 1))
    config.schemes = (BACKWARD_EULER,)  # two seeds: one ensemble program (grid.run_pack)
    compare_schemes.run(config, tmp_path)
    records = [_cell(tmp_path, f"backward_euler-d14-s{seed}")["implicit_solve"] for seed in (0, 1)]
    assert all(r["steps"] == 4 and r["max_sweeps"] == 2 for r in records)
    assert records[0]["max_residual"] != records[1]["max_residual"]  # two differently trained networks
    label = grid.scheme_label("backward_euler", grid.finished_summaries(compare_schemes.cells(config), tmp_path))
    assert label == f"backward_euler, 2 sweeps, residual {max(r['max_residual'] for r in records):.2g}"


def _summary(scheme, options, record=None):
    summary = {"config": {"model_options": {"scheme": scheme, "scheme_options": options}}}
    return {**summary, "implicit_solve": record} if record is not None else summary


def test_scheme_label_by_hand():
    record = {"max_residual": 0.3125, "mean_sweeps": 2.0, "max_sweeps": 2}
    two = {"iterations": 2}
    assert grid.scheme_label("lm", [_summary("lm", {})]) == "lm"
    assert grid.scheme_label("euler", [{"config": None}]) == "euler"
    assert grid.scheme_label("backward_euler", [_summary("backward_euler", two, record)]) == (
        "backward_euler, 2 sweeps, residual 0.31")
    # over seeds: the largest residual and sweeps; a cell without a record: not measured
    other = {"max_residual": 0.5, "mean_sweeps": 2.0, "max_sweeps": 2}
    assert grid.scheme_label("be", [_summary("backward_euler", two, record), _summary("backward_euler", two, other)]) == (
        "be, 2 sweeps, residual 0.5")
    assert grid.scheme_label("backward_euler", [_summary("backward_euler", two, record), _summary("backward_euler", two)]) == (
        "backward_euler, 2 sweeps, residual not measured")
    # a tolerance met in every cell: the name with the tolerance and the mean sweeps
    met = {"max_residual": 4e-4, "mean_sweeps": 5.5, "max_sweeps": 7}
    tolerance = {"iterations": 8, "tolerance": 1e-3}
    assert grid.scheme_label("backward_euler", [_summary("backward_euler", tolerance, met)]) == (
        "backward_euler (residual <= 0.001, 5.5 sweeps)")
    missed = {"max_residual": 0.02, "mean_sweeps": 8.0, "max_sweeps": 8}
    assert grid.scheme_label("backward_euler", [_summary("backward_euler", tolerance, met),
                                                _summary("backward_euler", tolerance, missed)]) == (
        "backward_euler, 8 sweeps, residual 0.02")


def test_ablation_table_names_an_implicit_variant_by_its_solve():
    config = ablations_config.get_config()
    record = {"max_residual": 0.25, "mean_sweeps": 2.0, "max_sweeps": 2}
    summaries = []
    for name, options in (("euler", {"scheme": "euler"}),
                          ("be2", {"scheme": "backward_euler", "scheme_options": {"iterations": 2}})):
        for seed in (0, 1):
            summaries.append({
                "name": f"{name}-s{seed}", "group": name, "labels": {"variant": name, "knob": "k", "seed": seed},
                "params": 10, "test_accuracy": 0.9 + 0.01 * seed, "test_loss": 0.1, "train_loss": 0.1,
                "seconds_per_step": 0.1, "seconds_to_first_step": 1.0, "config": {"model_options": options},
                **({"implicit_solve": record} if name == "be2" else {}),
            })
    _, rows, _ = ablations.table_rows(config, grid.group_stats(summaries), summaries)
    assert [row[1] for row in rows] == ["euler", "be2, 2 sweeps, residual 0.25"]
