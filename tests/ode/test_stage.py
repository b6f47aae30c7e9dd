"""`ODEStage` against hand-written numpy loops, against `analysis.integrate` (the same update
rule), scan vs unrolled, tied depth refinement, stochastic depth, knobs and bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.ode import (
    ODEStage, StageOptions, analysis, get_scheme, linear_drop_path_rates, stack_unrolled, unstack_scanned,
)
from cnn.ode.schemes import History
from cnn.ode.stage import SchemeKnobs, fit_knob_layout, knob_values


class Mix(nn.Module):
    """F(x) = tanh(x[:, ::s, ::s] W + b): a per-pixel dense map (channels -> features)."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, *, train):
        del train
        x = x[:, :: self.strides, :: self.strides, :]
        return jnp.tanh(nn.Dense(self.features, name="dense")(x))


class Pad(nn.Module):
    """Shortcut: subsample with the stride, zero-pad new channels at the end."""

    features: int
    strides: int = 2

    @nn.compact
    def __call__(self, x, *, train):
        del train
        x = x[:, :: self.strides, :: self.strides, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))


def np_mix(p, strides=1):
    w, b = np.asarray(p["dense"]["kernel"], np.float64), np.asarray(p["dense"]["bias"], np.float64)
    return lambda x: np.tanh(x[:, ::strides, ::strides, :] @ w + b)


def np_pad(x, features, strides=2):
    x = x[:, ::strides, ::strides, :]
    return np.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


def block_params(params, i, scanned):
    """Parameters of identical block i (0-based among the scanned ones)."""
    if scanned:
        return jax.tree_util.tree_map(lambda a: a[i], params["blocks"]["block"])
    return params[f"blocks_{i}"]["block"]


def lm_stage(scan, **options):
    return ODEStage(
        scheme=get_scheme("lm"),
        block=functools.partial(Mix, features=4),
        entry_block=functools.partial(Mix, features=4, strides=2),
        entry_shortcut=functools.partial(Pad, features=4),
        num_blocks=3,
        options=StageOptions(scan=scan, **options),
    )


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_lm_stage_with_transition_matches_a_numpy_loop(x64, rng, scan):
    x0 = rng.normal(size=(2, 4, 4, 2))
    stage = lm_stage(scan)
    variables = stage.init(jax.random.PRNGKey(0), jnp.asarray(x0), train=False)
    params = variables["params"]
    k = np.asarray(params["knobs"]["k"], np.float64)
    # block 0 (the transition, restart) takes an Euler step: only blocks 1 and 2 have a k
    assert k.shape == (2,) and np.all((-0.1 <= k) & (k <= 0.0))  # U[-0.1, 0]
    y, history = stage.apply(variables, jnp.asarray(x0), train=False)

    # by hand: transition (restart: Euler step with the shortcut), then LM steps
    f0 = np_mix(params["entry"]["block"], strides=2)
    s0 = np_pad(x0, 4)
    x1 = s0 + f0(x0)
    f1 = np_mix(block_params(params, 0, scan))
    x2 = (1 - k[0]) * x1 + k[0] * s0 + f1(x1)
    f2 = np_mix(block_params(params, 1, scan))
    x3 = (1 - k[1]) * x2 + k[1] * x1 + f2(x2)
    np.testing.assert_allclose(np.asarray(y), x3, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(history.states[0]), x2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name, start",
    [("lm", "euler"), ("leapfrog", "copy"), ("ab2", "euler"), ("two_step", "copy")],
)
def test_first_step_inside_the_scan(x64, rng, name, start):
    """Without an entry block, block 0 takes the start step under a traced `first` flag."""
    scheme = get_scheme(name, h=0.5)
    stage = ODEStage(scheme=scheme, block=functools.partial(Mix, features=3), num_blocks=3,
                     options=StageOptions(start=start))
    x0 = rng.normal(size=(2, 2, 2, 3))
    variables = stage.init(jax.random.PRNGKey(1), jnp.asarray(x0), train=False)
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    if scheme.knobs:  # make the knobs matter
        params["knobs"] = {name: np.array([0.3, -0.4, 0.25]) for name in scheme.knob_names}
    y, _ = stage.apply({"params": params}, jnp.asarray(x0), train=False)
    fs = [np_mix(block_params(params, i, True)) for i in range(3)]
    h = 0.5
    xs, ds = [x0], []
    for t in range(3):
        d = fs[t](xs[t])
        knob = {n: params["knobs"][n][t] for n in scheme.knob_names}
        if t == 0 and start == "euler":
            xs.append(xs[0] + h * d)
        else:
            x_prev = xs[t - 1] if t > 0 else xs[0]  # copy start: x_{-1} = x_0, F_{-1} = F(x_0)
            d_prev = ds[t - 1] if t > 0 else d
            if name == "lm":
                xs.append((1 - knob["k"]) * xs[t] + knob["k"] * x_prev + h * d)
            elif name == "leapfrog":
                xs.append(x_prev + 2 * h * d)
            elif name == "ab2":
                xs.append(xs[t] + h * (1.5 * d - 0.5 * d_prev))
            else:
                a1, b1 = knob["a1"], knob["b1"]
                xs.append((1 - a1) * xs[t] + a1 * x_prev + h * ((1 + a1 - b1) * d + b1 * d_prev))
        ds.append(d)
    np.testing.assert_allclose(np.asarray(y), xs[-1], rtol=1e-12, atol=1e-12)


