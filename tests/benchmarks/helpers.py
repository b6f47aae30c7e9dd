"""Loading the benchmark scripts (benchmarks/ is not a package) and hand-computed references."""

import importlib.util
import pathlib
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    """The module `benchmarks/<name>.py`; its directory goes on sys.path, as when it is run."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    module_name = f"_benchmark_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def cifar_resnet_params(depth: int, knobs_per_block: int = 0) -> int:
    """Parameters of He et al.'s CIFAR ResNet (option A, 10 classes), counted by hand:
    3x3 convs without bias, BatchNorm scale + bias, dense 64 -> 10 with bias; plus
    `knobs_per_block` scheme knobs for every block that reads them: all 3n but the first blocks of
    stages 2 and 3 (transitions: an Euler step with the history restarted)."""
    n = (depth - 2) // 6
    conv = lambda c_in, c_out: 9 * c_in * c_out  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 16) + bn(16)
    for c_in, c_out in ((16, 16), (16, 32), (32, 64)):
        total += conv(c_in, c_out) + conv(c_out, c_out) + 2 * bn(c_out)  # block 0
        total += (n - 1) * (2 * conv(c_out, c_out) + 2 * bn(c_out))
    return total + 64 * 10 + 10 + (3 * n - 2) * knobs_per_block


def import_torch():
    """`torch`, or a skip where it is not installed; a failure instead when CNN_REQUIRE_TORCH=1.

    `make test` installs a CPU torch and sets CNN_REQUIRE_TORCH=1, so there the PyTorch
    cross-checks cannot silently turn into skips.
    """
    import os

    import pytest

    try:
        import torch
    except ImportError as error:
        if os.environ.get("CNN_REQUIRE_TORCH") == "1":
            pytest.fail(f"CNN_REQUIRE_TORCH=1 but torch does not import ({error}); `make test` installs it")
        pytest.skip("PyTorch not installed (`make test` installs a CPU build): the PyTorch cross-check is skipped")
    return torch
