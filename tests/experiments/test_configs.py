"""Every experiment config loads on its own: no experiment script, no matplotlib (issue: configs as code)."""

import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.stem for p in (REPO_ROOT / "experiments" / "configs").glob("*.py") if p.stem != "__init__")

PROBE = """
import importlib, sys
module = importlib.import_module("experiments.configs." + sys.argv[1])
if hasattr(module, "get_config"):
    module.get_config()
heavy = sorted(name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")
               or (name.startswith("experiments.") and not name.startswith("experiments.configs")))
print(",".join(heavy))
"""


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_without_experiment_scripts_or_matplotlib(name):
    result = subprocess.run([sys.executable, "-c", PROBE, name], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"loading experiments/configs/{name}.py imported {result.stdout.strip()}"