def test_project_mode_carries_the_history_through_the_shortcut(x64, rng):
    """Two stages; the second starts with an LM step on S(x_t), S(x_{t-1})."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            x, history = ODEStage(get_scheme("lm"), functools.partial(Mix, features=2), 2, name="a")(x, train=False)
            return ODEStage(
                get_scheme("lm"), functools.partial(Mix, features=4), 2,
                entry_block=functools.partial(Mix, features=4, strides=2),
                entry_shortcut=functools.partial(Pad, features=4),
                options=StageOptions(history_at_entry="project"), name="b",
            )(x, history, train=False)

    x0 = rng.normal(size=(2, 4, 4, 2))
    variables = Two().init(jax.random.PRNGKey(2), jnp.asarray(x0))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    y, _ = Two().apply(variables, jnp.asarray(x0))
    ka, kb = p["a"]["knobs"]["k"], p["b"]["knobs"]["k"]
    x1 = x0 + np_mix(block_params(p["a"], 0, True))(x0)
    x2 = (1 - ka[1]) * x1 + ka[1] * x0 + np_mix(block_params(p["a"], 1, True))(x1)
    x3 = (1 - kb[0]) * np_pad(x2, 4) + kb[0] * np_pad(x1, 4) + np_mix(p["b"]["entry"]["block"], 2)(x2)
    x4 = (1 - kb[1]) * x3 + kb[1] * np_pad(x2, 4) + np_mix(block_params(p["b"], 0, True))(x3)
    np.testing.assert_allclose(np.asarray(y), x4, rtol=1e-12, atol=1e-12)


def _two_stages(scheme, mode="project"):
    """Stage a (2 Mix blocks, no transition) then stage b whose block 0 changes shape, with a
    projection shortcut conv1x1/2 + BatchNorm (momentum 0.9) and `history_at_entry=mode`."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x, history = ODEStage(get_scheme(scheme), functools.partial(Mix, features=2), 2, name="a")(x, train=train)
            return ODEStage(
                get_scheme(scheme), functools.partial(Mix, features=4), 2,
                entry_block=functools.partial(Mix, features=4, strides=2),
                entry_shortcut=functools.partial(Projection, features=4), options=StageOptions(history_at_entry=mode),
                name="b",
            )(x, history, train=train)

    return Two()


def _projection_numpy(variables, eps=1e-5):
    """(conv: x -> x[:, ::2, ::2] W, gamma, beta, running mean, running var) of stage b's shortcut."""
    p = variables["params"]["b"]["entry"]["shortcut"]
    stats = variables["batch_stats"]["b"]["entry"]["shortcut"]["BatchNorm_0"]
    w = np.asarray(p["Conv_0"]["kernel"], np.float64)[0, 0]
    gamma, beta = (np.asarray(p["BatchNorm_0"][k], np.float64) for k in ("scale", "bias"))
    mean, var = (np.asarray(stats[k], np.float64) for k in ("mean", "var"))
    return (lambda x: x[:, ::2, ::2, :] @ w), gamma, beta, mean, var


