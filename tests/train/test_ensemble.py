"""Ensembles (`cnn.train.ensemble`): M members in one program equal M single runs.

Tolerance: member and single run execute the same float32 arithmetic, except that XLA may sum
the vmapped reductions (BatchNorm statistics, dense layers, convolutions not run per member) in
another order (~1 ulp, 6e-8 relative). Over 30 SGD steps on digits the largest parameter
difference measured was 2.4e-7 (2 ulps at |w| ~ 1); the bound 1e-5 allows ~40x that. A depth-8
ResNet after 10 steps (2 members): 1.2e-7 and 1.9e-7 with the CPU's per-member convolutions;
with JAX's grouped ones 1.8e-7 and 1.9e-3 (rounding differences grow chaotically, so whether
a member drifts is luck; the grouped form is ruled out structurally in tests/ops/test_conv.py).
Metrics (accuracy) must agree exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import cnn.train
from cnn.data import BatchIterator
from cnn.train import ensemble
from tests.train.helpers import digits_datasets, flat_leaves, read_metrics, tiny_config

STEPS = 30
ATOL = 1e-5


def _config(size: int = 3, data: str = "per_member", **overrides):
    config = tiny_config(**{"num_train_steps": STEPS, **overrides})
    config.ensemble.size = size
    config.ensemble.data = data
    return config


def _assert_close(a, b, atol=ATOL):
    for x, y in zip(flat_leaves(a), flat_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def per_member(tmp_path_factory):
    """A 3-member ensemble with per-member data and augmentation (random flips), seeds 0, 1, 2."""
    return cnn.train.fit(_config(augment="random_flip"), tmp_path_factory.mktemp("ensemble"), datasets=digits_datasets)


def test_per_member_ensemble_equals_three_single_runs(per_member, tmp_path):
    assert np.shape(per_member.state.step) == (3,)
    for index in range(3):
        single = cnn.train.fit(tiny_config(num_train_steps=STEPS, augment="random_flip", seed=index),
                               tmp_path / str(index), datasets=digits_datasets)
        _assert_close(ensemble.member(per_member.state, index).params, single.state.params)
        _assert_close(ensemble.member(per_member.state, index).batch_stats, single.state.batch_stats)
        assert per_member.final_eval["members"][index]["accuracy"] == single.final_eval["accuracy"]
        # metrics.jsonl: the member's rows equal the single run's (up to the member field and rounding)
        rows = [r for r in read_metrics(per_member.workdir) if r.get("member") == index]
        singles = read_metrics(single.workdir)
        assert [r["step"] for r in rows] == [r["step"] for r in singles]
        for got, want in zip(rows, singles):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (index, key)


def test_ensemble_results_hold_every_member_the_mean_and_the_spread(per_member):
    results = json.loads((per_member.workdir / "results.json").read_text())
    accuracies = [m["accuracy"] for m in results["final_eval"]["members"]]
    assert len(accuracies) == 3
    assert results["final_eval"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert results["final_eval"]["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    assert [m["seed"] for m in results["members"]] == [0, 1, 2]
    for row in results["members"]:  # the step of each member's best test accuracy
        evals = [r for r in read_metrics(per_member.workdir) if r.get("member") == row["member"] and "eval/accuracy" in r]
        assert row["eval/accuracy"] == max(r["eval/accuracy"] for r in evals)


def test_an_extracted_member_is_an_ordinary_state(per_member):
    one = ensemble.member(per_member.state, 2)
    result = cnn.train.evaluate(one, digits_datasets("test", batch_size=128, shuffle=False, num_epochs=1,
                                                     drop_remainder=False))
    assert result["accuracy"] == per_member.final_eval["members"][2]["accuracy"]
    with pytest.raises(IndexError, match="member index 3 is outside the ensemble of 3 members"):
        ensemble.member(per_member.state, 3)


def test_shared_data_members_equal_single_runs_on_the_first_seeds_batches(tmp_path):
    shared = cnn.train.fit(_config(size=2, data="shared", seed=5), tmp_path / "shared", datasets=digits_datasets)
    for index, seed in enumerate((5, 6)):
        single = cnn.train.fit(tiny_config(num_train_steps=STEPS, seed=seed, data_seed=5), tmp_path / str(seed),
                               datasets=digits_datasets)
        _assert_close(ensemble.member(shared.state, index).params, single.state.params)
        assert shared.final_eval["members"][index]["accuracy"] == single.final_eval["accuracy"]


def _resnet_config(**overrides):
    """A depth-8 CIFAR ResNet: its stride-1 convolutions are the package's (`cnn.ops.conv`),
    which an ensemble runs once per member on CPU instead of as one grouped convolution."""
    config = _config(**{"num_train_steps": 10, "log_every_steps": 5, "eval_every_steps": 10, **overrides})
    config.model = "cifar_resnet"
    config.model_options = {"depth": 8, "width": 4}
    return config


def test_resnet_members_equal_single_runs_on_one_and_on_eight_devices(tmp_path):
    """8 members on one device and sharded over 8 CPU devices (one member each, the per-member
    convolutions under a member-sharded jit) agree, and members 0 and 7 equal their single runs."""
    one = cnn.train.fit(_resnet_config(size=8), tmp_path / "one", datasets=digits_datasets)
    eight = cnn.train.fit(_resnet_config(size=8, parallelism="sharded"), tmp_path / "eight", datasets=digits_datasets)
    _assert_close(one.state.params, eight.state.params)
    assert [m["accuracy"] for m in one.final_eval["members"]] == [m["accuracy"] for m in eight.final_eval["members"]]
    for index in (0, 7):
        single = cnn.train.fit(_resnet_config(size=1, seed=index), tmp_path / str(index), datasets=digits_datasets)
        _assert_close(ensemble.member(one.state, index).params, single.state.params)
        _assert_close(ensemble.member(one.state, index).batch_stats, single.state.batch_stats)
        assert one.final_eval["members"][index]["accuracy"] == single.final_eval["accuracy"]


def test_size_one_is_the_single_run_bit_for_bit(tmp_path):
    plain = cnn.train.fit(tiny_config(num_train_steps=10), tmp_path / "plain", datasets=digits_datasets)
    one = cnn.train.fit(_config(size=1, num_train_steps=10), tmp_path / "one", datasets=digits_datasets)
    for a, b in zip(flat_leaves(plain.state), flat_leaves(one.state)):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(tmp_path / "plain") == read_metrics(tmp_path / "one")


class Interrupt(Exception):
    pass


def test_interrupted_ensemble_resumes_bit_identically(tmp_path):
    config = _config(size=2, augment="random_flip", **{"checkpoint.every_steps": 10})

    def stop(step, state):
        if step == 17:
            raise Interrupt

    with pytest.raises(Interrupt):
        cnn.train.fit(config, tmp_path / "resumed", datasets=digits_datasets, callbacks=[stop])
    resumed = cnn.train.fit(config, tmp_path / "resumed", datasets=digits_datasets)
    straight = cnn.train.fit(config, tmp_path / "straight", datasets=digits_datasets)
    for a, b in zip(flat_leaves(resumed.state), flat_leaves(straight.state)):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "straight")


def test_members_sharded_over_eight_devices_equal_one_device(tmp_path):
    one = cnn.train.fit(_config(size=8, num_train_steps=10), tmp_path / "one", datasets=digits_datasets)
    eight = cnn.train.fit(_config(size=8, num_train_steps=10, parallelism="sharded"), tmp_path / "eight",
                          datasets=digits_datasets)
    _assert_close(one.state.params, eight.state.params)
    assert [m["accuracy"] for m in one.final_eval["members"]] == [m["accuracy"] for m in eight.final_eval["members"]]


def test_a_member_that_diverges_is_named(tmp_path):
    def datasets(split, *, batch_size, seed=0, **kwargs):
        iterator = digits_datasets(split, batch_size=batch_size, seed=seed, **kwargs)
        if split == "train" and seed == 1:  # member 1's images are NaN
            arrays = {k: np.asarray(v) for k, v in iterator.source.items()} if isinstance(iterator.source, dict) else None
            arrays["image"] = np.full(arrays["image"].shape, np.nan, np.float32)
            return BatchIterator(arrays, batch_size, seed=seed, **kwargs)
        return iterator

    with pytest.raises(cnn.train.NonFiniteLossError, match=r"of ensemble member 1 \(seed 1\) is nan") as info:
        cnn.train.fit(_config(size=3), tmp_path, datasets=datasets)
    assert info.value.member == 1 and info.value.step == 1


def test_bad_ensemble_settings_name_the_field(tmp_path):
    for overrides, message in (
        ({"ensemble.size": 0}, r"config.ensemble.size must be >= 1"),
        ({"ensemble.seeds": (1, 2), "ensemble.size": 3}, r"has 2 seeds but config.ensemble.size=3"),
        ({"ensemble.data": "mixed", "ensemble.size": 2}, r"config.ensemble.data='mixed'"),
        ({"ensemble.size": 3, "parallelism": "sharded", "ensemble.shard": "member"}, r"3 members to split over the 8"),
        ({"ensemble.size": 2, "parallelism": "pmap"}, r"'pmap' does not train ensembles"),
    ):
        with pytest.raises(ValueError, match=message):
            cnn.train.fit(tiny_config(**overrides), tmp_path, datasets=digits_datasets)
