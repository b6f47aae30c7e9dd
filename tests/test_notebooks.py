"""Executes every notebook under notebooks/ in fast mode (CNN_FAST=1), so notebooks never rot."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("CNN_RUNS_DIR", str(tmp_path))  # notebooks that write runs write here
    notebook = nbformat.read(path, as_version=4)
    # The kernel inherits this environment; run from the repository root like a user would.
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parents[1])}})
    client.execute()
    errors = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors
