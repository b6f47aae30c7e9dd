"""Fixtures of the benchmark tests: one results directory for the quick runs."""

import pathlib

import pytest


@pytest.fixture(scope="session")
def bench_out(tmp_path_factory) -> pathlib.Path:
    """The `--out` directory shared by the quick runs of every script."""
    return tmp_path_factory.mktemp("bench")
