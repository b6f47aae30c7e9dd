"""Fixtures of the data tests: real datasets prepared once per session into a temporary folder."""

import pathlib

import pytest


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> pathlib.Path:
    """A session-wide prepared-data folder (each full dataset takes about 5 s to prepare)."""
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="session")
def real_builders(shared_data_dir, prepared_dir):
    """The offline builders of MNIST and Fashion-MNIST, prepared from ../shared/data."""
    from cnn.data import builders

    return {
        name: builders.prepare(name, data_dir=shared_data_dir, prepared_dir=prepared_dir)
        for name in ("mnist", "fashion_mnist")
    }
