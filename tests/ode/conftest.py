"""Fixtures for the ODE tests: 64-bit JAX types, in a way that works across JAX versions."""

import jax
import pytest


def enable_x64():
    """A context manager turning on 64-bit JAX types."""
    if hasattr(jax, "enable_x64"):  # recent releases
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # older releases

    return legacy()


@pytest.fixture()
def x64():
    """Runs the test body with 64-bit JAX types (restored afterwards)."""
    with enable_x64():
        yield
