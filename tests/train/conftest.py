"""Trainer tests compare runs bit for bit; on a GPU that needs deterministic XLA kernels.

The flag is read when the JAX backend starts, so it is set here at collection time (it has no
effect on CPU, where XLA is deterministic anyway).
"""

import os

if "xla_gpu_deterministic_ops" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()

# Several processes share one GPU in the subprocess tests: allocate on demand instead of each
# taking 75% of the memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
