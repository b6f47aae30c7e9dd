"""Backward Euler solved to a tolerance in a network: the implicit equation, the sweeps and
residuals it reports, the implicit-function-theorem gradient, and the F-evaluation count of the
network that runs (hand counts per scheme and depth)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models as models
from cnn.models.cifar_resnet import CifarResidual
from cnn.ode import ODEStage, StageOptions, get_scheme
from cnn.ode.stage import (
    count_f_evaluations,
    implicit_scheme_label,
    implicit_solve_stats,
    summarize_implicit_solve,
)


class Scalar(nn.Module):
    """F(x) = a x with the scalar `a` a parameter (a 1x1 Dense without bias on one channel)."""

    @nn.compact
    def __call__(self, x, *, train):
        del train
        return nn.Dense(1, use_bias=False, name="dense")(x)


def scalar_stage(a, **options):
    stage = ODEStage(get_scheme("backward_euler", **options), Scalar, num_blocks=1)
    x = jnp.asarray(np.array([1.0, -0.5, 2.0]).reshape(3, 1, 1, 1))
    variables = {"params": {"blocks": {"block": {"dense": {"kernel": jnp.full((1, 1, 1), a)}}}}}
    return stage, variables, x


def hand_sweeps(x, a, h, tolerance, max_sweeps):
    """The masked fixed-point iteration by hand: z_i = x + h a z_{i-1}, stop when the change of a
    sweep relative to its result (norms over the batch) is <= tolerance."""
    z = x.copy()
    for sweep in range(1, max_sweeps + 1):
        new = x + h * a * z
        change = np.linalg.norm(new - z) / np.linalg.norm(new)
        z = new
        if change <= tolerance:
            return z, sweep, change
    return z, max_sweeps, change


@pytest.mark.parametrize("a, h", [(0.5, 1.0), (-0.6, 1.0), (0.3, 2.0)])
def test_backward_euler_solves_the_implicit_equation_to_the_tolerance(x64, a, h):
    """Scalar linear F(x) = a x: the exact step is x / (1 - h a)."""
    tolerance = 1e-6
    stage, variables, x = scalar_stage(a, h=h, iterations=40, tolerance=tolerance)
    y, _ = stage.apply(variables, x, train=False)
    y, x_np = np.asarray(y), np.asarray(x)
    exact = x_np / (1 - h * a)
    # the implicit equation y = x + h F(y) holds to the tolerance (relative, over the batch) ...
    assert np.linalg.norm(y - x_np - h * a * y) <= tolerance * np.linalg.norm(y)
    # ... so y is within tolerance / (1 - |h a|) of the exact solution
    assert np.linalg.norm(y - exact) <= tolerance / (1 - abs(h * a)) * np.linalg.norm(exact)
    # the sweeps and the residual reported are those of the iteration done by hand
    z, sweeps, change = hand_sweeps(x_np, a, h, tolerance, 40)
    assert sweeps < 40  # converged before the maximum
    stats = implicit_solve_stats(stage, variables, x)
    (block,) = stats.values()
    assert block["sweeps"].tolist() == [sweeps]
    np.testing.assert_allclose(block["residual"], [change], rtol=1e-6)
    np.testing.assert_allclose(y, z, rtol=1e-12)


def test_without_tolerance_backward_euler_is_the_fixed_sweeps_and_says_so(x64):
    """No tolerance: exactly `iterations` sweeps (x + hF(x + hF(x)) for 2), the residual of the
    last sweep reported, and the table label states both."""
    a, h = 0.8, 1.0
    stage, variables, x = scalar_stage(a, h=h, iterations=2)
    y, _ = stage.apply(variables, x, train=False)
    x_np = np.asarray(x)
    np.testing.assert_allclose(np.asarray(y), x_np + h * a * (x_np + h * a * x_np), rtol=1e-12)
    summary = summarize_implicit_solve(implicit_solve_stats(stage, variables, x))
    # sweep 2 changed z from x + h a x to x + h a x + (h a)^2 x
    assert summary["max_sweeps"] == 2
    np.testing.assert_allclose(summary["max_residual"], 0.64 / (1 + 0.8 + 0.64), rtol=1e-6)
    assert implicit_scheme_label("backward_euler", summary, iterations=2) == "backward_euler, 2 sweeps, residual 0.26"
    assert implicit_scheme_label("backward_euler", None, iterations=2) == "backward_euler, 2 sweeps, residual not measured"
    assert implicit_scheme_label("lm", None) == "lm"


def test_label_names_the_tolerance_when_it_is_met(x64):
    stage, variables, x = scalar_stage(0.5, iterations=40, tolerance=1e-4)
    summary = summarize_implicit_solve(implicit_solve_stats(stage, variables, x))
    _, sweeps, _ = hand_sweeps(np.asarray(x), 0.5, 1.0, 1e-4, 40)
    assert summary["max_residual"] <= 1e-4 and summary["max_sweeps"] == sweeps
    assert implicit_scheme_label("backward_euler", summary, iterations=40, tolerance=1e-4) == (
        f"backward_euler (residual <= 0.0001, {sweeps:.1f} sweeps)"
    )
    # a tolerance that is not met is reported as the sweeps and residual reached
    stage, variables, x = scalar_stage(0.5, iterations=3, tolerance=1e-4)
    summary = summarize_implicit_solve(implicit_solve_stats(stage, variables, x))
    assert implicit_scheme_label("backward_euler", summary, iterations=3, tolerance=1e-4).startswith(
        "backward_euler, 3 sweeps, residual 0.0"
    )


@pytest.mark.parametrize("gradient", ["unrolled", "implicit"])
def test_gradients_of_the_solved_step_match_the_exact_derivatives(x64, gradient):
    """y = x / (1 - h a): dy/dx = 1 / (1 - h a), dy/da = h x / (1 - h a)^2."""
    a, h = 0.4, 1.0
    stage, variables, x = scalar_stage(a, h=h, iterations=40, tolerance=1e-12, gradient=gradient)

    def loss(params, x):
        y, _ = stage.apply({"params": params}, x, train=False)
        return jnp.sum(y)

    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
    x_np = np.asarray(x)
    np.testing.assert_allclose(np.asarray(grad_x), np.full_like(x_np, 1 / (1 - h * a)), rtol=1e-8)
    kernel_grad = np.asarray(grad_params["blocks"]["block"]["dense"]["kernel"]).ravel()
    np.testing.assert_allclose(kernel_grad, [h * x_np.sum() / (1 - h * a) ** 2], rtol=1e-8)


def test_implicit_gradient_does_not_backpropagate_through_the_sweeps(x64):
    """With 3 sweeps (not converged) the unrolled gradient is that of the truncated series
    1 + c + c^2 + c^3; the implicit one is the adjoint fixed point's, here 3 adjoint sweeps from
    the last sweep: 1 + c (1 + c + c^2)."""
    a, h = 0.5, 1.0
    c = h * a
    grads = {}
    for gradient in ("unrolled", "implicit"):
        stage, variables, x = scalar_stage(a, h=h, iterations=3, gradient=gradient)
        grads[gradient] = np.asarray(jax.grad(lambda x: jnp.sum(stage.apply(variables, x, train=False)[0]))(x))
    np.testing.assert_allclose(grads["unrolled"], 1 + c + c**2 + c**3, rtol=1e-12)
    np.testing.assert_allclose(grads["implicit"], 1 + c * (1 + c + c**2), rtol=1e-12)


def test_implicit_gradient_of_a_batchnorm_block_in_training_matches_unrolled_at_convergence():
    """The CIFAR ResNet block (conv-BN-ReLU-conv-BN, per-evaluation BatchNorm statistics) in
    training mode with h = 0.05: the fixed point converges (about 8 sweeps; at h = 0.25 the
    residual is still 0.3 after 12), and the implicit-function-theorem gradient equals backpropagation through the
    converged sweeps."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 4)), jnp.float32)
    grads, updates, temp_bytes = {}, {}, {}
    for gradient in ("unrolled", "implicit"):
        scheme = get_scheme("backward_euler", h=0.05, iterations=10, tolerance=1e-6, gradient=gradient)
        stage = ODEStage(scheme, functools.partial(CifarResidual, features=4), num_blocks=1)
        variables = stage.init(jax.random.key(0), x, train=False)

        def loss(params, x):
            (y, _), new = stage.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), new

        grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        grads[gradient], updates[gradient] = grad(variables["params"], x)
        analysis = grad.lower(variables["params"], x).compile().memory_analysis()
        temp_bytes[gradient] = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis).temp_size_in_bytes
    stats = implicit_solve_stats(stage, variables, x, train=True)
    assert stats["blocks"]["residual"][0] <= 1e-6 and stats["blocks"]["sweeps"][0] < 10
    # the same forward pass: every sweep's BatchNorm statistics (eval1 ... eval9) update alike
    assert "eval9" in updates["implicit"]["batch_stats"]["blocks"]["block"]["bn1"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           updates["implicit"], updates["unrolled"])
    # no activations kept for the sweeps before the last
    assert temp_bytes["implicit"] < temp_bytes["unrolled"] / 2, temp_bytes
    leaves_u, leaves_i = jax.tree_util.tree_leaves(grads["unrolled"]), jax.tree_util.tree_leaves(grads["implicit"])
    for u, i in zip(leaves_u, leaves_i):
        scale = float(jnp.max(jnp.abs(u)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(i) / scale, np.asarray(u) / scale, atol=1e-4)


def test_solve_statistics_of_a_scanned_resnet_cover_every_implicit_block():
    """Depth 14 (2 blocks per stage): stage 1 steps both blocks implicitly; stages 2 and 3 take
    an Euler step at their transition and solve only block 1."""
    model = models.create("cifar_resnet", depth=14, width=2, scheme="backward_euler",
                          scheme_options={"iterations": 3, "tolerance": 1e-2})
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    stats = implicit_solve_stats(model, variables, x)
    assert {path: v["sweeps"].shape for path, v in stats.items()} == {
        "stage1/blocks": (2,), "stage2/blocks": (1,), "stage3/blocks": (1,)}
    for v in stats.values():
        assert np.all((1 <= v["sweeps"]) & (v["sweeps"] <= 3)) and np.all(v["residual"] >= 0)
        converged = v["residual"] <= 1e-2
        assert np.all(v["sweeps"][~converged] == 3)  # unconverged steps used every sweep
    summary = summarize_implicit_solve(stats)
    assert summary["steps"] == 4
    # training mode works too (batch statistics; their update is discarded)
    assert summarize_implicit_solve(implicit_solve_stats(model, variables, x, train=True))["steps"] == 4


def test_bad_solver_options_are_rejected():
    with pytest.raises(ValueError, match=r"tolerance=0"):
        get_scheme("backward_euler", tolerance=0.0)
    with pytest.raises(ValueError, match=r"gradient='adjoint'"):
        get_scheme("backward_euler", gradient="adjoint")


# ------------------------------------------------------------------- F evaluations, counted


def hand_count(scheme_evals, n):
    """CIFAR ResNet of depth 6n+2: stage 1 steps n blocks with the scheme; stages 2 and 3 take
    one Euler step (1 evaluation) at their transition and n - 1 scheme steps."""
    return n * scheme_evals + 2 * (1 + (n - 1) * scheme_evals)


@pytest.mark.parametrize("depth", [8, 14, 20])
@pytest.mark.parametrize(
    "scheme, options, evals",
    [("euler", {}, 1), ("lm", {}, 1), ("ab2", {}, 1), ("leapfrog", {}, 1), ("midpoint", {}, 2), ("rk4", {}, 4),
     ("backward_euler", {"iterations": 2}, 2), ("backward_euler", {"iterations": 5, "tolerance": 1e-3}, 5)],
)
def test_f_evaluations_per_forward_are_counted_from_the_network(depth, scheme, options, evals):
    n = (depth - 2) // 6
    model = models.create("cifar_resnet", depth=depth, scheme=scheme, scheme_options=options)
    assert count_f_evaluations(model, (1, 32, 32, 3)) == hand_count(evals, n)


def test_hand_counts_of_the_issue():
    # midpoint at depth 8 does 2 + 1 + 1 = 4 evaluations (not 3 blocks x 2 = 6); 14: 10; 20: 16
    assert [hand_count(2, n) for n in (1, 2, 3)] == [4, 10, 16]


def test_counts_of_unrolled_and_tied_stages():
    """Unrolled blocks count the same; a tied stage counts every step (its module is called N times)."""
    x_shape = (1, 8, 8, 3)
    for options in ({"scan": False}, {"tied": True}):
        model = models.create("cifar_resnet", depth=20, scheme="midpoint", **options)
        assert count_f_evaluations(model, x_shape) == hand_count(2, 3), options
    stage = ODEStage("rk4", functools.partial(Scalar), num_blocks=5, options=StageOptions(tied=True))
    assert count_f_evaluations(stage, (2, 1, 1, 1)) == 5 * 4
