"""Jacobian spectra from Jacobian-vector products (cnn.ode.analysis) against numpy.linalg.eig of
dense Jacobians, matrices with a known spectrum, closed-form stability regions, and the blocks
of small CIFAR ResNets.

The dense reference Jacobians use `jax.jacrev`: the network's CPU convolution has a custom VJP
and no forward-mode rule, so `jax.jacfwd` does not apply to it (the estimator forms its products
from the transposed VJP for the same reason)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.optimize import linear_sum_assignment

from cnn import models
from cnn.models.cifar_resnet import CifarResidual
from cnn.ode import analysis as A
from cnn.ode.schemes import get_scheme
from cnn.ode.stage import SchemeStep, unstack_scanned


def max_matched_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Largest |estimate_i - reference_pi(i)| under the best one-to-one matching."""
    cost = np.abs(estimate[:, None] - reference[None, :])
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max())


def known_spectrum_matrix(generator, leading, size, bulk_radius=0.6, condition=None):
    """A real matrix `Q T Q^{-1}` with the given leading eigenvalues (complex ones in conjugate
    pairs, as 2x2 rotation-scaling blocks of T) and the rest real in [-bulk_radius, bulk_radius].
    Returns (matrix, eigenvalues, Q)."""
    blocks, values = [], []
    for value in leading:
        if value.imag > 0:
            blocks.append(np.array([[value.real, value.imag], [-value.imag, value.real]]))
            values += [value, value.conjugate()]
        elif value.imag == 0:
            blocks.append(np.array([[value.real]]))
            values.append(complex(value))
    rest = size - sum(b.shape[0] for b in blocks)
    bulk = generator.uniform(-bulk_radius, bulk_radius, rest)
    blocks += [np.array([[v]]) for v in bulk]
    values += list(bulk.astype(complex))
    t = np.zeros((size, size))
    i = 0
    for b in blocks:
        t[i : i + b.shape[0], i : i + b.shape[0]] = b
        i += b.shape[0]
    q = generator.normal(size=(size, size)) + 3 * np.eye(size)
    return q @ t @ np.linalg.inv(q), np.array(values), q


def per_example_linear(matrices):
    """f(x) = A_i x_i for example i: a batch whose examples have different Jacobians."""
    stacked = jnp.asarray(matrices)

    def f(x):
        return jnp.einsum("bij,bj->bi", stacked, x)

    return f


# ------------------------------------------------------------------------------ known spectra


def test_arnoldi_finds_the_leading_eigenvalues_of_matrices_with_known_spectrum(x64):
    generator = np.random.default_rng(0)
    size = 60
    first, values_first, _ = known_spectrum_matrix(generator, [3.0 + 0j, 2.0 + 1.5j], size)
    second, values_second, _ = known_spectrum_matrix(generator, [-2.5 + 0j, 1.0 + 2.0j], size)
    estimate = A.jacobian_eigenvalues(per_example_linear([first, second]), np.zeros((2, size)),
                                      num_steps=30, num_eigenvalues=3)
    for got, values in zip(estimate.values, (values_first, values_second)):
        leading = values[np.argsort(-np.abs(values), kind="stable")[:3]]
        assert max_matched_error(got, leading) < 1e-8
        # and they agree with numpy's eigenvalues of the matrix itself
    assert np.abs(estimate.values[0, 0]) == pytest.approx(3.0, rel=1e-10)
    assert np.abs(estimate.values[1, 0]) == pytest.approx(2.5, rel=1e-10)  # -2.5 lies outside |1 + 2i| = 2.24
    assert np.all(estimate.residuals < 1e-8)


