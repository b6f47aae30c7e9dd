"""Paired statistics for scheme comparisons: per-seed differences, Holm's correction, power.

A seed fixes the data order, augmentation and initial block weights of every scheme, so two
schemes trained with the same seed form a *pair*, and the comparison works on the per-seed
differences `d_s = a_s - b_s` (a paired t-test). Pairing removes the seed-to-seed variation the
schemes share, which unpaired means keep.

- `paired_difference(a, b)`: mean difference, its standard error, t statistic and two-sided
  p-value (t with n - 1 degrees of freedom), the t confidence interval and a percentile
  bootstrap interval as a check that does not assume normal differences.
- `holm(p_values)`: the Holm-Bonferroni step-down correction over the comparisons of a table
  (family-wise error rate <= alpha under any dependence between the tests).
- `paired_power`, `minimum_detectable_difference`: power of the two-sided paired t-test from the
  noncentral t distribution, and the smallest true difference found with a given power, so that
  "no flag" reads "no difference larger than X".
- `chance_flags`: how many flags chance alone gives when no scheme differs (with and without
  Holm).
- `compare_paired`, `compare_to_reference`: the above as table rows (differences in percentage
  points) from `{key: {seed: accuracy}}`.
- `computes_euler_network`: whether a CIFAR ResNet stepped by a scheme computes exactly the
  forward Euler (plain ResNet) network, e.g. multistep schemes at one block per stage; such cells
  are reported as identical to Euler rather than trained and compared.

Only numpy and scipy (plus `cnn.ode` for the last function).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

# Differences whose spread is below this fraction of their size count as constant (zero variance):
# accuracies are multiples of 1 / test-set size, and float subtraction leaves ~1e-17 of noise.
_CONSTANT_RTOL = 1e-12


def _as_generator(rng: int | np.random.Generator | np.random.SeedSequence | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def _check_probability(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.floating)) and 0.0 < value < 1.0):
        raise ValueError(f"{name}={value!r}: must be a number in the open interval (0, 1)")


# ------------------------------------------------------------------------------------------------
# One paired comparison


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Summary of the paired differences `d = a - b` (one per seed).

    Attributes:
      n: number of pairs.
      mean: mean difference (nan for n = 0).
      sd: sample standard deviation of the differences (ddof = 1; nan for n < 2).
      standard_error: `sd / sqrt(n)`.
      t_statistic: `mean / standard_error`, t with `n - 1` degrees of freedom.
      p_value: two-sided p-value of `mean = 0`.
      confidence: level of both intervals (e.g. 0.95).
      ci_low, ci_high: t interval `mean +- t_{n-1, (1+confidence)/2} * standard_error`.
      bootstrap_low, bootstrap_high: percentile bootstrap interval of the mean difference.
      differences: the per-pair differences.

    Degenerate cases (n < 2 or constant differences), chosen so that a table and Holm's
    correction keep working:
      - n = 0: everything nan.
      - n = 1: `mean` is the one difference; sd, standard error, t, p and both intervals are nan
        (no noise estimate; Holm leaves the comparison out of the family).
      - n >= 2 and all differences equal to c (zero variance): sd = standard error = 0, both
        intervals are `[c, c]`; c != 0 gives t = +-inf and p = 0 (as `scipy.stats.ttest_rel`),
        c = 0 gives t = 0 and p = 1 (scipy returns nan: identical results are no evidence of a
        difference, and p = 1 keeps the comparison in Holm's family).
    """

    n: int
    mean: float
    sd: float
    standard_error: float
    t_statistic: float
    p_value: float
    confidence: float
    ci_low: float
    ci_high: float
    bootstrap_low: float
    bootstrap_high: float
    differences: tuple[float, ...]


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_bootstrap: int = 10_000,
    rng: int | np.random.Generator | np.random.SeedSequence | None = 0,
) -> PairedDifference:
    """The paired t-test and confidence intervals of the mean of `a - b`.

    Args:
      a, b: `[n]` results of the two arms, entry i of both from the same seed.
      confidence: level of the t and bootstrap intervals.
      n_bootstrap: bootstrap resamples (percentile method, `scipy.stats.bootstrap`).
      rng: seed or generator of the bootstrap; the default 0 makes the interval deterministic.

    Returns:
      A `PairedDifference` (see its docstring for n < 2 and zero variance).
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a has {a.size} values and b has {b.size}; a paired comparison needs one of each per seed")
    _check_probability("confidence", confidence)
    if not (isinstance(n_bootstrap, int) and n_bootstrap >= 100):
        raise ValueError(f"n_bootstrap={n_bootstrap!r}: must be an integer >= 100")
    d = a - b
    if not np.all(np.isfinite(d)):
        raise ValueError(f"a - b = {d.tolist()}: every value must be finite")
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return PairedDifference(0, nan, nan, nan, nan, nan, confidence, nan, nan, nan, nan, ())
    mean = float(d.mean())
    if n == 1:
        return PairedDifference(1, mean, nan, nan, nan, nan, confidence, nan, nan, nan, nan, (float(d[0]),))
    if np.ptp(d) <= _CONSTANT_RTOL * float(np.max(np.abs(d))):
        if mean == 0.0:
            t, p = 0.0, 1.0
        else:
            t, p = math.copysign(math.inf, mean), 0.0
        return PairedDifference(n, mean, 0.0, 0.0, t, p, confidence, mean, mean, mean, mean, tuple(d.tolist()))
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t = mean / se
    p = float(2.0 * scipy_stats.t.sf(abs(t), n - 1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * se
    boot = scipy_stats.bootstrap(
        (d,), np.mean, n_resamples=n_bootstrap, confidence_level=confidence, method="percentile",
        vectorized=True, rng=_as_generator(rng),
    ).confidence_interval
    return PairedDifference(
        n, mean, sd, se, float(t), p, confidence, mean - half, mean + half,
        float(boot.low), float(boot.high), tuple(d.tolist()),
    )


# ------------------------------------------------------------------------------------------------
# Multiple comparisons


@dataclasses.dataclass(frozen=True)
class HolmResult:
    """`rejected[i]`: hypothesis i rejected at family-wise level alpha; `adjusted[i]`: its
    Holm-adjusted p-value (reject iff adjusted <= alpha). nan inputs stay nan / not rejected."""

    rejected: tuple[bool, ...]
    adjusted: tuple[float, ...]
    alpha: float


def holm(p_values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> HolmResult:
    """Holm-Bonferroni step-down correction.

    With the m finite p-values sorted, `p_(1) <= ... <= p_(m)`, the adjusted values are
    `p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))` (monotone in i), and H_(i) is rejected iff
    `p~_(i) <= alpha`, i.e. iff `p_(j) <= alpha / (m - j + 1)` for every `j <= i`. The family-wise
    error rate is at most alpha whatever the dependence between the tests. nan p-values (a
    comparison without a noise estimate) are not part of the family: they do not count in m.
    """
    _check_probability("alpha", alpha)
    p = np.asarray(p_values, dtype=np.float64).ravel()
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError(f"p_values={p.tolist()}: every p-value must lie in [0, 1] (or be nan)")
    adjusted = np.full(p.shape, np.nan)
    index = np.flatnonzero(finite)
    m = index.size
    if m:
        order = index[np.argsort(p[index], kind="stable")]
        scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
        adjusted[order] = np.maximum.accumulate(scaled)
    rejected = finite & (np.nan_to_num(adjusted, nan=2.0) <= alpha)
    return HolmResult(tuple(bool(r) for r in rejected), tuple(float(v) for v in adjusted), float(alpha))


@dataclasses.dataclass(frozen=True)
class ChanceFlags:
    """Flags chance alone raises among `comparisons` tests when no true difference exists.

    Attributes:
      comparisons: k, the tests in the family.
      alpha: the family (Holm) or per-test (uncorrected) level.
      correction: "holm" or "none".
      expected: expected number of flags. Uncorrected: k alpha, exact under any dependence (a sum
        of k rejection probabilities alpha). Holm: computed exactly for independent tests (the
        comparisons of a table that share a reference are positively correlated; then it is an
        approximation); about alpha, slightly above for k >= 2.
      probability_any: probability of at least one flag. Holm: `1 - (1 - alpha/k)^k` for
        independent tests, and <= alpha under any dependence (the family-wise guarantee).
        Uncorrected: `1 - (1 - alpha)^k` for independent tests.
    """

    comparisons: int
    alpha: float
    correction: str
    expected: float
    probability_any: float

    def sentence(self) -> str:
        """One line for a report's verdict."""
        k = self.comparisons
        if self.correction == "holm":
            return (
                f"With no true difference, Holm's correction over {k} comparison{'s' if k != 1 else ''} flags at "
                f"least one with probability <= {self.alpha:g} (about {self.expected:.2f} flags expected); "
                f"uncorrected tests at {self.alpha:g} would flag {k * self.alpha:.2f} on average."
            )
        return (
            f"With no true difference, {k} uncorrected test{'s' if k != 1 else ''} at level {self.alpha:g} flag "
            f"{self.expected:.2f} on average (at least one with probability {self.probability_any:.2f})."
        )


