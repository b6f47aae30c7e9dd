"""experiments/stats.py against scipy.stats, hand-worked Holm steps, Monte Carlo simulations of
power and chance flags, and networks built both ways for the Euler-identical cells."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import stats as scipy_stats

from cnn import models
from experiments import stats

# Hand-made paired samples (accuracies of 8 seeds); differences a - b:
# +0.010, +0.015, -0.004, +0.021, +0.008, +0.000, +0.012, +0.003
A = np.array([0.912, 0.905, 0.899, 0.921, 0.910, 0.903, 0.915, 0.908])
B = np.array([0.902, 0.890, 0.903, 0.900, 0.902, 0.903, 0.903, 0.905])


def binomial_tolerance(p: float, trials: int, sigmas: float = 4.0) -> float:
    """`sigmas` binomial standard errors of a rate p estimated from `trials` draws."""
    return sigmas * math.sqrt(p * (1 - p) / trials)


# ------------------------------------------------------------------------------- paired t-test


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_paired_difference_matches_scipy_ttest_rel_and_t_interval(confidence):
    result = stats.paired_difference(A, B, confidence=confidence)
    reference = scipy_stats.ttest_rel(A, B)
    d = A - B
    assert result.n == 8
    np.testing.assert_allclose(result.mean, 0.008125, rtol=1e-12)  # 0.065 / 8 by hand
    np.testing.assert_allclose(result.sd, np.std(d, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(result.standard_error, scipy_stats.sem(d), rtol=1e-12)
    np.testing.assert_allclose(result.t_statistic, reference.statistic, rtol=1e-12)
    np.testing.assert_allclose(result.p_value, reference.pvalue, rtol=1e-10)
    low, high = scipy_stats.t.interval(confidence, 7, loc=d.mean(), scale=scipy_stats.sem(d))
    np.testing.assert_allclose([result.ci_low, result.ci_high], [low, high], rtol=1e-12)
    scipy_ci = reference.confidence_interval(confidence)
    np.testing.assert_allclose([result.ci_low, result.ci_high], [scipy_ci.low, scipy_ci.high], rtol=1e-12)
    assert result.differences == pytest.approx(tuple(d))


def test_paired_difference_is_antisymmetric_and_pairs_by_position():
    forward = stats.paired_difference(A, B)
    backward = stats.paired_difference(B, A)
    assert backward.mean == pytest.approx(-forward.mean)
    assert backward.t_statistic == pytest.approx(-forward.t_statistic)
    assert backward.p_value == pytest.approx(forward.p_value)
    assert (backward.ci_low, backward.ci_high) == pytest.approx((-forward.ci_high, -forward.ci_low))
    # Unpaired (Welch) would ignore the pairing; the paired test must differ from it on these data.
    assert forward.p_value != pytest.approx(scipy_stats.ttest_ind(A, B, equal_var=False).pvalue, rel=1e-3)


def test_paired_difference_degenerate_cases():
    empty = stats.paired_difference([], [])
    assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.p_value)

    one = stats.paired_difference([0.91], [0.90])
    assert one.n == 1 and one.mean == pytest.approx(0.01)
    assert all(math.isnan(v) for v in (one.sd, one.standard_error, one.t_statistic, one.p_value, one.ci_low,
                                       one.bootstrap_high))

    constant = stats.paired_difference([0.92, 0.93, 0.94], [0.91, 0.92, 0.93])  # d = 0.01 three times
    scipy_constant = scipy_stats.ttest_rel([0.92, 0.93, 0.94], [0.91, 0.92, 0.93])
    assert constant.sd == 0.0 and constant.standard_error == 0.0
    assert constant.t_statistic == math.inf and constant.p_value == 0.0
    # scipy: the same verdict up to float noise in 0.92 - 0.91 vs 0.93 - 0.92 (huge t, p ~ 0)
    assert abs(scipy_constant.statistic) > 1e10 and scipy_constant.pvalue < 1e-10
    assert (constant.ci_low, constant.ci_high) == pytest.approx((0.01, 0.01))
    assert (constant.bootstrap_low, constant.bootstrap_high) == pytest.approx((0.01, 0.01))

    same = stats.paired_difference([0.9, 0.8], [0.9, 0.8])
    assert (same.mean, same.t_statistic, same.p_value) == (0.0, 0.0, 1.0)
    assert (same.ci_low, same.ci_high) == (0.0, 0.0)

    with pytest.raises(ValueError, match="a has 2 values and b has 3"):
        stats.paired_difference([1, 2], [1, 2, 3])


def test_bootstrap_interval_is_deterministic_and_near_the_t_interval_on_normal_data():
    generator = np.random.default_rng(7)
    n = 30
    b = generator.normal(0.90, 0.02, n)
    a = b + generator.normal(0.005, 0.01, n)
    first = stats.paired_difference(a, b, rng=3)
    assert stats.paired_difference(a, b, rng=3) == first  # seeded: identical
    other = stats.paired_difference(a, b, rng=4)
    assert (other.bootstrap_low, other.bootstrap_high) != (first.bootstrap_low, first.bootstrap_high)
    # For normal differences the percentile interval is about mean +- z * sd_ml / sqrt(n), the t
    # interval mean +- t_{n-1} * sd / sqrt(n): half-widths in the ratio
    # 1.960 * sqrt(29/30) / 2.045 = 0.94. Allow that 6% plus 9% for resampling and sample skew.
    half = (first.ci_high - first.ci_low) / 2
    assert first.bootstrap_low < first.mean < first.bootstrap_high
    assert abs(first.bootstrap_low - first.ci_low) < 0.15 * half
    assert abs(first.bootstrap_high - first.ci_high) < 0.15 * half


# ------------------------------------------------------------------------------------------ Holm


def test_holm_hand_worked_example():
    # p = (0.01, 0.04, 0.03, 0.005), m = 4, alpha = 0.05. Sorted: 0.005 (H4), 0.01 (H1),
    # 0.03 (H3), 0.04 (H2); multiplied by m - j + 1 = 4, 3, 2, 1: 0.020, 0.030, 0.060, 0.040;
    # running maximum (monotone adjusted p): 0.020, 0.030, 0.060, 0.060.
    # Step-down: 0.005 <= 0.05/4 reject H4; 0.01 <= 0.05/3 reject H1; 0.03 > 0.05/2 stop:
    # H3 and H2 are kept (H2's own 0.04 <= 0.05/1 does not matter after the stop).
    result = stats.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert result.adjusted == pytest.approx((0.03, 0.06, 0.06, 0.02))
    assert result.rejected == (True, False, False, True)


def test_holm_clips_at_one_ignores_nan_and_is_monotone():
    # p = (0.5, 0.6): 2 * 0.5 = 1.0 -> 1.0; 1 * 0.6 = 0.6 -> running max 1.0.
    assert stats.holm([0.5, 0.6]).adjusted == pytest.approx((1.0, 1.0))
    # nan is no comparison: m = 2 here, so 0.02 -> 0.04 (rejected), 0.04 -> max(0.04, 0.04).
    result = stats.holm([0.02, float("nan"), 0.04])
    assert result.adjusted[0] == pytest.approx(0.04) and result.adjusted[2] == pytest.approx(0.04)
    assert math.isnan(result.adjusted[1]) and result.rejected == (True, False, True)
    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    adjusted = np.array(stats.holm(p).adjusted)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p)
    with pytest.raises(ValueError, match="p_values"):
        stats.holm([0.1, 1.5])


def test_chance_flags_match_a_simulation_of_independent_null_tests():
    k, alpha, trials = 5, 0.05, 20_000
    p = np.random.default_rng(11).uniform(size=(trials, k))
    rejected = np.array([stats.holm(row, alpha).rejected for row in p]).sum(axis=1)
    holm_flags = stats.chance_flags(k, alpha, "holm")
    any_rate = float(np.mean(rejected > 0))
    assert abs(any_rate - holm_flags.probability_any) < binomial_tolerance(holm_flags.probability_any, trials)
    # E[#flags] within 4 standard errors of the simulated mean
    assert abs(rejected.mean() - holm_flags.expected) < 4 * rejected.std() / math.sqrt(trials)
    assert holm_flags.probability_any <= alpha < holm_flags.expected < 1.1 * alpha
    none = stats.chance_flags(k, alpha, "none")
    assert none.expected == pytest.approx(k * alpha)
    uncorrected = (p <= alpha).sum(axis=1)
    assert abs(uncorrected.mean() - none.expected) < 4 * uncorrected.std() / math.sqrt(trials)
    assert none.probability_any == pytest.approx(1 - (1 - alpha) ** k)
    # k = 2 by hand: P(V >= 1) = 1 - (1 - a/2)^2; P(V >= 2) = P(both <= a) - P(both in (a/2, a]) = a^2 - a^2/4
    two = stats.chance_flags(2, alpha, "holm")
    assert two.expected == pytest.approx(1 - (1 - alpha / 2) ** 2 + 0.75 * alpha**2, rel=1e-12)


# ----------------------------------------------------------------------------------------- power


@pytest.mark.parametrize("n, comparisons", [(8, 1), (5, 4)])
def test_minimum_detectable_difference_has_the_stated_power_in_simulation(n, comparisons):
    sd, trials, power = 0.01, 4000, 0.8
    delta = stats.minimum_detectable_difference(sd, n, alpha=0.05, power=power, comparisons=comparisons)
    generator = np.random.default_rng(n * 100 + comparisons)
    b = generator.normal(0.9, 0.02, size=(trials, n))  # shared seed effect: cancels in the pairs
    a = b + generator.normal(delta, sd, size=(trials, n))
    p = scipy_stats.ttest_rel(a, b, axis=1).pvalue
    rate = float(np.mean(p <= 0.05 / comparisons))
    assert abs(rate - power) < binomial_tolerance(power, trials)  # 4 SE = 0.025
    # at 70% of the MDD the power must be clearly lower
    a_small = b + generator.normal(0.7 * delta, sd, size=(trials, n))
    assert np.mean(scipy_stats.ttest_rel(a_small, b, axis=1).pvalue <= 0.05 / comparisons) < power - 0.1


def test_power_formula_limits():
    # no difference: power is the level; large n: the normal approximation (z_{1-a/2} + z_power) sd / sqrt(n)
    assert stats.paired_power(0.0, 1.0, 10, alpha=0.05) == pytest.approx(0.05, rel=1e-9)
    normal = (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) / math.sqrt(400)
    assert stats.minimum_detectable_difference(1.0, 400) == pytest.approx(normal, rel=0.005)
    assert stats.minimum_detectable_difference(1.0, 400) > normal  # t tails are heavier
    assert stats.minimum_detectable_difference(2.0, 8) == pytest.approx(2 * stats.minimum_detectable_difference(1.0, 8))
    assert stats.minimum_detectable_difference(1.0, 1) == math.inf
    assert stats.minimum_detectable_difference(0.0, 8) == 0.0
    with pytest.raises(ValueError, match="power=0.01"):
        stats.minimum_detectable_difference(1.0, 8, power=0.01)


# ------------------------------------------------------------------------------------ table rows


def test_compare_to_reference_pairs_by_seed_and_corrects_over_the_table():
    accuracies = {
        "euler": {0: 0.900, 1: 0.910, 2: 0.920, 3: 0.930, 4: 0.900},
        "lm": {0: 0.910, 1: 0.916, 2: 0.930, 3: 0.940, 5: 0.990},  # seed 5 has no partner, 4 missing
        "rk2": {0: 0.890, 1: 0.902, 2: 0.913, 3: 0.920, 4: 0.891},
        "heun": {0: 0.901, 1: 0.909, 2: 0.921, 3: 0.929, 4: 0.901},
    }
    result = stats.compare_to_reference(accuracies, "euler", identical=["ab2"], n_bootstrap=2000)
    rows = {row.candidate: row for row in result.rows}
    assert [row.candidate for row in result.rows] == ["lm", "rk2", "heun", "ab2"]
    lm = rows["lm"]
    assert lm.seeds == (0, 1, 2, 3) and lm.unpaired_seeds == (4, 5)
    # lm - euler on seeds 0-3: 0.010, 0.006, 0.010, 0.010 -> mean 0.009
    assert lm.difference.mean == pytest.approx(0.009)
    assert lm.candidate_mean == pytest.approx(0.924) and lm.reference_mean == pytest.approx(0.915)
    raw = {name: scipy_stats.ttest_rel([accuracies[name][s] for s in rows[name].seeds],
                                       [accuracies["euler"][s] for s in rows[name].seeds]).pvalue
           for name in ("lm", "rk2", "heun")}
    expected = stats.holm([raw["lm"], raw["rk2"], raw["heun"]])
    assert [lm.p_holm, rows["rk2"].p_holm, rows["heun"].p_holm] == pytest.approx(list(expected.adjusted))
    assert lm.flag == "better" and rows["rk2"].flag == "worse" and rows["heun"].flag == "none"
    assert rows["ab2"].flag == "identical" and math.isnan(rows["ab2"].p_holm) and rows["ab2"].difference is None
    assert result.family_size == 3  # the identical cell is not a comparison
    # MDD: 80% power at the family's Bonferroni level 0.05 / 3 with the row's own sd and n
    heun = rows["heun"]
    assert heun.mdd == pytest.approx(
        stats.minimum_detectable_difference(heun.difference.sd, 5, alpha=0.05, power=0.8, comparisons=3))
    header, body = result.table()
    assert len(header) == len(body[0]) and len(body) == 4
    assert body[0][3] == "+0.90" and body[3][7] == "identical"
    notes = " ".join(result.notes())
    assert "lm is better than euler by 0.90 points" in notes and "seeds [4, 5] lack a partner" in notes
    assert "ab2 = euler" in notes and "probability <= 0.05" in notes


def test_compare_paired_handles_tuple_keys_and_single_seeds():
    accuracies = {("lm", 20): {0: 0.91, 1: 0.92, 2: 0.925}, ("euler", 56): {0: 0.905, 1: 0.921, 2: 0.92},
                  ("rk2", 20): {0: 0.9}}
    result = stats.compare_paired(accuracies, [(("lm", 20), ("euler", 56)), (("rk2", 20), ("euler", 56))])
    assert result.rows[1].flag == "n/a" and result.rows[1].mdd == math.inf
    assert result.family_size == 1
    # one tested row: Holm leaves its p-value unchanged
    assert result.rows[0].p_holm == pytest.approx(result.rows[0].difference.p_value)
    with pytest.raises(ValueError, match="no accuracies for 'missing'"):
        stats.compare_paired(accuracies, [("missing", ("euler", 56))])


# ---------------------------------------------------------------------------- Euler-identical cells


def test_euler_identical_cells_detected_from_the_scheme_rule():
    one, two = 1, 2  # blocks per stage: depth 8 and depth 14
    for name in ("euler", "lm", "ab2", "leapfrog", "two_step"):
        assert stats.computes_euler_network(name, None, one), name
    for name in ("lm", "ab2", "leapfrog", "two_step", "midpoint", "heun", "rk4", "backward_euler"):
        assert not stats.computes_euler_network(name, None, two), name
    for name in ("midpoint", "heun", "rk4", "backward_euler"):
        assert not stats.computes_euler_network(name, None, one), name
    assert stats.computes_euler_network("backward_euler", {"iterations": 1}, two)
    assert stats.computes_euler_network("lm_fixed", {"k": 0.0}, two)
    assert not stats.computes_euler_network("lm_fixed", {"k": -0.05}, two)
    assert not stats.computes_euler_network("lm", {"h": 0.5}, one)
    # the start rule and the entry mode matter
    assert stats.computes_euler_network("lm", None, one, start="copy")  # (1-k) x + k x + F = x + F
    assert not stats.computes_euler_network("leapfrog", None, one, start="copy")  # x + 2F
    assert not stats.computes_euler_network("lm", None, one, history_at_entry="project")


_EULER = {}


def _logits(model, variables, x):
    """Logits in eval and train mode, with non-trivial BatchNorm running means (eval mode is then
    not the identity)."""
    shifted = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.3 if "mean" in jax.tree_util.keystr(path) else v, variables)
    eval_logits = model.apply(shifted, x, train=False)
    train_logits, _ = model.apply(shifted, x, train=True, mutable=["batch_stats"])
    return np.asarray(jnp.concatenate([eval_logits, train_logits]))


def _euler_and_scheme_logits(depth, scheme, options):
    """Logits of the Euler CIFAR ResNet and of the same network stepped by `scheme`, with the same
    weights: the scheme's network takes every variable the Euler network has; its own extras are
    the knobs (set to U[-0.5, 0.5], far from 0 so that a knob that matters shows) and
    per-evaluation BatchNorm statistics of RK stages (mean 0, var 1)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    key = (depth, tuple(sorted(options.items())))
    if key not in _EULER:  # the Euler network of a depth is shared by several cases
        euler = models.create("cifar_resnet", depth=depth, width=4, scheme="euler", **options)
        variables = euler.init(jax.random.PRNGKey(0), x, train=False)
        _EULER[key] = (variables, _logits(euler, variables, x))
    euler_variables, euler_logits = _EULER[key]
    model = models.create("cifar_resnet", depth=depth, width=4, scheme=scheme, **options)
    shapes = traverse_util.flatten_dict(
        jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.PRNGKey(0)))
    shared = traverse_util.flatten_dict(euler_variables)
    generator = np.random.default_rng(5)
    flat = {}
    for path, shape in shapes.items():
        if path in shared:
            flat[path] = shared[path]
        elif "knobs" in path:
            flat[path] = jnp.asarray(generator.uniform(-0.5, 0.5, shape.shape), shape.dtype)
        else:
            assert path[0] == "batch_stats" and "eval1" in path, path  # nothing else may be new
            flat[path] = jnp.full(shape.shape, 1.0 if path[-1] == "var" else 0.0, shape.dtype)
    return euler_logits, _logits(model, traverse_util.unflatten_dict(flat), x)


@pytest.mark.parametrize(
    "depth, scheme, options",
    [
        (8, "lm", {}),
        (8, "ab2", {}),
        (8, "leapfrog", {}),
        (8, "lm", {"start": "copy"}),
        (8, "midpoint", {}),
        (8, "leapfrog", {"start": "copy"}),
        (8, "lm", {"history_at_entry": "project"}),
        (14, "lm", {}),
        (14, "ab2", {}),
    ],
)
def test_detected_cells_compute_the_euler_network_and_others_do_not(depth, scheme, options):
    n = (depth - 2) // 6
    detected = stats.computes_euler_network(scheme, None, n, **options)
    euler_logits, logits = _euler_and_scheme_logits(depth, scheme, options)
    scale = np.max(np.abs(euler_logits))
    difference = np.max(np.abs(logits - euler_logits)) / scale
    if detected:
        assert difference < 1e-5, (scheme, options, difference)
    else:
        assert difference > 1e-3, (scheme, options, difference)
    expected = (depth == 8 and scheme in ("lm", "ab2", "leapfrog")
                and options.get("history_at_entry", "restart") == "restart"
                and not (scheme == "leapfrog" and options.get("start") == "copy"))
    assert detected == expected
