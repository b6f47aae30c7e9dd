"""`import cnn` gives every subpackage by attribute, importing each on first use (PEP 562)."""

import subprocess
import sys

import pytest

import cnn


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_cnn_imports_no_subpackage_until_one_is_used():
    out = run_python(
        "import sys, cnn\n"
        "print(sorted(m for m in sys.modules if m.startswith('cnn.')))\n"
        "model = cnn.models.create('cifar_resnet', depth=8, num_classes=10)\n"
        "print(type(model).__name__, 'cnn.models' in sys.modules, 'cnn.tasks' in sys.modules)\n"
    )
    assert out.splitlines() == ["[]", "CifarResNet True False"]


@pytest.mark.parametrize("name", cnn.SUBPACKAGES)
def test_every_subpackage_is_an_attribute(name):
    module = getattr(cnn, name)
    assert module.__name__ == f"cnn.{name}" and sys.modules[f"cnn.{name}"] is module
    assert name in dir(cnn)


def test_unknown_attribute_names_the_subpackages():
    with pytest.raises(AttributeError, match="no attribute 'model'.*subpackages: ops, ode, models"):
        cnn.model  # noqa: B018