def test_full_krylov_space_gives_every_eigenvalue_and_survives_breakdown(x64):
    generator = np.random.default_rng(1)
    size = 24
    dense = generator.normal(size=(size, size))
    # rank 3: the Krylov space is invariant after 4 steps (breakdown), the rest is fresh directions
    low_rank = generator.normal(size=(size, 3)) @ generator.normal(size=(3, size))
    estimate = A.jacobian_eigenvalues(per_example_linear([dense, low_rank]), np.zeros((2, size)), num_steps=size)
    assert max_matched_error(estimate.values[0], np.linalg.eigvals(dense)) < 1e-9
    reference = np.linalg.eigvals(low_rank)
    assert max_matched_error(estimate.values[1][:3], reference[np.argsort(-np.abs(reference))[:3]]) < 1e-9
    assert np.all(np.abs(estimate.values[1][3:]) < 1e-9)
    assert np.all(np.isfinite(estimate.values))


def test_whole_batch_mode_gives_the_union_of_the_examples_spectra(x64):
    generator = np.random.default_rng(2)
    matrices = generator.normal(size=(2, 6, 6))
    estimate = A.jacobian_eigenvalues(per_example_linear(matrices), np.zeros((2, 6)), num_steps=12,
                                      per_example=False)
    assert estimate.values.shape == (1, 12)
    union = np.concatenate([np.linalg.eigvals(m) for m in matrices])
    assert max_matched_error(estimate.values[0], union) < 1e-9


def test_power_iteration_spectral_radius_real_and_complex_dominant(x64):
    generator = np.random.default_rng(3)
    size, iterations = 40, 200
    real, _, _ = known_spectrum_matrix(generator, [3.0 + 0j, 2.0 + 1.0j], size)
    pair, _, q = known_spectrum_matrix(generator, [3.0 + 1.0j, 2.0 + 0j], size)
    radius = A.jacobian_spectral_radius(per_example_linear([real, pair]), np.zeros((2, size)),
                                        num_iterations=iterations)
    # dominant real eigenvalue: after the first half the iterate has converged (|2.24/3|^100 ~ 1e-13)
    assert radius[0] == pytest.approx(3.0, rel=1e-8)
    # dominant complex pair |3 + i|: the iterates rotate in its plane; |J^n v| is rho^n |c| times
    # a factor within [sigma_min(Q), sigma_max(Q)], so the log growth rate over the last m/2 steps
    # is off by at most log(cond(Q)) / (m/2); twice that leaves room for the decaying transient.
    bound = 2 * np.log(np.linalg.cond(q)) / (iterations / 2)
    assert abs(np.log(radius[1] / np.sqrt(10.0))) < bound


def test_estimator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_steps=7"):
        A.jacobian_eigenvalues(lambda x: 2 * x, np.zeros((1, 6)), num_steps=7)
    with pytest.raises(ValueError, match="same input and output shape"):
        A.jacobian_eigenvalues(lambda x: x[:, :3], np.zeros((1, 6)), num_steps=3)


# --------------------------------------------------------------------------------- conv blocks


def small_block(preactivation: bool):
    """A CIFAR residual branch on [2, 4, 4, 2] inputs (32 numbers per example) in float64, with
    BatchNorm running statistics away from (0, 1) so that eval mode is a real affine map."""
    block = CifarResidual(features=2, preactivation=preactivation, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 2), jnp.float64)
    variables = block.init(jax.random.PRNGKey(0), x, train=False)
    generator = np.random.default_rng(4)
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    for path, value in flat.items():
        if path[-1] == "mean":
            flat[path] = generator.normal(0.0, 0.3, value.shape)
        elif path[-1] == "var":
            flat[path] = generator.uniform(0.5, 2.0, value.shape)
    variables = traverse_util.unflatten_dict(flat)

    def f(z, variables):
        return block.apply(variables, z, train=False)

    return f, variables, x


@pytest.mark.parametrize("preactivation", [False, True])
def test_estimator_matches_numpy_eig_of_the_dense_jacobian_of_a_conv_block(x64, preactivation):
    f, variables, x = small_block(preactivation)
    estimate = A.jacobian_eigenvalues(f, x, num_steps=32, args=(variables,))
    for i in range(2):
        dense = jax.jacrev(lambda z: f(z[None], variables)[0])(x[i]).reshape(32, 32)
        reference = np.linalg.eigvals(np.asarray(dense))
        scale = np.abs(reference).max()
        # ReLU masks make J singular; a defective zero eigenvalue moves by ~sqrt(eps) in either
        # computation, hence 1e-6 of the spectral radius for the whole spectrum ...
        assert max_matched_error(estimate.values[i], reference) < 1e-6 * scale
        # ... and the leading eigenvalue to near machine precision
        assert abs(estimate.values[i, 0] - reference[np.argmax(np.abs(reference))]) < 1e-9 * scale \
            or abs(estimate.values[i, 0] - np.conj(reference[np.argmax(np.abs(reference))])) < 1e-9 * scale
    # the two examples see different ReLU patterns: their spectra differ
    assert max_matched_error(estimate.values[0], estimate.values[1]) > 1e-3


# ------------------------------------------------------------------------------ network blocks


def tiny_resnet(depth, scheme, **options):
    model = models.create("cifar_resnet", depth=depth, width=2, scheme=scheme, **options)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    return model, variables, x


