"""Convergence orders, stability and zero-stability, measured through `Scheme.step` in float64
against closed-form solutions and hand-derived polynomials written here."""

import math

import numpy as np
import pytest

from cnn.ode import analysis as A
from cnn.ode.schemes import get_scheme

STEPS = (8, 16, 32, 64, 128, 256, 512)
T = 1.0
DECAY, OMEGA = 0.5, 2.0
SL_OMEGA = 1.5


def linear_field():
    """x' = M x with M = [[-0.5, -2], [2, -0.5]]; exact: e^{-0.5 t} * rotation(2 t) x0 (by hand)."""
    m = np.array([[-DECAY, -OMEGA], [OMEGA, -DECAY]])

    def f(x):
        return x @ m.T

    def exact(x0, t):
        c, s = np.cos(OMEGA * t), np.sin(OMEGA * t)
        return np.exp(-DECAY * t) * (x0 @ np.array([[c, -s], [s, c]]).T)

    return f, exact, np.array([1.0, 0.5])


def nonlinear_field():
    """Stuart-Landau z' = (1 + i w) z - |z|^2 z; exact r(t) = r0 e^t / sqrt(1 + r0^2 (e^{2t} - 1))."""

    def f(x):
        u, v = x[..., 0], x[..., 1]
        r2 = u * u + v * v
        return np.stack([u - SL_OMEGA * v - r2 * u, SL_OMEGA * u + v - r2 * v], axis=-1)

    def exact(x0, t):
        r0 = np.hypot(*x0)
        r = r0 * np.exp(t) / np.sqrt(1 + r0**2 * (np.exp(2 * t) - 1))
        theta = np.arctan2(x0[1], x0[0]) + SL_OMEGA * t
        return np.array([r * np.cos(theta), r * np.sin(theta)])

    return f, exact, np.array([0.3, -0.2])


CASES = [
    ("euler", {}, None, 1),
    ("midpoint", {}, None, 2),
    ("heun", {}, None, 2),
    ("rk4", {}, None, 4),
    ("ab2", {}, None, 2),
    ("leapfrog", {}, None, 2),
    ("backward_euler", {"iterations": 8}, None, 1),
    ("two_step", {}, {"a1": 0.3, "b1": 0.2}, 1),
    ("two_step", {}, {"a1": 0.0, "b1": -0.5}, 2),
]


@pytest.mark.parametrize("field", [linear_field, nonlinear_field], ids=["linear", "stuart_landau"])
@pytest.mark.parametrize("name, options, knobs, order", CASES, ids=[f"{c[0]}{'-' + str(c[2]) if c[2] else ''}" for c in CASES])
def test_observed_order_equals_the_scheme_order(field, name, options, knobs, order):
    f, exact, x0 = field()
    result = A.convergence_study(get_scheme(name, **options), f, exact, x0, T, STEPS, knobs)
    assert result.slope == pytest.approx(order, abs=0.15), result
    assert all(e1 > e2 for e1, e2 in zip(result.errors, result.errors[1:]))  # monotone in N
    # independent slope: least squares written out here
    lh, le = np.log(result.step_sizes), np.log(result.errors)
    slope = np.sum((lh - lh.mean()) * (le - le.mean())) / np.sum((lh - lh.mean()) ** 2)
    assert slope == pytest.approx(result.slope, rel=1e-9)


def test_exact_solutions_used_by_the_analysis_module_match_the_hand_written_ones():
    f, exact, a = A.rotation_decay(DECAY, OMEGA)
    x0 = np.array([1.0, 0.5])
    np.testing.assert_allclose(exact(x0, 0.7), linear_field()[1](x0, 0.7), rtol=1e-14)
    g, sl_exact = A.stuart_landau(SL_OMEGA)
    y0 = np.array([0.3, -0.2])
    np.testing.assert_allclose(sl_exact(y0, 0.7), nonlinear_field()[1](y0, 0.7), rtol=1e-13)
    np.testing.assert_allclose(g(y0), nonlinear_field()[0](y0), rtol=1e-14)


def test_lm_is_first_order_for_the_rescaled_field():
    """Modified equation (1 + k) x' + O(h) = F: LM with fixed k approximates x' = F / (1 + k)."""
    f, exact, x0 = linear_field()
    k = 0.3
    for scheme, knobs in [(get_scheme("lm_fixed", k=k), None), (get_scheme("lm"), {"k": k})]:
        result = A.convergence_study(scheme, f, lambda x, t: exact(x, t / (1 + k)), x0, T, STEPS, knobs)
        assert result.slope == pytest.approx(1.0, abs=0.15)
    # and it does NOT converge to the unscaled flow
    far = A.convergence_study(get_scheme("lm_fixed", k=k), f, exact, x0, T, STEPS)
    assert far.errors[-1] > 0.1


def test_copy_start_costs_leapfrog_an_order():
    f, exact, x0 = linear_field()
    result = A.convergence_study("leapfrog", f, exact, x0, T, STEPS, start="copy")
    assert result.slope == pytest.approx(1.0, abs=0.15)


def test_integrate_returns_the_trajectory():
    f, _, x0 = linear_field()
    traj = A.integrate(get_scheme("euler", h=0.1), f, x0, 3, return_trajectory=True)
    assert len(traj) == 4
    np.testing.assert_allclose(traj[1], x0 + 0.1 * f(x0))
    np.testing.assert_allclose(traj[3], A.integrate(get_scheme("euler", h=0.1), f, x0, 3))


