"""Executes every notebook under notebooks/ in fast mode (CNN_FAST=1), so notebooks never rot.

They run with notebooks/ as the working directory, as Jupyter starts them, so a notebook that only
works from the repository root (relative paths, `experiments` not installed) fails here. Each
notebook asserts the values it shows (counts, shapes, hand-computed results, accuracies above
chance), so a run that completes with wrong numbers fails too.
"""

import ast
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def code_cells(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("CNN_RUNS_DIR", str(tmp_path))  # notebooks that write runs write here
    notebook = nbformat.read(path, as_version=4)
    # The kernel inherits this environment and starts in notebooks/, as Jupyter does.
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    errors = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_asserts_what_it_shows(path):
    """Every notebook checks its numbers with `assert` statements (parsed, not grepped: a comment
    or a string saying "assert" does not count)."""
    notebook = nbformat.read(path, as_version=4)
    asserts = 0
    for source in code_cells(notebook):
        python = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
        asserts += sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(python)))
    assert asserts >= 3, f"{path.name} has {asserts} assert statements; check the values it shows"


def test_colab_cells_are_one_cell_with_one_marked_url():
    """The Colab set-up is the same cell in every notebook: the repository URL in one marked
    variable, installed with the `notebooks` extra that pyproject.toml defines."""
    first_cells = {path.name: code_cells(nbformat.read(path, as_version=4))[0] for path in NOTEBOOKS}
    reference = first_cells[NOTEBOOKS[0].name]
    assert all(cell == reference for cell in first_cells.values()), [n for n, c in first_cells.items() if c != reference]
    assert len(re.findall(r"^CNN_REPOSITORY_URL = \"[^\"]+\"", reference, re.MULTILINE)) == 1
    assert "EDIT" in reference.split("CNN_REPOSITORY_URL =")[0].splitlines()[-1]  # the marker is the line above
    assert reference.count("CNN_REPOSITORY_URL") == 2  # defined once, used once (the clone)
    install = re.search(r'%pip install -q -e "(?P<target>[^"]+)\[(?P<extras>[\w,]+)\]"', reference)
    assert install and install["extras"] == "notebooks"
    pyproject = (NOTEBOOK_DIR.parent / "pyproject.toml").read_text()
    assert re.search(r"^notebooks = \[", pyproject, re.MULTILINE), "pyproject.toml has no `notebooks` extra"