def _with_batchnorm_values(variables, rng):
    """Non-trivial BatchNorm scale, bias and running statistics in stage b's shortcut."""
    variables = jax.tree_util.tree_map(np.asarray, variables)
    p = variables["params"]["b"]["entry"]["shortcut"]["BatchNorm_0"]
    stats = variables["batch_stats"]["b"]["entry"]["shortcut"]["BatchNorm_0"]
    p["scale"], p["bias"] = rng.uniform(0.5, 2.0, 4), rng.normal(size=4)
    stats["mean"], stats["var"] = rng.normal(size=4), rng.uniform(0.5, 2.0, 4)
    return variables


def test_project_mode_moves_past_derivatives_through_the_linear_part_of_the_shortcut(x64, rng):
    """AB2 at a transition in eval mode: y1 = S(x2) + 3/2 G0(x2) - 1/2 L(F1(x1)) with S = BN(conv)
    and its linear part L(d) = conv(d) gamma / sqrt(var + eps): no running mean, no bias."""
    model = _two_stages("ab2")
    x0 = rng.normal(size=(3, 4, 4, 2))
    variables = _with_batchnorm_values(model.init(jax.random.PRNGKey(2), jnp.asarray(x0), False), rng)
    y, _ = model.apply(variables, jnp.asarray(x0), False)
    p = variables["params"]
    conv, gamma, beta, mean, var = _projection_numpy(variables)
    inv = gamma / np.sqrt(var + 1e-5)
    f0, f1 = np_mix(block_params(p["a"], 0, True)), np_mix(block_params(p["a"], 1, True))
    x1 = x0 + f0(x0)  # Euler start
    d1 = f1(x1)
    x2 = x1 + 1.5 * d1 - 0.5 * f0(x0)
    g0 = np_mix(p["b"]["entry"]["block"], 2)
    y1 = (conv(x2) - mean) * inv + beta + 1.5 * g0(x2) - 0.5 * conv(d1) * inv
    y2 = y1 + 1.5 * np_mix(block_params(p["b"], 0, True))(y1) - 0.5 * g0(x2)
    np.testing.assert_allclose(np.asarray(y), y2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scheme", ["ab2", "lm"])
def test_project_mode_updates_the_shortcut_statistics_once(x64, rng, scheme):
    """In training only S(x_t) updates the shortcut's BatchNorm running averages (momentum 0.9,
    statistics of conv(x_t)); the projected past (a derivative for AB2, a state for LM) does not."""
    model = _two_stages(scheme)
    x0 = jnp.asarray(rng.normal(size=(3, 4, 4, 2)))
    variables = _with_batchnorm_values(model.init(jax.random.PRNGKey(3), x0, False), rng)
    (y, _), updates = model.apply(variables, x0, True, mutable=["batch_stats"])
    # stage a by hand: x_t entering stage b and the past state x_{t-1}
    p = variables["params"]
    f0, f1 = np_mix(block_params(p["a"], 0, True)), np_mix(block_params(p["a"], 1, True))
    x_prev = np.asarray(x0) + f0(np.asarray(x0))  # Euler start
    if scheme == "ab2":
        x_t = x_prev + 1.5 * f1(x_prev) - 0.5 * f0(np.asarray(x0))
    else:
        ka = np.asarray(p["a"]["knobs"]["k"], np.float64)  # no transition: block 0 keeps its (unused) k
        x_t = (1 - ka[1]) * x_prev + ka[1] * np.asarray(x0) + f1(x_prev)
    conv, _, _, mean, var = _projection_numpy(variables)
    c = conv(x_t)
    new = updates["batch_stats"]["b"]["entry"]["shortcut"]["BatchNorm_0"]
    np.testing.assert_allclose(np.asarray(new["mean"]), 0.9 * mean + 0.1 * c.mean(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(new["var"]), 0.9 * var + 0.1 * c.var(axis=(0, 1, 2)), rtol=1e-10)
    if scheme == "lm":  # the past state x_{t-1} through S with its own batch statistics
        _, gamma, beta, _, _ = _projection_numpy(variables)
        cp = conv(x_prev)
        s_prev = (cp - cp.mean(axis=(0, 1, 2))) / np.sqrt(cp.var(axis=(0, 1, 2)) + 1e-5) * gamma + beta
        s_now = (c - c.mean(axis=(0, 1, 2))) / np.sqrt(c.var(axis=(0, 1, 2)) + 1e-5) * gamma + beta
        k = np.asarray(p["b"]["knobs"]["k"], np.float64)
        assert k.shape == (2,)  # project mode: block 0 uses its k
        g0 = np_mix(p["b"]["entry"]["block"], 2)
        y1 = (1 - k[0]) * s_now + k[0] * s_prev + g0(x_t)
        y2 = (1 - k[1]) * y1 + k[1] * s_now + np_mix(block_params(p["b"], 0, True))(y1)
        np.testing.assert_allclose(np.asarray(y), y2, rtol=1e-9, atol=1e-9)


def test_step_activation_is_applied_after_each_step(x64, rng):
    stage = ODEStage("euler", functools.partial(Mix, features=3), 2, step_activation=nn.relu)
    x0 = rng.normal(size=(1, 2, 2, 3))
    variables = stage.init(jax.random.PRNGKey(0), jnp.asarray(x0), train=False)
    y, _ = stage.apply(variables, jnp.asarray(x0), train=False)
    p = variables["params"]
    x1 = np.maximum(x0 + np_mix(block_params(p, 0, True))(x0), 0)
    x2 = np.maximum(x1 + np_mix(block_params(p, 1, True))(x1), 0)
    np.testing.assert_allclose(np.asarray(y), x2, rtol=1e-12)


# ------------------------------------------------------------ the network runs the analysed rule


class Linear(nn.Module):
    """F(x) = x K (channels -> channels), K a parameter: a linear vector field."""

    @nn.compact
    def __call__(self, x, *, train):
        del train
        return nn.Dense(x.shape[-1], use_bias=False, name="dense")(x)


@pytest.mark.parametrize(
    "name, options, knobs, start",
    [
        ("euler", {}, None, "euler"),
        ("midpoint", {}, None, "euler"),
        ("rk4", {}, None, "euler"),
        ("backward_euler", {"iterations": 4}, None, "euler"),
        ("ab2", {}, None, "euler"),
        ("leapfrog", {}, None, "copy"),
        ("lm", {}, {"k": 0.3}, "euler"),
        ("two_step", {}, {"a1": 0.3, "b1": 0.2}, "euler"),
    ],
)
def test_tied_stage_reproduces_the_analysis_integration(x64, name, options, knobs, start):
    """A tied stage with F(x) = A x is exactly `analysis.integrate` of the same scheme."""
    f, _, a = analysis.rotation_decay()
    n, t_final = 16, 1.0
    scheme = get_scheme(name, h=t_final / n, **options)
    stage = ODEStage(scheme, Linear, n, options=StageOptions(tied=True, start=start))
    x0 = np.array([[[[1.0, 0.5]]], [[[-0.3, 0.8]]]])  # [2, 1, 1, 2]
    variables = stage.init(jax.random.PRNGKey(0), jnp.asarray(x0), train=False)
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["tied_block"]["block"]["dense"]["kernel"] = a.T
    if knobs:
        params["knobs"] = {k: np.full(n, v) for k, v in knobs.items()}
    y, _ = stage.apply({"params": params}, jnp.asarray(x0), train=False)
    expected = analysis.integrate(scheme, f, x0, n, knobs, start=start)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-13)


class ConvTanh(nn.Module):
    features: int = 3

    @nn.compact
    def __call__(self, x, *, train):
        del train
        return jnp.tanh(nn.Conv(self.features, (3, 3), name="conv")(x))


@pytest.mark.parametrize("name, ratio", [("euler", 0.5), ("midpoint", 0.25)])
def test_tied_depth_n_and_2n_converge_to_the_same_flow(x64, rng, name, ratio):
    """Depth N with h = T/N: |y_N - y_2N| shrinks by 2^-order per doubling (same weights for all N)."""
    x0 = jnp.asarray(rng.normal(size=(2, 5, 5, 3)))
    t_final = 1.0
    params = None
    outputs = {}
    for n in (4, 8, 16, 32):
        stage = ODEStage(get_scheme(name, h=t_final / n), ConvTanh, n, options=StageOptions(tied=True))
        if params is None:
            params = stage.init(jax.random.PRNGKey(3), x0, train=False)["params"]
        outputs[n] = np.asarray(stage.apply({"params": params}, x0, train=False)[0])
    diffs = [np.max(np.abs(outputs[n] - outputs[2 * n])) for n in (4, 8, 16)]
    assert all(d1 > d2 for d1, d2 in zip(diffs, diffs[1:])), diffs
    observed = diffs[-1] / diffs[-2]
    assert observed == pytest.approx(ratio, abs=0.05), diffs


# ----------------------------------------------------------------------- scan versus unrolled


def _norm(train):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class ConvBN(nn.Module):
    """conv-BN-relu-conv-BN with a stride, the shape of a real residual branch."""

    features: int = 4
    strides: int = 1

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
        x = nn.relu(_norm(train)(x))
        x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        return _norm(train)(x)


class Projection(nn.Module):
    features: int = 4
    strides: int = 2

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
        return _norm(train)(x)


def _stage(scheme, scan, tied, **kw):
    return ODEStage(
        scheme=get_scheme(scheme), block=ConvBN, num_blocks=3, entry_block=functools.partial(ConvBN, strides=2),
        entry_shortcut=Projection, options=StageOptions(scan=scan, tied=tied, **kw),
        drop_path_rates=linear_drop_path_rates(3, 0.5),
    )


@pytest.mark.parametrize(
    "scheme, tied, kw",
    [("lm", False, {"remat": True}), ("ab2", True, {"start": "copy"})],
    ids=["lm-remat", "ab2-tied"],
)
def test_scan_and_unrolled_give_identical_outputs_gradients_and_statistics(rng, scheme, tied, kw):
    """float32 (flax keeps BatchNorm statistics in float32, which a tied scan carries)."""
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    unrolled, scanned = _stage(scheme, False, tied, **kw), _stage(scheme, True, tied, **kw)
    v_unrolled = unrolled.init(jax.random.PRNGKey(0), x, train=False)
    v_scanned = v_unrolled if tied else {c: stack_unrolled(t) for c, t in v_unrolled.items()}
    if not tied:
        assert jax.tree_util.tree_structure(v_scanned) == jax.tree_util.tree_structure(
            jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x, train=False)))
    rngs = {"dropout": jax.random.PRNGKey(7)}

    def run(model, variables):
        def loss(params):
            (y, _), updates = model.apply({**variables, "params": params}, x, train=True, rngs=rngs, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), (y, updates)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (_, (y_u, upd_u)), g_u = run(unrolled, v_unrolled)
    (_, (y_s, upd_s)), g_s = run(scanned, v_scanned)
    if not tied:
        g_s, upd_s = unstack_scanned(g_s), unstack_scanned(upd_s)

    def close(a, b):
        scale = float(np.max(np.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, rtol=0, atol=2e-5)

    close(y_s, y_u)
    jax.tree_util.tree_map(close, g_s, g_u)
    jax.tree_util.tree_map(close, upd_s, upd_u)
    if tied:  # eval mode broadcasts the statistics instead of carrying them
        e_u = unrolled.apply(v_unrolled, x, train=False)[0]
        e_s = scanned.apply(v_scanned, x, train=False)[0]
        close(e_s, e_u)
    if scheme == "lm":  # blocks 1, 2 have knobs and they receive gradient (block 0: Euler step, none)
        gk = np.asarray(g_u["knobs"]["k"])
        assert gk.shape == (2,) and np.all(gk != 0.0)


def test_layout_conversion_round_trips():
    tree = {"stage": {"blocks_0": {"w": np.ones(2)}, "blocks_1": {"w": np.zeros(2)}, "entry": {"w": np.ones(1)}}}
    stacked = stack_unrolled(tree)
    assert stacked["stage"]["blocks"]["w"].shape == (2, 2)
    back = unstack_scanned(stacked)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)


# ------------------------------------------------------------------------- knobs and params


def test_lm_adds_one_scalar_per_block_after_the_transition_and_rk_adds_none():
    x = jnp.zeros((1, 8, 8, 2))

    def count(scheme, tied=False):
        stage = _stage(scheme, True, tied)
        shapes = jax.eval_shape(lambda: stage.init(jax.random.PRNGKey(0), x, train=False))
        return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes["params"]))

    base = count("euler")
    # 3 blocks; block 0 is a transition whose Euler step ("restart") reads no knob
    assert count("lm") == base + 2
    assert count("two_step") == base + 2 * 2
    for name in ("rk2", "heun", "rk4", "ab2", "leapfrog", "backward_euler", "lm_fixed"):
        assert count(name) == base, name
    # tied: entry block + one shared block instead of entry + 2
    conv_bn = 2 * (9 * 4 * 4) + 2 * 2 * 4
    assert base - count("euler", tied=True) == conv_bn


def test_knobs_without_the_first_block_start_where_they_started():
    """`skip_first`: no parameter for block 0, the others initialized as when every block had one."""
    scheme = get_scheme("lm")
    full = SchemeKnobs(scheme, 5).init(jax.random.PRNGKey(4))["params"]["k"]
    skipping = SchemeKnobs(scheme, 5, skip_first=True)
    params = skipping.init(jax.random.PRNGKey(4))["params"]
    np.testing.assert_array_equal(params["k"], full[1:])
    values = skipping.apply({"params": params})["k"]
    np.testing.assert_array_equal(values, np.concatenate([[0.0], full[1:]]))  # a placeholder for block 0


def test_takes_history_false_drops_block_0s_knob_and_refuses_a_history():
    stage = ODEStage("lm", functools.partial(Mix, features=2), 3, takes_history=False)
    x = jnp.zeros((1, 2, 2, 2))
    variables = stage.init(jax.random.PRNGKey(0), x, train=False)
    assert variables["params"]["knobs"]["k"].shape == (2,)
    assert ODEStage("lm", functools.partial(Mix, features=2), 3).init(
        jax.random.PRNGKey(0), x, train=False)["params"]["knobs"]["k"].shape == (3,)
    with pytest.raises(ValueError, match="takes_history=False"):
        stage.apply(variables, x, History((x,), ()), train=False)


def test_knob_init_range_and_constraint():
    knobs = SchemeKnobs(get_scheme("lm", k_init=(-0.3, -0.2), constrain=True), 200)
    params = knobs.init(jax.random.PRNGKey(0))["params"]
    values = np.asarray(knobs.apply({"params": params})["k"])
    assert values.shape == (200,) and values.min() >= -0.3 - 1e-6 and values.max() <= -0.2 + 1e-6
    assert values.std() > 0.02  # uniform on [-0.3, -0.2] has std 0.029
    np.testing.assert_allclose(np.tanh(np.asarray(params["k"])), values, rtol=1e-5)  # k = tanh(raw)
    huge = knobs.apply({"params": {"k": jnp.full(200, 40.0)}})["k"]
    assert float(jnp.max(huge)) <= 1.0  # the constraint keeps k inside (-1, 1)