def test_block_spectra_of_a_depth_8_resnet_has_one_entry_per_block_and_the_dense_spectrum():
    model, variables, x = tiny_resnet(8, "euler")
    spectra = A.block_spectra(model, variables, x, num_steps=32, num_eigenvalues=4)
    assert [s.name for s in spectra] == ["stage1/blocks_0", "stage2/entry", "stage3/entry"]
    assert [s.transition for s in spectra] == [False, True, True]
    assert spectra[1].eigenvalues is None and spectra[1].step.startswith("transition")
    block = spectra[0]
    assert block.eigenvalues.shape == (2, 4) and block.h == 1.0 and block.step == "euler"
    # independent reference: the stem (conv-BN-ReLU) and the block's F by hand from the params
    params, stats = variables["params"], variables["batch_stats"]
    stem = jax.lax.conv_general_dilated(x, params["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    stem = (stem - stats["bn1"]["mean"]) / jnp.sqrt(stats["bn1"]["var"] + 1e-5) * params["bn1"]["scale"] \
        + params["bn1"]["bias"]
    state = jax.nn.relu(stem)
    residual = CifarResidual(features=2)
    block_variables = jax.tree_util.tree_map(
        lambda v: v[0], {"params": params["stage1"]["blocks"]["block"], "batch_stats": stats["stage1"]["blocks"]["block"]})
    for i in range(2):
        dense = jax.jacrev(lambda z: residual.apply(block_variables, z[None], train=False)[0])(state[i])
        reference = np.linalg.eigvals(np.asarray(dense, np.float64).reshape(32, 32))
        leading = reference[np.argsort(-np.abs(reference), kind="stable")[:4]]
        assert max_matched_error(block.eigenvalues[i], leading) < 1e-4 * np.abs(reference).max()


@pytest.fixture(scope="module")
def lm_14():
    """A depth-14 LM-ResNet at init (2 blocks per stage) and its block spectra."""
    model, variables, x = tiny_resnet(14, "lm")
    return variables, A.block_spectra(model, variables, x, num_steps=8, num_eigenvalues=3)


def test_block_spectra_records_each_blocks_knob_and_start_step(lm_14):
    variables, spectra = lm_14
    names = [s.name for s in spectra]
    assert names == ["stage1/blocks_0", "stage1/blocks_1", "stage2/entry", "stage2/blocks_0", "stage3/entry",
                     "stage3/blocks_0"]
    assert spectra[0].step == "euler (start step)" and spectra[0].region_scheme.name == "euler"
    knobs = A.knob_values(variables["params"], "lm")
    # each stage's knob array covers its last blocks (block 0 may have none: layout-agnostic)
    expected = {
        "stage1/blocks_1": knobs["stage1"]["k"][-1],
        "stage2/blocks_0": knobs["stage2"]["k"][-1],
        "stage3/blocks_0": knobs["stage3"]["k"][-1],
    }
    for s in spectra:
        if s.name in expected:
            assert s.region_scheme.name == "lm"
            assert s.knobs["k"] == pytest.approx(float(expected[s.name]), abs=1e-7)
            assert s.step.startswith("lm (k=")


def test_recorded_inputs_are_the_states_the_steps_see():
    # pre-activation: no ReLU between steps, so block t+1 sees exactly x_t + F_t(x_t)
    model, variables, x = tiny_resnet(14, "euler", preactivation=True)
    records = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, SchemeStep):
            records.append((tuple(context.module.scope.path), args[0][0]))
        return next_fun(*args, **kwargs)

    unrolled = model.clone(stage=dataclasses.replace(model.stage, scan=False))
    unrolled_variables = unstack_scanned(variables)
    with nn.intercept_methods(record):
        unrolled.apply(unrolled_variables, x, train=False)
    # the estimator's F at stage1/blocks_0, applied to that block's input, gives the next input
    residual = CifarResidual(features=2, preactivation=True)
    block_variables = {c: unrolled_variables[c]["stage1"]["blocks_0"]["block"] for c in ("params", "batch_stats")}
    state = dict(records)[("stage1", "blocks_0")]
    following = dict(records)[("stage1", "blocks_1")]
    np.testing.assert_allclose(following, state + residual.apply(block_variables, state, train=False), atol=1e-6)
    # and block_spectra's eigenvalues at that block are those of this F at this state
    spectra = {s.name: s for s in A.block_spectra(model, variables, x, num_steps=32, num_eigenvalues=3)}
    dense = jax.jacrev(lambda z: residual.apply(block_variables, z[None], train=False)[0])(state[1])
    reference = np.linalg.eigvals(np.asarray(dense, np.float64).reshape(32, 32))
    leading = reference[np.argsort(-np.abs(reference), kind="stable")[:3]]
    assert max_matched_error(spectra["stage1/blocks_0"].eigenvalues[1], leading) < 1e-4 * np.abs(reference).max()


# ------------------------------------------------------------------------ stability membership


def lm_inside(z: complex, k: float) -> bool:
    """Closed form: LM's step on x' = lambda x has characteristic polynomial
    zeta^2 - (1 - k + z) zeta - k; stable iff both roots have modulus <= 1."""
    return bool(np.all(np.abs(np.roots([1.0, -(1.0 - k + z), -k])) <= 1.0 + 1e-9))


def test_region_membership_matches_closed_forms():
    generator = np.random.default_rng(5)
    points = generator.uniform(-3, 1, 200) + 1j * generator.uniform(-2, 2, 200)
    fake = np.zeros((1, 1), complex)
    lm = A.BlockSpectrum("b", 0, False, "lm", get_scheme("lm"), {"k": -0.3}, 1.0, fake, fake.real, None)
    euler_start = A.BlockSpectrum("b", 0, False, "euler", get_scheme("euler"), {}, 1.0, fake, fake.real, None)
    assert list(lm.inside(points)) == [lm_inside(z, -0.3) for z in points]
    assert list(euler_start.inside(points)) == [bool(abs(1 + z) <= 1 + 1e-9) for z in points]
    # the closed forms differ on these points, so the test tells the regions apart
    assert list(lm.inside(points)) != list(euler_start.inside(points))


def test_plot_spectra_vs_stability_returns_the_fraction_of_blocks_inside(tmp_path, lm_14):
    _, spectra = lm_14
    path = tmp_path / "spectra.png"
    fraction = A.plot_spectra_vs_stability(spectra, path, title="lm-14 at init")
    assert path.stat().st_size > 10_000
    votes = []
    for s in spectra:
        if s.transition:
            continue
        z = s.h * s.eigenvalues[:, 0]
        if s.region_scheme.name == "euler":
            inside = [abs(1 + v) <= 1 + 1e-9 for v in z]
        else:
            inside = [lm_inside(v, s.knobs["k"]) for v in z]
        votes.append(np.mean(inside) >= 0.5)
    assert len(votes) == 4
    assert fraction == pytest.approx(np.mean(votes))
    assert A.fraction_inside(spectra) == fraction
