"""A name -> constructor registry for every model family, and parameter counting.

Each family file decorates its constructor with `@register("name", ...)`; `cnn.models.create`
looks names up here, so experiment configs refer to models by string.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(*names: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a model constructor under one or more names (lower case)."""

    def decorator(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for name in names:
            key = name.lower()
            if key in _REGISTRY and _REGISTRY[key] is not constructor:
                raise ValueError(f"model name {name!r} is registered twice")
            _REGISTRY[key] = constructor
        return constructor

    return decorator


def available() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def create(name: str, **options: Any) -> nn.Module:
    """Builds a registered model, e.g. `create("resnet50", num_classes=10, dtype=jnp.bfloat16)`.

    Raises:
      ValueError: `name` is not registered (the message lists close matches and all names).
    """
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model name={name!r}.{hint} Registered models: {', '.join(available())}")
    return _REGISTRY[key](**options)


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree (arrays or `jax.ShapeDtypeStruct`s)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(params)))