def test_learned_knobs_are_read_per_block_and_plotted(tmp_path):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = None
            for s, n in enumerate((3, 2)):
                x, h = ODEStage(get_scheme("lm", constrain=True), functools.partial(Mix, features=2), n,
                                name=f"stage{s}")(x, h, train=False)
            return x

    shapes = jax.eval_shape(lambda: Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 2))))["params"]
    params = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    params["stage0"]["knobs"]["k"] = np.arctanh(np.array([0.1, 0.2, 0.3]))
    params["stage1"]["knobs"]["k"] = np.arctanh(np.array([-0.4, 0.5]))
    scheme = get_scheme("lm", constrain=True)
    np.testing.assert_allclose(analysis.learned_knobs(params, scheme), [0.1, 0.2, 0.3, -0.4, 0.5], rtol=1e-6)
    assert list(knob_values(params, scheme)) == ["stage0", "stage1"]
    path = analysis.plot_learned_knobs({"params": params}, tmp_path / "k.png", scheme)
    with open(path, "rb") as fh:
        assert fh.read(4) == b"\x89PNG"


def test_old_parameter_trees_with_a_knob_for_every_block_fit_the_new_layout():
    """Checkpoints written when every block had a k: the transition stages' block-0 values (unused)
    are dropped, stages that lost all knobs lose the subtree; optimizer-state copies follow."""
    import cnn.models as models

    x = jnp.zeros((1, 8, 8, 3))
    for depth, kept in ((14, {"stage1": 2, "stage2": 1, "stage3": 1}), (8, {"stage1": 1})):
        model = models.create("cifar_resnet", depth=depth, width=2, scheme="lm")
        params = jax.tree_util.tree_map(np.asarray, model.init(jax.random.PRNGKey(0), x, train=False)["params"])
        n = (depth - 2) // 6
        old = jax.tree_util.tree_map(lambda a: a, params)
        for stage in ("stage2", "stage3"):  # the old layout: n values, index 0 unused
            new_k = params[stage]["knobs"]["k"] if "knobs" in params[stage] else np.zeros((0,), np.float32)
            old[stage] = dict(old[stage], knobs={"k": np.concatenate([[0.123], new_k]).astype(np.float32)})
        assert {s: len(old[s]["knobs"]["k"]) for s in ("stage1", "stage2", "stage3")} == dict.fromkeys(
            ("stage1", "stage2", "stage3"), n)
        assert {s: params[s]["knobs"]["k"].shape[0] for s in kept} == kept
        state = {"params": old, "opt_state": ({"trace": old}, ())}
        fitted = fit_knob_layout(state, {"params": params, "opt_state": ({"trace": params}, ())})
        for tree in (fitted["params"], fitted["opt_state"][0]["trace"]):
            assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
            jax.tree_util.tree_map(np.testing.assert_array_equal, tree, params)
    with pytest.raises(ValueError, match="fits neither"):
        fit_knob_layout({"knobs": {"k": np.zeros(5)}}, {"knobs": {"k": np.zeros(2)}})
    with pytest.raises(ValueError, match="does not have"):
        fit_knob_layout({"a": 1, "b": 2}, {"a": 1})


