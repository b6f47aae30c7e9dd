"""Shared helpers for the model-zoo tests: traced shapes and cheap random variables."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def variable_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> Any:
    """`jax.eval_shape` of `model.init` on zeros of `input_shape` (nothing is compiled or run)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False))


def intermediate_shapes(model: nn.Module, input_shape: tuple[int, ...], **kwargs: Any) -> dict:
    """Traced output shapes of every submodule: `{path tuple: shape}` from `capture_intermediates`."""
    variables = variable_shapes(model, input_shape)

    def run(variables):
        _, state = model.apply(
            variables, jnp.zeros(input_shape), train=False, capture_intermediates=True, mutable=["intermediates"],
            **kwargs,
        )
        return state["intermediates"]

    captured = jax.eval_shape(run, variables)
    shapes = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if key == "__call__":
                shapes[path] = tuple(jax.tree_util.tree_leaves(value)[0].shape)
            else:
                visit(value, path + (key,))

    visit(captured, ())
    return shapes


def random_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> Any:
    """Variables with the model's shapes filled from numpy: kernels ~ N(0, 2/fan_in), other
    params ~ N(0, 0.1) around 1 for BN scales, BN variances in [0.5, 1.5]. Fast (no init compile)."""
    rng = np.random.default_rng(seed)
    shapes = variable_shapes(model, input_shape)

    def fill(path, leaf):
        name = path[-1].key
        size = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(size[:-1]))
            value = rng.standard_normal(size, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(size, dtype=np.float32)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, size).astype(np.float32)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(size, dtype=np.float32)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
