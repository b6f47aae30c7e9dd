"""Each scheme's `step` against its formula written out by hand in numpy, plus the catalogue
records and bad-input errors."""

import numpy as np
import pytest

from cnn.ode import schemes as S
from cnn.ode.schemes import History, get_scheme

H = 0.3


@pytest.fixture()
def problem(rng):
    """A small nonlinear field F(x) = tanh(x W + b) on [batch=2, 4], a state and a past."""
    w = rng.normal(size=(4, 4)) * 0.7
    b = rng.normal(size=4) * 0.1
    x = rng.normal(size=(2, 4))
    x_prev = rng.normal(size=(2, 4))

    def f(v):
        return np.tanh(v @ w + b)

    return f, x, x_prev


# --------------------------------------------------------------------------- one-step schemes


def test_euler_step_is_x_plus_h_f(problem):
    f, x, _ = problem
    got, history = get_scheme("euler", h=H).step(f, x)
    np.testing.assert_allclose(got, x + H * f(x), rtol=1e-13)
    assert history == History()


def test_plain_resnet_is_euler_with_unit_step(problem):
    f, x, _ = problem
    got, _ = get_scheme("resnet").step(f, x)
    np.testing.assert_allclose(got, x + f(x), rtol=1e-13)


def test_midpoint_and_heun_match_hand_formulas(problem):
    f, x, _ = problem
    mid, _ = get_scheme("rk2", h=H).step(f, x)
    np.testing.assert_allclose(mid, x + H * f(x + H / 2 * f(x)), rtol=1e-13)
    k1 = f(x)
    k2 = f(x + H * k1)
    heun, _ = get_scheme("heun", h=H).step(f, x)
    np.testing.assert_allclose(heun, x + H / 2 * (k1 + k2), rtol=1e-13)


def test_rk4_matches_hand_formula(problem):
    f, x, _ = problem
    k1 = f(x)
    k2 = f(x + H / 2 * k1)
    k3 = f(x + H / 2 * k2)
    k4 = f(x + H * k3)
    got, _ = get_scheme("rk4", h=H).step(f, x)
    np.testing.assert_allclose(got, x + H / 6 * (k1 + 2 * k2 + 2 * k3 + k4), rtol=1e-13)


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_backward_euler_runs_the_stated_fixed_point_iterations(problem, iterations):
    f, x, _ = problem
    z = x.copy()
    for _ in range(iterations):
        z = x + H * f(z)
    got, _ = get_scheme("backward_euler", h=H, iterations=iterations).step(f, x)
    np.testing.assert_allclose(got, z, rtol=1e-13)


def test_backward_euler_iterations_converge_to_the_implicit_solution(rng):
    a = rng.normal(size=(3, 3)) * 0.5
    x = rng.normal(size=(1, 3))
    implicit = np.linalg.solve(np.eye(3) - H * a, x[0])  # (I - hA) x_{t+1} = x_t
    got, _ = get_scheme("backward_euler", h=H, iterations=60).step(lambda v: v @ a.T, x)
    np.testing.assert_allclose(got[0], implicit, rtol=1e-10)


# -------------------------------------------------------------------------- multistep schemes


def test_lm_step_matches_formula_with_given_k(problem):
    f, x, x_prev = problem
    k = -0.07
    scheme = get_scheme("lm", h=H)
    got, history = scheme.step(f, x, History((x_prev,), ()), {"k": k})
    np.testing.assert_allclose(got, (1 - k) * x + k * x_prev + H * f(x), rtol=1e-13)
    np.testing.assert_array_equal(history.states[0], x)
    assert history.derivatives == ()


def test_lm_fixed_matches_formula(problem):
    f, x, x_prev = problem
    got, _ = get_scheme("lm_fixed", k=0.4).step(f, x, History((x_prev,), ()))
    np.testing.assert_allclose(got, 0.6 * x + 0.4 * x_prev + f(x), rtol=1e-13)


def test_ab2_reuses_the_previous_derivative(problem):
    f, x, x_prev = problem
    calls = []

    def counting_f(v):
        calls.append(v)
        return f(v)

    f_prev = f(x_prev)
    got, history = get_scheme("ab2", h=H).step(counting_f, x, History((), (f_prev,)))
    np.testing.assert_allclose(got, x + H * (1.5 * f(x) - 0.5 * f_prev), rtol=1e-13)
    assert len(calls) == 1  # one evaluation per step: F(x_{t-1}) came from the history
    np.testing.assert_allclose(history.derivatives[0], f(x), rtol=1e-13)


def test_leapfrog_matches_formula(problem):
    f, x, x_prev = problem
    got, history = get_scheme("leapfrog", h=H).step(f, x, History((x_prev,), ()))
    np.testing.assert_allclose(got, x_prev + 2 * H * f(x), rtol=1e-13)
    np.testing.assert_array_equal(history.states[0], x)