def _holm_expected_false_flags(k: int, alpha: float) -> tuple[float, float]:
    """E[#rejections] and P(>= 1 rejection) of Holm under k independent true nulls (uniform p).

    Holm rejects at least r hypotheses iff `p_(i) <= c_i = alpha / (k - i + 1)` for i = 1..r,
    i.e. iff `N(c_i) >= i` for every i <= r, N(c) being the number of p-values <= c. N is
    tracked exactly: given N(c_{i-1}) = j, each of the other k - j p-values (uniform on
    (c_{i-1}, 1]) falls below c_i with probability `(c_i - c_{i-1}) / (1 - c_{i-1})`.
    """
    thresholds = alpha / (k - np.arange(k))  # c_1 .. c_k, increasing
    counts = np.arange(k + 1)
    mass = scipy_stats.binom.pmf(counts, k, thresholds[0])
    previous = thresholds[0]
    at_least = []
    for i in range(1, k + 1):
        if i > 1:
            c = thresholds[i - 1]
            q = (c - previous) / (1.0 - previous)
            moved = np.zeros(k + 1)
            for j in range(k + 1):
                if mass[j]:
                    moved[j:] += mass[j] * scipy_stats.binom.pmf(np.arange(k + 1 - j), k - j, q)
            mass, previous = moved, c
        mass[:i] = 0.0  # the step-down stops unless N(c_i) >= i
        at_least.append(float(mass.sum()))
    return float(sum(at_least)), at_least[0]


