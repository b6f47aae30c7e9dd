"""What the experiment tables report: learned knob values of constrained schemes, and F
evaluations per forward pass counted from the network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models as models
from experiments import compare_schemes, grid


def test_constrained_lm_knobs_are_reported_as_values_not_raw_parameters():
    """constrain=True stores raw and uses k = tanh(raw) (bounds (-1, 1)): e.g. raw -0.2025 is the
    value tanh(-0.2025) = -0.1998 (the lm_constrained ablation's case)."""
    options = {"constrain": True}
    model = models.create("cifar_resnet", depth=14, width=2, scheme="lm", scheme_options=options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))["params"]
    params = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    # stage 1 (no transition) has a k for both blocks; stages 2, 3 only for block 1 (block 0 takes
    # the transition's Euler step)
    raw = {"stage1": [-0.2025, 0.5], "stage2": [1.0], "stage3": [-3.0]}
    for stage, values in raw.items():
        assert params[stage]["knobs"]["k"].shape == (len(values),)
        params[stage]["knobs"]["k"] = np.asarray(values, np.float32)
    flat = [v for values in raw.values() for v in values]
    reported = grid._learned_knobs(params, "lm", options)["k"]
    np.testing.assert_allclose(reported, np.tanh(flat), rtol=1e-6)
    assert round(reported[0], 4) == -0.1998
    # the scheme without its options is another scheme: it would report the raw parameters
    np.testing.assert_allclose(grid._learned_knobs(params, "lm")["k"], flat, rtol=1e-6)
    assert grid._learned_knobs(params, None) == {} and grid._learned_knobs(params, "euler") == {}


@pytest.mark.parametrize(
    "scheme, options, counts",
    [
        # depth 6n+2: stage 1 takes n scheme steps, stages 2 and 3 a one-evaluation transition
        # step plus n - 1 scheme steps: n e + 2 (1 + (n - 1) e) for e evaluations per step
        ("euler", {}, {8: 3, 14: 6, 20: 9}),
        ("lm", {}, {8: 3, 14: 6, 20: 9}),
        ("midpoint", {}, {8: 4, 14: 10, 20: 16}),
        ("backward_euler", {"iterations": 2}, {8: 4, 14: 10, 20: 16}),
        ("rk4", {}, {8: 6, 14: 18, 20: 30}),
    ],
)
def test_f_evaluations_column_counts_the_network_that_runs(scheme, options, counts):
    config = compare_schemes.base_config()
    config.schemes = ({"name": scheme, **options},)
    config.depths = tuple(counts)
    for depth, count in counts.items():
        assert compare_schemes.evaluations_per_forward(config, scheme, depth) == count