# --------------------------------------------------------------------------- stochastic depth


def test_linear_drop_path_rates():
    np.testing.assert_allclose(linear_drop_path_rates(4, 0.5), [0.125, 0.25, 0.375, 0.5])
    assert linear_drop_path_rates(3, 1.0) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="final_survival"):
        linear_drop_path_rates(3, 0.0)


def test_drop_path_keeps_or_drops_each_sample_with_rescaling(x64, rng):
    stage = ODEStage("lm_fixed", functools.partial(Mix, features=2), 1, drop_path_rates=(0.5,))
    x0 = jnp.asarray(rng.normal(size=(400, 1, 1, 2)))
    variables = stage.init(jax.random.PRNGKey(0), x0, train=False)
    f = np_mix(block_params(variables["params"], 0, True))
    y, _ = stage.apply(variables, x0, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
    y, x = np.asarray(y), np.asarray(x0)
    kept = np.all(np.isclose(y, x + f(x) / 0.5), axis=(1, 2, 3))
    dropped = np.all(np.isclose(y, x), axis=(1, 2, 3))
    assert np.all(kept ^ dropped)
    assert 150 < kept.sum() < 250  # Binomial(400, 0.5): mean 200, sd 10
    y_eval, _ = stage.apply(variables, x0, train=False)
    np.testing.assert_allclose(np.asarray(y_eval), x + f(x), rtol=1e-12)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scheme": "rk5"}, r"name='rk5'"),
        ({"num_blocks": 0}, r"num_blocks=0"),
        ({"options": {"scan": False}}, r"^options=[\s\S]*: expected a StageOptions"),
        ({"drop_path_rates": (0.1, 0.2)}, r"drop_path_rates has 2 entries"),
        ({"drop_path_rates": (0.1, 1.0, 0.2)}, r"drop_path_rates=.*\[0, 1\)"),
        ({"entry_block": Mix}, r"entry_block and entry_shortcut"),
    ],
)
def test_bad_stage_options_raise_value_errors_naming_them(kwargs, match):
    options = dict(scheme="euler", block=functools.partial(Mix, features=2), num_blocks=3)
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ODEStage(**options).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 2)), train=False)


def test_history_with_the_wrong_structure_is_rejected(rng):
    x = rng.normal(size=(1, 3))
    with pytest.raises(ValueError, match="history has 0 states"):
        get_scheme("lm").step(np.tanh, x, History(), {"k": 0.0})