def chance_flags(comparisons: int, alpha: float = 0.05, correction: str = "holm") -> ChanceFlags:
    """How many flags chance alone gives among `comparisons` tests (see `ChanceFlags`)."""
    if not (isinstance(comparisons, int) and comparisons >= 0):
        raise ValueError(f"comparisons={comparisons!r}: must be an integer >= 0")
    _check_probability("alpha", alpha)
    if correction not in ("holm", "none"):
        raise ValueError(f"correction={correction!r}: must be 'holm' or 'none'")
    k = comparisons
    if k == 0:
        return ChanceFlags(0, alpha, correction, 0.0, 0.0)
    if correction == "none":
        return ChanceFlags(k, alpha, correction, k * alpha, 1.0 - (1.0 - alpha) ** k)
    expected, any_flag = _holm_expected_false_flags(k, alpha)
    return ChanceFlags(k, alpha, correction, expected, any_flag)


# ------------------------------------------------------------------------------------------------
# Power


def paired_power(
    difference: float, sd: float, n: int, *, alpha: float = 0.05, comparisons: int = 1
) -> float:
    """Power of the two-sided paired t-test at level `alpha / comparisons` with n pairs.

    The t statistic of n differences `N(difference, sd^2)` is noncentral t with n - 1 degrees
    of freedom and noncentrality `difference sqrt(n) / sd`; power is
    `P(T > t_crit) + P(T < -t_crit)`, `t_crit = t_{n-1}^{-1}(1 - alpha' / 2)`.
    """
    level = _per_test_alpha(alpha, comparisons)
    if n < 2:
        return float("nan")
    if sd == 0.0:
        return 1.0 if difference != 0.0 else level
    df = n - 1
    critical = scipy_stats.t.ppf(1.0 - level / 2.0, df)
    # By symmetry use |noncentrality|: the far tail is then the lower one, which scipy's nct may
    # return as nan once it underflows (noncentrality >~ 15); it is 0 to double precision there.
    noncentrality = abs(difference) * math.sqrt(n) / sd
    near = scipy_stats.nct.sf(critical, df, noncentrality)
    far = scipy_stats.nct.cdf(-critical, df, noncentrality)
    return float(near + (0.0 if math.isnan(far) else far))


