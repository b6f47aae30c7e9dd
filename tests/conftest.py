"""Test-suite set-up shared by every test directory.

Eight host devices are forced before JAX is imported, so that the multi-device code (pmap,
sharded jit) is exercised on CPU; single-device code runs on device 0 and is unaffected.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CNN_FAST", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """The real MNIST / Fashion-MNIST distribution files, or a visible skip when absent."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (needs ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture()
def rng() -> "numpy.random.Generator":  # noqa: F821
    import numpy as np

    return np.random.default_rng(0)
