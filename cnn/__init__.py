"""cnn: convolutional networks in JAX/Flax, with ResNets read as discretizations of an ODE.

Subpackages (imports point one way: ops <- ode <- models <- train <- tasks):
  cnn.ops      convolution arithmetic and primitives (conv, transposed conv, pooling, unpooling)
  cnn.ode      discretization schemes and the residual stage that applies them
  cnn.models   the classic CNN families and a registry (`cnn.models.create`)
  cnn.data     offline TFDS builders, the embedded default dataset, synthetic data, augmentation
  cnn.train    train state, jit/pmap steps, the training loop, Orbax checkpoints
  cnn.metrics  accuracy, confusion matrices, IoU, VOC mAP
  cnn.tasks    segmentation, detection, transfer learning, sliding window, style transfer
  cnn.viz      filter grids, feature maps, saliency

Each is imported on first use, so `import cnn` alone is cheap and `cnn.models.create(...)` works
after it without `import cnn.models`.
"""

import importlib

__version__ = "0.1.0"

# `import cnn` then `cnn.models.create(...)` works without importing every subpackage up front:
# the eager import of all seven costs ~1.7 s (JAX, Flax, TFDS), the lazy one ~2 ms (PEP 562).
SUBPACKAGES = ("ops", "ode", "models", "data", "train", "tasks", "metrics", "viz")


def __getattr__(name: str):
    if name in SUBPACKAGES:
        module = importlib.import_module(f"cnn.{name}")
        globals()[name] = module  # later lookups skip this function
        return module
    raise AttributeError(f"module 'cnn' has no attribute {name!r}; subpackages: {', '.join(SUBPACKAGES)}")


def __dir__():
    return sorted([*globals(), *SUBPACKAGES])


__all__ = [*SUBPACKAGES, "__version__"]