def _per_test_alpha(alpha: float, comparisons: int) -> float:
    _check_probability("alpha", alpha)
    if not (isinstance(comparisons, int) and comparisons >= 1):
        raise ValueError(f"comparisons={comparisons!r}: must be an integer >= 1 (1 when alpha is already corrected)")
    return alpha / comparisons


def minimum_detectable_difference(
    sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8, comparisons: int = 1
) -> float:
    """The smallest true mean difference a two-sided paired t-test detects with `power`.

    Solves `paired_power(delta, sd, n, alpha=alpha, comparisons=comparisons) = power` for
    `delta >= 0` (noncentral t, `scipy.stats.nct`; root by Brent's method). Same units as `sd`.

    Args:
      sd: standard deviation of the paired differences (e.g. the sample sd of a pilot run).
      n: number of pairs (seeds).
      alpha: significance level; with `comparisons = m` the test runs at `alpha / m`. Under
        Holm's correction over m comparisons, a p-value <= alpha / m is always rejected, so the
        value with `comparisons = m` is a guaranteed bound: a true difference this large is
        flagged with at least `power` probability whatever the other comparisons do. Pass
        `comparisons = 1` when `alpha` is already the per-test level.
      power: the detection probability, in (alpha', 1).

    Returns:
      delta (>= 0); inf for n < 2 (no test), 0 for sd = 0, nan for nan sd.
    """
    level = _per_test_alpha(alpha, comparisons)
    _check_probability("power", power)
    if power <= level:
        raise ValueError(f"power={power}: must exceed the test's level {level:g} (a zero difference has that power)")
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"n={n!r}: must be an integer >= 0")
    if math.isnan(sd):
        return float("nan")
    if sd < 0:
        raise ValueError(f"sd={sd}: a standard deviation is >= 0")
    if n < 2:
        return math.inf
    if sd == 0.0:
        return 0.0

    def shortfall(noncentrality: float) -> float:
        return paired_power(noncentrality * sd / math.sqrt(n), sd, n, alpha=level) - power

    high = 1.0
    while shortfall(high) < 0.0:  # power -> 1 as the noncentrality grows: this ends
        high *= 2.0
    noncentrality = optimize.brentq(shortfall, 0.0, high, xtol=1e-12, rtol=1e-12)
    return float(noncentrality * sd / math.sqrt(n))


# ------------------------------------------------------------------------------------------------
# Table rows


@dataclasses.dataclass(frozen=True)
class ComparisonRow:
    """One comparison `candidate - reference` over the seeds both have (accuracy units, not pp).

    Attributes:
      candidate, reference: keys of the accuracies mapping (scheme names, (scheme, depth), ...).
      seeds: the paired seeds used (present for both, sorted).
      unpaired_seeds: seeds present for only one of the two (left out).
      candidate_mean, reference_mean: mean accuracies over the paired seeds.
      difference: the paired statistics, None for a cell identical to its reference.
      p_holm: Holm-adjusted p-value over the table's family (nan when not tested).
      flag: "better" / "worse" (Holm rejects; sign of the mean), "none" (not rejected),
        "identical" (computes the reference network), "n/a" (fewer than 2 paired seeds).
      mdd: minimum detectable difference at the table's power, with the family's Bonferroni
        level alpha / m (a guaranteed bound under Holm; see `minimum_detectable_difference`)
        and the sample sd of the differences (a plug-in estimate).
    """

    candidate: Hashable
    reference: Hashable
    seeds: tuple[Any, ...]
    unpaired_seeds: tuple[Any, ...]
    candidate_mean: float
    reference_mean: float
    difference: PairedDifference | None
    p_holm: float
    flag: str
    mdd: float


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """The rows of a comparison table with the family-level facts its verdict needs."""

    rows: tuple[ComparisonRow, ...]
    alpha: float
    confidence: float
    power: float
    chance: ChanceFlags

    @property
    def family_size(self) -> int:
        return self.chance.comparisons

    def table(self, label=str) -> tuple[list[str], list[list[str]]]:
        """Header and formatted rows (differences in percentage points) for a Markdown/CSV table.

        `label(key)` turns a key into text (default `str`).
        """
        c = f"{100 * self.confidence:g}%"
        header = [
            "comparison", "paired seeds", "mean acc % (cand / ref)", "Δ pp (paired mean)", f"{c} CI (t)",
            f"{c} CI (bootstrap)", "Holm p", "flag", f"MDD pp ({100 * self.power:g}% power)",
        ]
        body = []
        for row in self.rows:
            name = f"{label(row.candidate)} − {label(row.reference)}"
            if row.flag == "identical":
                body.append([name, "—", "—", "0 (same network)", "—", "—", "—", "identical", "—"])
                continue
            d = row.difference
            body.append([
                name,
                str(len(row.seeds)),
                f"{100 * row.candidate_mean:.2f} / {100 * row.reference_mean:.2f}",
                _pp(d.mean, signed=True),
                _interval(d.ci_low, d.ci_high),
                _interval(d.bootstrap_low, d.bootstrap_high),
                "—" if math.isnan(row.p_holm) else f"{row.p_holm:.3g}",
                row.flag,
                _pp(row.mdd),
            ])
        return header, body

    def notes(self, label=str) -> list[str]:
        """Verdict sentences: flags, the chance rate, the detectable difference, identical cells
        and left-out seeds."""
        notes = []
        flagged = [r for r in self.rows if r.flag in ("better", "worse")]
        tested = [r for r in self.rows if not math.isnan(r.p_holm)]
        for r in flagged:
            d = r.difference
            notes.append(
                f"{label(r.candidate)} is {r.flag} than {label(r.reference)} by {_pp(abs(d.mean))} points "
                f"({100 * self.confidence:g}% CI {_interval(d.ci_low, d.ci_high)} pp, Holm-adjusted p = {r.p_holm:.3g}, "
                f"{len(r.seeds)} paired seeds)."
            )
        if tested and not flagged:
            mdds = [r.mdd for r in tested if math.isfinite(r.mdd)]
            largest = f"{100 * max(mdds):.2f}" if mdds else "—"
            notes.append(
                f"No comparison is flagged at family-wise level {self.alpha:g} (Holm over {len(tested)}): no "
                f"difference larger than the minimum detectable difference (up to {largest} pp at "
                f"{100 * self.power:g}% power) is supported by these seeds."
            )
        if tested:
            notes.append(self.chance.sentence())
        identical = [r for r in self.rows if r.flag == "identical"]
        if identical:
            notes.append(
                "Identical to their reference network (not trained, not compared): "
                + ", ".join(f"{label(r.candidate)} = {label(r.reference)}" for r in identical) + "."
            )
        for r in self.rows:
            if r.unpaired_seeds:
                notes.append(
                    f"{label(r.candidate)} − {label(r.reference)}: seeds {list(r.unpaired_seeds)} lack a partner and are "
                    "left out (differences are paired by seed)."
                )
            if r.flag == "n/a":
                notes.append(
                    f"{label(r.candidate)} − {label(r.reference)}: fewer than 2 paired seeds, no test."
                )
        return notes