def test_two_step_formula_and_its_consistency(problem):
    f, x, x_prev = problem
    a1, b1 = 0.3, -0.2
    f_prev = f(x_prev)
    got, _ = get_scheme("two_step", h=H).step(f, x, History((x_prev,), (f_prev,)), {"a1": a1, "b1": b1})
    expected = (1 - a1) * x + a1 * x_prev + H * ((1 + a1 - b1) * f(x) + b1 * f_prev)
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    # consistency for every knob value: rho(1) = 0 and rho'(1) = sigma(1)
    for a1, b1 in [(0.0, 0.0), (0.7, 0.1), (-0.5, 2.0)]:
        c = get_scheme("two_step").coefficients({"a1": a1, "b1": b1})
        a0_, a1_ = c["alpha"]
        b0_, b1_ = c["beta"]
        assert a0_ + a1_ == pytest.approx(1.0)  # rho(z) = z^2 - a0 z - a1 -> rho(1) = 1 - a0 - a1
        assert 2 - a0_ == pytest.approx(b0_ + b1_)


def test_two_step_special_points_are_euler_ab2_leapfrog(problem):
    f, x, x_prev = problem
    f_prev = f(x_prev)
    history = History((x_prev,), (f_prev,))
    two = get_scheme("two_step", h=H)
    for knobs, name in [({"a1": 0.0, "b1": 0.0}, "euler"), ({"a1": 0.0, "b1": -0.5}, "ab2"), ({"a1": 1.0, "b1": 0.0}, "leapfrog")]:
        got, _ = two.step(f, x, history, knobs)
        ref = get_scheme(name, h=H)
        want = ref.step(f, x)[0] if ref.kind == "runge_kutta" else ref.step(f, x, History(
            history.states[: ref.num_past_states], history.derivatives[: ref.num_past_derivatives]))[0]
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)


# ------------------------------------------------------------------- first step and transitions


@pytest.mark.parametrize("name, knobs", [("lm", {"k": -0.05}), ("ab2", None), ("leapfrog", None), ("two_step", {"a1": 0.2, "b1": 0.1})])
def test_euler_start_takes_one_forward_euler_step(problem, name, knobs):
    f, x, _ = problem
    scheme = get_scheme(name, h=H)
    got, history = scheme.step(f, x, None, knobs, start="euler")
    np.testing.assert_allclose(got, x + H * f(x), rtol=1e-13)
    # the history now holds (x_0, F(x_0)) for the second step
    for s in history.states:
        np.testing.assert_array_equal(s, x)
    for d in history.derivatives:
        np.testing.assert_allclose(d, f(x), rtol=1e-13)


def test_euler_start_with_a_first_flag_ignores_the_given_history(problem):
    f, x, x_prev = problem
    got, _ = get_scheme("lm").step(f, x, History((x_prev * 100,), ()), {"k": 0.5}, first=True)
    np.testing.assert_allclose(got, x + f(x), rtol=1e-13)


def test_copy_start_fills_the_past_with_the_present(problem):
    f, x, _ = problem
    # x_{-1} = x_0: LM reduces to Euler for any k, leapfrog becomes x_0 + 2h F(x_0)
    lm, _ = get_scheme("lm", h=H).step(f, x, None, {"k": 0.37}, start="copy")
    np.testing.assert_allclose(lm, x + H * f(x), rtol=1e-13)
    lf, _ = get_scheme("leapfrog", h=H).step(f, x, None, start="copy")
    np.testing.assert_allclose(lf, x + 2 * H * f(x), rtol=1e-13)
    ab, _ = get_scheme("ab2", h=H).step(f, x, None, start="copy")
    np.testing.assert_allclose(ab, x + H * f(x), rtol=1e-13)  # 3/2 F - 1/2 F


@pytest.fixture()
def transition(rng):
    """A shape-changing block: F_T maps 4 -> 6 channels, S zero-pads one channel on each side."""
    w = rng.normal(size=(4, 6)) * 0.5
    x = rng.normal(size=(2, 4))

    def f(v):
        return np.tanh(v @ w)

    def shortcut(v):
        return np.pad(v, ((0, 0), (1, 1)))

    return f, shortcut, x


@pytest.mark.parametrize("name", ["euler", "rk4", "midpoint", "backward_euler"])
def test_one_step_schemes_take_an_euler_step_at_a_transition(transition, name):
    f, shortcut, x = transition
    got, _ = get_scheme(name, h=H).step(f, x, shortcut=shortcut)
    np.testing.assert_allclose(got, shortcut(x) + H * f(x), rtol=1e-13)


def test_restart_at_a_transition_starts_from_the_projected_state(transition, rng):
    f, shortcut, x = transition
    scheme = get_scheme("lm", h=H)
    x1, history = scheme.step(f, x, None, {"k": 0.2}, shortcut=shortcut)
    np.testing.assert_allclose(x1, shortcut(x) + H * f(x), rtol=1e-13)
    np.testing.assert_array_equal(history.states[0], shortcut(x))  # the reference code's x_{t-1}