# ---------------------------------------------------------------------------------- stability


def test_runge_kutta_amplification_factors_are_the_taylor_polynomials():
    z = np.array([0.3, -1.2 + 0.5j, 2j, -2.5])
    expected = {
        "euler": 1 + z,
        "midpoint": 1 + z + z**2 / 2,
        "heun": 1 + z + z**2 / 2,
        "rk4": sum(z**j / math.factorial(j) for j in range(5)),
    }
    for name, poly in expected.items():
        np.testing.assert_allclose(A.amplification_factor(name, z), poly, rtol=1e-13, err_msg=name)
    # m fixed-point sweeps of backward Euler give the truncated geometric series of 1/(1 - z)
    for m in (1, 3, 6):
        got = A.amplification_factor(get_scheme("backward_euler", iterations=m), z)
        np.testing.assert_allclose(got, sum(z**j for j in range(m + 1)), rtol=1e-13)
    small = np.array([0.05, -0.1 + 0.05j])
    np.testing.assert_allclose(
        A.amplification_factor(get_scheme("backward_euler", iterations=60), small), 1 / (1 - small), rtol=1e-12
    )


def test_multistep_roots_are_the_roots_of_rho_minus_z_sigma():
    for z in [0.0, 0.2, -0.7 + 0.4j]:
        k = -0.06
        cases = {
            # name: (knobs, coefficients of rho(zeta) - z sigma(zeta), highest power first)
            "lm": ({"k": k}, [1, -(1 - k) - z, -k]),
            "ab2": (None, [1, -(1 + 1.5 * z), 0.5 * z]),
            "leapfrog": (None, [1, -2 * z, -1]),
        }
        for name, (knobs, poly) in cases.items():
            got = A.characteristic_roots(name, z, knobs)
            want = np.roots(poly)
            got_nonzero = got[: len(want)]
            np.testing.assert_allclose(np.sort_complex(got_nonzero), np.sort_complex(want), atol=1e-12, err_msg=f"{name} z={z}")


def test_lm_roots_at_zero_are_one_and_minus_k():
    for k in [-0.1, 0.0, 0.45, 0.9]:
        roots = A.characteristic_roots("lm", 0.0, {"k": k})
        np.testing.assert_allclose(np.sort(roots.real), np.sort([1.0, -k]), atol=1e-12)


def test_lm_zero_stability_interval_is_minus_one_open_to_one_closed():
    """rho(z) = z^2 - (1-k) z - k = (z - 1)(z + k): roots 1, -k. Root condition: |k| <= 1 and the
    unit-modulus roots simple; k = -1 gives the double root 1 (excluded), k = 1 gives +-1 (included)."""
    interval = A.zero_stability_interval("lm")
    assert (interval.low, interval.high) == (-1.0, 1.0)
    assert (interval.low_closed, interval.high_closed) == (False, True)
    assert str(interval) == "(-1, 1]"
    assert -0.999 in interval and 1.0 in interval and -1.0 not in interval and 1.001 not in interval
    # direct checks of the endpoints with the hand-derived roots
    assert not A.satisfies_root_condition(np.array([1.0, 1.0]))
    assert A.satisfies_root_condition(np.array([1.0, -1.0]))
    # two_step has the same rho, whatever b1
    two = A.zero_stability_interval("two_step", "a1", knobs={"b1": 0.7})
    assert (two.low, two.high, two.low_closed, two.high_closed) == (-1.0, 1.0, False, True)


def test_zero_stability_interval_needs_a_knob():
    with pytest.raises(ValueError, match="no knobs"):
        A.zero_stability_interval("rk4")
    with pytest.raises(ValueError, match="knob='k'"):
        A.zero_stability_interval("two_step", "k")
    with pytest.raises(ValueError, match="knob=None is ambiguous"):
        A.zero_stability_interval("two_step")


def test_stability_regions_match_known_intervals():
    # Euler: |1 + z| <= 1, RK4 reaches about -2.785 on the real axis, AB2 reaches -1
    real = np.array([-2.9, -2.7, -1.9, -1.1, -0.9, 0.1])
    imag = np.array([0.0])
    euler = A.stability_region("euler", real, imag)[0]
    np.testing.assert_array_equal(euler, [False, False, True, True, True, False])
    rk4 = A.stability_region("rk4", real, imag)[0]
    np.testing.assert_array_equal(rk4, [False, True, True, True, True, False])
    ab2 = A.stability_region("ab2", real, imag)[0]
    np.testing.assert_array_equal(ab2, [False, False, False, False, True, False])
    with pytest.raises(ValueError, match="multistep"):
        A.amplification_factor("ab2", 0.1)


def test_plots_are_written(tmp_path):
    path = A.plot_stability_regions(["euler", "rk4", ("lm", {"k": -0.05})], tmp_path / "regions.png", resolution=41)
    f, exact, x0 = linear_field()
    results = [A.convergence_study(name, f, exact, x0, T, (8, 16, 32)) for name in ("euler", "rk4")]
    path2 = A.plot_convergence(results, tmp_path / "order.png")
    for p in (path, path2):
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