def _pp(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _interval(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "—"
    return f"[{100 * low:+.2f}, {100 * high:+.2f}]"


def compare_paired(
    accuracies: Mapping[Hashable, Mapping[Any, float]],
    comparisons: Sequence[tuple[Hashable, Hashable]],
    *,
    identical: Iterable[Hashable] = (),
    alpha: float = 0.05,
    confidence: float = 0.95,
    power: float = 0.8,
    n_bootstrap: int = 10_000,
    rng: int | np.random.SeedSequence | None = 0,
) -> PairedComparison:
    """Paired comparisons `candidate - reference` as table rows, Holm-corrected together.

    Args:
      accuracies: `{key: {seed: accuracy}}`, e.g. `{"euler": {0: 0.91, 1: 0.90}, ...}` or keys
        `(scheme, depth)` to compare LM at depth d with Euler at depth 2d.
      comparisons: `(candidate, reference)` key pairs, in table order. Each pair uses only the
        seeds present for both (sorted); the others are listed in `unpaired_seeds`.
      identical: candidate keys that compute exactly their reference's network (see
        `computes_euler_network`): reported as "identical", left out of Holm's family, and they
        need no accuracies.
      alpha: family-wise level of Holm's correction over the tested rows.
      confidence, n_bootstrap: intervals (`paired_difference`).
      power: for the minimum detectable difference (at level alpha / m, m the family size).
      rng: seed of the bootstrap (None: fresh entropy, not reproducible); row i uses the i-th
        child of `SeedSequence(rng)`, so a table is reproducible and rows do not share resamples.

    Returns:
      A `PairedComparison` (rows in `comparisons` order; `table()` and `notes()` format them).
    """
    identical = set(identical)
    sequence = rng if isinstance(rng, np.random.SeedSequence) else np.random.SeedSequence(rng)
    children = sequence.spawn(len(comparisons))
    partial = []
    for i, (candidate, reference) in enumerate(comparisons):
        if candidate in identical:
            partial.append((candidate, reference, (), (), math.nan, math.nan, None))
            continue
        for key in (candidate, reference):
            if key not in accuracies:
                raise ValueError(f"comparison {candidate!r} vs {reference!r}: no accuracies for {key!r}; "
                                 f"keys present: {list(accuracies)}")
        a, b = accuracies[candidate], accuracies[reference]
        paired = tuple(sorted(set(a) & set(b)))
        unpaired = tuple(sorted(set(a) ^ set(b)))
        cand = np.array([a[s] for s in paired], dtype=np.float64)
        ref = np.array([b[s] for s in paired], dtype=np.float64)
        d = paired_difference(cand, ref, confidence=confidence, n_bootstrap=n_bootstrap,
                              rng=np.random.default_rng(children[i]))
        partial.append((candidate, reference, paired, unpaired,
                        float(cand.mean()) if paired else math.nan, float(ref.mean()) if paired else math.nan, d))
    p_values = [math.nan if d is None else d.p_value for *_, d in partial]
    corrected = holm(p_values, alpha)
    m = sum(1 for p in p_values if not math.isnan(p))
    rows = []
    for (candidate, reference, paired, unpaired, cmean, rmean, d), rejected, adjusted in zip(
        partial, corrected.rejected, corrected.adjusted
    ):
        if d is None:
            flag, mdd = "identical", math.nan
        elif d.n < 2:
            flag, mdd = "n/a", math.inf
        else:
            flag = ("better" if d.mean > 0 else "worse") if rejected else "none"
            mdd = minimum_detectable_difference(d.sd, d.n, alpha=alpha, power=power, comparisons=max(m, 1))
        rows.append(ComparisonRow(candidate, reference, paired, unpaired, cmean, rmean, d, adjusted, flag, mdd))
    return PairedComparison(tuple(rows), alpha, confidence, power, chance_flags(m, alpha, "holm"))


def compare_to_reference(
    accuracies: Mapping[Hashable, Mapping[Any, float]],
    reference: Hashable,
    *,
    identical: Iterable[Hashable] = (),
    **options: Any,
) -> PairedComparison:
    """`compare_paired` of every other key (and every `identical` one) against `reference`,
    in the mapping's order; `options` as for `compare_paired`."""
    identical = list(identical)
    keys = [k for k in accuracies if k != reference] + [k for k in identical if k not in accuracies]
    return compare_paired(accuracies, [(k, reference) for k in keys], identical=identical, **options)


# ------------------------------------------------------------------------------------------------
# Cells that compute the Euler network


def _probe_step(scheme, kind: str, knobs: Mapping[str, float], start: str, generator: np.random.Generator):
    """`scheme.step` and the forward Euler step (step 1 of the reference) on one random probe.

    kind: "start" (no history, no shortcut: block 0 of the first stage), "continue" (a history,
    no shortcut), "start_transition" (no history, shortcut: a shape-changing block 0 that
    restarts), "project_transition" (a history mapped through the shortcut).
    """
    from cnn.ode.schemes import History

    transition = kind.endswith("transition")
    d_in, d_out = 3, (4 if transition else 3)
    weight = generator.normal(size=(d_out, d_in))
    bias = generator.normal(size=d_out)
    projection = generator.normal(size=(d_out, d_in))

    def field(x):  # a generic nonlinear F; a linear one could hide nonlinear differences
        return np.tanh(x @ weight.T + bias) + 0.3 * np.sin(x @ weight.T) ** 2

    def shortcut(x):
        return x @ projection.T

    x = generator.normal(size=(2, d_in))
    history = None
    if kind in ("continue", "project_transition"):
        history = History(
            tuple(generator.normal(size=(2, d_in)) for _ in range(scheme.num_past_states)),
            tuple(generator.normal(size=(2, d_in)) for _ in range(scheme.num_past_derivatives)),
        )
    result, _ = scheme.step(field, x, history, knobs, first=history is None, start=start,
                            shortcut=shortcut if transition else None)
    return np.asarray(result), (shortcut(x) if transition else x) + field(x)


def computes_euler_network(
    scheme: Any,
    scheme_options: Mapping[str, Any] | None = None,
    blocks_per_stage: int = 1,
    *,
    start: str = "euler",
    history_at_entry: str = "restart",
    num_probes: int = 3,
) -> bool:
    """Whether a CIFAR ResNet (`cnn.models.cifar_resnet`) stepped by `scheme` computes exactly
    the forward Euler network with h = 1 (He et al.'s ResNet) with the same weights.

    The network (`cnn.ode.ODEStage`) takes these kinds of step:
    - stage 1, block 0: the start step (no history; for a multistep scheme the `start` rule);
    - stages 2 and 3, block 0 (shape change): with `history_at_entry="restart"` the start step
      with the shortcut S; with "project" the scheme's own formula on the history mapped by S;
    - every other block (only when `blocks_per_stage >= 2`): the scheme's own formula with its
      history.
    The network is Euler's iff each kind of step it takes equals `x_{t+1} = x_t + F(x_t)`
    (`S(x_t) + F(x_t)` at a transition) for every `F`. That is checked on the scheme's own step
    rule (`Scheme.step`, the code the network runs): float64 probes with a random nonlinear F,
    random states and history, and random knob values (so a learnable `k_t` must drop out).
    A scheme whose formula reduces to Euler then passes (lm_fixed with k = 0, backward Euler
    with 1 iteration); so do multistep schemes at one block per stage with the Euler start
    (LM, AB2, leapfrog, two_step); leapfrog with `start="copy"` (`x_1 = x_0 + 2 F(x_0)`) or any
    scheme with h != 1 does not.

    Args:
      scheme, scheme_options: as for `cnn.ode.get_scheme`.
      blocks_per_stage: n of depth 6n + 2 (`cnn.models.cifar_resnet.blocks_per_stage`).
      start, history_at_entry: the network's `CifarResNet` options of the same name.
      num_probes: random probes per kind of step.

    Only the step rule is compared: the cell is the Euler cell only if every other model option
    (width, shortcut, preactivation, ...) matches the Euler cell's too.
    """
    from cnn.ode.schemes import START_MODES, get_scheme
    from cnn.ode.stage import HISTORY_MODES

    resolved = get_scheme(scheme, **dict(scheme_options or {}))
    if not (isinstance(blocks_per_stage, (int, np.integer)) and blocks_per_stage >= 1):
        raise ValueError(f"blocks_per_stage={blocks_per_stage!r}: must be an integer >= 1 (depth = 6n + 2)")
    if start not in START_MODES:
        raise ValueError(f"start={start!r}: must be one of {START_MODES}")
    if history_at_entry not in HISTORY_MODES:
        raise ValueError(f"history_at_entry={history_at_entry!r}: must be one of {HISTORY_MODES}")
    kinds = ["start", "start_transition" if history_at_entry == "restart" else "project_transition"]
    if blocks_per_stage >= 2:
        kinds.append("continue")
    generator = np.random.default_rng(20240518)
    for kind in kinds:
        for _ in range(num_probes):
            knobs = {name: float(generator.normal()) for name in resolved.knob_names}
            result, reference = _probe_step(resolved, kind, knobs, start, generator)
            if result.shape != reference.shape or not np.allclose(result, reference, rtol=1e-12, atol=1e-12):
                return False
    return True


__all__ = [
    "ChanceFlags",
    "ComparisonRow",
    "HolmResult",
    "PairedComparison",
    "PairedDifference",
    "chance_flags",
    "compare_paired",
    "compare_to_reference",
    "computes_euler_network",
    "holm",
    "minimum_detectable_difference",
    "paired_difference",
    "paired_power",
]
