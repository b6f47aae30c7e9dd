"""The benchmarks' helpers: JAX's own convolution gradients, interleaved timing, F-evaluation
counts, random states, the PyTorch reference network, and bad-input messages."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.benchmarks.helpers import cifar_resnet_params, import_torch, load_script

common = load_script("common")


def test_lax_conv_gradients_swaps_the_models_convolution_and_restores(rng):
    from cnn.models import cifar_resnet

    package_conv = cifar_resnet.conv_general_dilated
    model = common.cifar_model(8, "euler")
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
        return jnp.sum(model.apply({**variables, "params": params}, x, train=False) ** 2)

    assert "custom_vjp" in str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    want = jax.grad(loss)(variables["params"])
    with common.lax_conv_gradients():
        assert cifar_resnet.conv_general_dilated is jax.lax.conv_general_dilated
        assert "custom_vjp" not in str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
        got = jax.grad(loss)(variables["params"])
    assert cifar_resnet.conv_general_dilated is package_conv
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_interleaved_timing_rotates_order_and_counts_steps():
    calls = []

    def runner(name):
        return lambda k: calls.append((name, k))

    result = common.interleaved_seconds_per_step(
        {"a": runner("a"), "b": runner("b"), "c": runner("c")}, repeats=3, steps_per_repeat=2, warmup=1
    )
    assert calls[:3] == [("a", 1), ("b", 1), ("c", 1)]  # warm-up
    assert [name for name, _ in calls[3:]] == list("abc" "bca" "cab")
    assert all(k == 2 for _, k in calls[3:])
    assert set(result) == {"a", "b", "c"} and all(len(r["samples"]) == 3 for r in result.values())
    assert all(r["min"] <= r["median"] <= r["max"] for r in result.values())


def test_f_evaluations_hand_counts_resnet20():
    schemes_cost = load_script("schemes_cost")
    # n = 3: stage 1 takes 3 scheme steps; stages 2, 3 one transition step + 2 scheme steps.
    expected = {"euler": 9, "lm": 9, "ab2": 9, "midpoint": 3 * 2 + 2 * (1 + 2 * 2), "heun": 16,
                "rk4": 3 * 4 + 2 * (1 + 2 * 4), "backward_euler": 3 * 3 + 2 * (1 + 2 * 3)}
    assert {s: schemes_cost.f_evaluations(20, s) for s in expected} == expected


def test_random_train_state_has_the_model_shapes_and_init_statistics():
    model = common.cifar_model(56, "lm")
    state = common.random_train_state(model, (1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, state.variables() | {"batch_stats": state.batch_stats}, shapes)
    assert all(jax.tree_util.tree_leaves(same))
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params)) == cifar_resnet_params(56, 1)
    kernel = np.asarray(state.params["stage1"]["blocks"]["block"]["conv1"]["kernel"])  # [blocks, 3, 3, 16, 16]
    assert kernel.std() == pytest.approx(np.sqrt(2 / (3 * 3 * 16)), rel=0.05)  # He normal, fan-out
    k = np.asarray(state.params["stage2"]["knobs"]["k"])
    assert ((-0.1 <= k) & (k <= 0)).all()
    assert np.all(np.asarray(state.batch_stats["stage3"]["blocks"]["block"]["bn1"]["var"]) == 1)


def test_torch_reference_rejects_variables_of_another_depth():
    import_torch()
    torch_resnet = load_script("torch_cifar_resnet")
    state = common.cifar_state(14, "euler")
    net = torch_resnet.CifarResNet(20)
    with pytest.raises(ValueError, match="stage1.*2 blocks.*3"):
        torch_resnet.load_flax_variables(net, {"params": state.params, "batch_stats": state.batch_stats})
    with pytest.raises(ValueError, match="depth=9"):
        torch_resnet.CifarResNet(9)
    assert torch_resnet.count_params(torch_resnet.CifarResNet(110, scheme="lm")) == cifar_resnet_params(110, 1)


def test_bad_arguments_name_the_value():
    with pytest.raises(argparse.ArgumentTypeError, match="'0'"):
        common.positive_int("0")
    with pytest.raises(ValueError, match="--depths 9"):
        load_script("train_step").main(["--quick", "--depths", "9", "--no-torch"])
    with pytest.raises(ValueError, match="depth=9"):
        load_script("compile_time").main(["--quick", "--depths", "9"])
    with pytest.raises(ValueError, match="depth=15"):
        load_script("memory").main(["--quick", "--depth", "15"])
