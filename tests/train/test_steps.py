"""The XLA options the compiled steps use by default (`cnn.train.parallel.default_compiler_options`)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import cnn.models
from cnn.train import parallel, steps
from cnn.train.state import create_train_state

needs_options = pytest.mark.skipif(
    parallel.default_compiler_options() is None,
    reason="this jaxlib rejects cnn.train.CPU_COMPILER_OPTIONS (or XLA_FLAGS sets them): XLA's defaults are used",
)


def _kernel_gradient(x, dy):
    """dW of a 3x3 'SAME' convolution: XLA compiles it as a convolution with a whole-image window."""
    kernel = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
    conv = lambda w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, kernel)[1](dy)[0]


def _convolutions_in_library_fusions(hlo: str) -> int:
    """Convolutions that XLA CPU placed inside YNNPACK fusions (`__ynn_fusion` computations)."""
    fused_computations = {
        line.split("calls=")[1].split(",")[0].strip("%")
        for line in hlo.splitlines()
        if '"kind":"__ynn_fusion"' in line and "calls=" in line
    }
    count, current = 0, None
    for line in hlo.splitlines():
        if line.startswith("%") or line.startswith("ENTRY"):
            current = line.split()[0].strip("%")
        elif " convolution(" in line and current in fused_computations:
            count += 1
    return count


def test_default_options_only_on_cpu_and_not_over_the_users_flags(monkeypatch):
    assert parallel.default_compiler_options("gpu") is None
    assert parallel.default_compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert parallel.default_compiler_options("cpu") is None


def test_options_rejected_by_xla_are_detected():
    assert not parallel._compiler_options_accepted((("xla_no_such_option", "1"),))
    assert not parallel._compiler_options_accepted((("xla_cpu_experimental_ynn_fusion_type", "NOT_A_FUSION_TYPE"),))


def test_compiler_options_argument_is_checked():
    with pytest.raises(ValueError, match="compiler_options.*'fast'"):
        parallel.compile_single(lambda s, b: (s, {}), compiler_options="fast")


@needs_options
def test_options_move_the_kernel_gradient_convolution_out_of_ynnpack():
    # The measured reason for the options (benchmarks/RESULTS.md): by default XLA CPU runs this
    # convolution in YNNPACK, 2.5-3x slower than its Eigen convolution; with them, in Eigen.
    x = jnp.ones((64, 8, 8, 16), jnp.float32)  # YNNPACK takes it from 32 images (the conv's features) up
    dy = jnp.ones((64, 8, 8, 16), jnp.float32)
    default_hlo = jax.jit(_kernel_gradient).lower(x, dy).compile().as_text()
    package_hlo = parallel.compile_single(_kernel_gradient, donate_state=False).lower(x, dy).compile().as_text()
    assert _convolutions_in_library_fusions(default_hlo) == 1
    assert _convolutions_in_library_fusions(package_hlo) == 0
    assert " convolution(" in package_hlo


@needs_options
def test_train_step_with_the_options_equals_xla_defaults():
    model = cnn.models.create("cifar_resnet", depth=8, width=8, num_classes=10)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.random((16, 16, 16, 3), dtype=np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), rng=0, input_shape=(1, 16, 16, 3))
    train_step = steps.make_train_step()
    with_options = parallel.compile_single(train_step, donate_state=False)
    xla_defaults = parallel.compile_single(train_step, donate_state=False, compiler_options=None)
    state_a, metrics_a = with_options(state, batch)
    state_b, metrics_b = xla_defaults(state, batch)
    state_a, _ = with_options(state_a, batch)
    state_b, _ = xla_defaults(state_b, batch)
    chex.assert_trees_all_close(metrics_a, metrics_b, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state_a.params, state_b.params, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(state_a.batch_stats, state_b.batch_stats, rtol=1e-4, atol=1e-6)
    assert float(metrics_a["loss"]) > 0