def test_project_at_a_transition_maps_the_history_through_the_shortcut(transition, rng):
    f, shortcut, x = transition
    x_prev = rng.normal(size=x.shape)
    f_prev = rng.normal(size=x.shape)
    k = -0.08
    lm, _ = get_scheme("lm", h=H).step(f, x, History((x_prev,), ()), {"k": k}, shortcut=shortcut)
    np.testing.assert_allclose(lm, (1 - k) * shortcut(x) + k * shortcut(x_prev) + H * f(x), rtol=1e-13)
    ab, history = get_scheme("ab2", h=H).step(f, x, History((), (f_prev,)), shortcut=shortcut)
    np.testing.assert_allclose(ab, shortcut(x) + H * (1.5 * f(x) - 0.5 * shortcut(f_prev)), rtol=1e-13)
    assert history.derivatives[0].shape == (2, 6)


# ------------------------------------------------------------------------------------ records


@pytest.mark.parametrize(
    "name, order, evals, past_states, past_derivatives, knobs",
    [
        ("euler", 1, 1, 0, 0, ()),
        ("lm", 1, 1, 1, 0, ("k",)),
        ("lm_fixed", 1, 1, 1, 0, ()),
        ("midpoint", 2, 2, 0, 0, ()),
        ("heun", 2, 2, 0, 0, ()),
        ("rk4", 4, 4, 0, 0, ()),
        ("ab2", 2, 1, 0, 1, ()),
        ("leapfrog", 2, 1, 1, 0, ()),
        ("backward_euler", 1, 3, 0, 0, ()),
        ("two_step", 1, 1, 1, 1, ("a1", "b1")),
    ],
)
def test_catalogue_records(name, order, evals, past_states, past_derivatives, knobs):
    scheme = get_scheme(name)
    assert (scheme.order, scheme.evals_per_step) == (order, evals)
    assert (scheme.num_past_states, scheme.num_past_derivatives) == (past_states, past_derivatives)
    assert scheme.knob_names == knobs
    assert scheme.formula and scheme.h == 1.0


def test_evaluation_count_matches_the_record(problem):
    f, x, x_prev = problem
    for name in S.available_schemes():
        scheme = get_scheme(name, iterations=4) if name in ("backward_euler", "implicit_euler") else get_scheme(name)
        calls = []

        def counting_f(v, calls=calls):
            calls.append(1)
            return f(v)

        history = scheme.empty_history(x) if scheme.kind == "multistep" else None
        scheme.step(counting_f, x, history, scheme.default_knobs())
        assert len(calls) == scheme.evals_per_step, name


def test_schemes_are_frozen_and_hashable():
    scheme = get_scheme("lm")
    with pytest.raises(Exception):
        scheme.h = 2.0  # type: ignore[misc]
    assert hash(scheme) == hash(get_scheme("lm"))
    assert scheme.with_step(0.25).h == 0.25


def test_constrained_knob_reparametrization_round_trips_and_stays_inside():
    knob = get_scheme("lm", constrain=True).knobs[0]
    values = np.array([-0.9, -0.1, 0.0, 0.5, 0.99])
    np.testing.assert_allclose(np.asarray(knob.to_value(knob.to_raw(values))), values, rtol=1e-6, atol=1e-6)
    extreme = np.asarray(knob.to_value(np.array([-50.0, 50.0])))
    assert np.all(extreme >= -1.0) and np.all(extreme <= 1.0)
    free = get_scheme("lm").knobs[0]
    assert free.bounds is None and free.to_value(3.0) == 3.0


# --------------------------------------------------------------------------------- bad input


def test_unknown_scheme_name_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError, match=r"name='rk5'.*valid names:.*rk4"):
        get_scheme("rk5")


@pytest.mark.parametrize("h", [0.0, -0.5, float("nan"), float("inf")])
def test_nonpositive_step_is_rejected(h):
    with pytest.raises(ValueError, match=r"^h="):
        get_scheme("rk4", h=h)


@pytest.mark.parametrize("iterations", [0, -1])
def test_implicit_iterations_below_one_are_rejected(iterations):
    with pytest.raises(ValueError, match=r"iterations="):
        get_scheme("backward_euler", iterations=iterations)


def test_k_init_outside_the_stable_interval_is_rejected_when_constrained():
    with pytest.raises(ValueError, match=r"k_init=\(-1.5, 0.0\).*k_bounds"):
        get_scheme("lm", k_init=(-1.5, 0.0), constrain=True)
    with pytest.raises(ValueError, match=r"k_init"):
        get_scheme("lm", k_init=(-0.1, 1.0), constrain=True)  # 1 is on the boundary of the open interval
    get_scheme("lm", k_init=(-1.5, 0.0))  # fine without the constraint
    with pytest.raises(ValueError, match=r"a1_init"):
        get_scheme("two_step", a1_init=(0.5, 2.0), constrain=True)


def test_unknown_option_and_bad_start_are_rejected(problem):
    f, x, _ = problem
    with pytest.raises(ValueError, match=r"no option kk="):
        get_scheme("lm", kk=0.1)
    with pytest.raises(ValueError, match=r"start='zero'"):
        get_scheme("ab2").step(f, x, start="zero")
    with pytest.raises(ValueError, match=r"knobs=.*lacks \['k'\]"):
        get_scheme("lm").step(f, x, None, {})
