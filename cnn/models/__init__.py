"""The classic CNN families as Flax modules, created by name through a registry.

    model = cnn.models.create("resnet50", num_classes=1000)
    variables = model.init(key, images, train=False)
    cnn.models.count_params(variables["params"])
"""

from cnn.models.registry import available, count_params, create, register

# Family modules register themselves on import.
# (each family adds its own import line below)
import cnn.models.lecun  # noqa: E402,F401
import cnn.models.alexnet  # noqa: E402,F401
import cnn.models.vgg  # noqa: E402,F401
import cnn.models.googlenet  # noqa: E402,F401
import cnn.models.resnet  # noqa: E402,F401
import cnn.models.cifar_resnet  # noqa: E402,F401
from cnn.models import simple  # noqa: E402,F401  (simple_cnn)
import cnn.models.yolo  # noqa: E402,F401  (yolo_v1, yolo_v1_tiny)
import cnn.models.fcn  # noqa: E402,F401  (fcn32s, fcn16s, fcn8s)
import cnn.models.segnet  # noqa: E402,F401
import cnn.models.unet  # noqa: E402,F401
import cnn.models.dilated  # noqa: E402,F401  (dilated_frontend, dilated_context)
import cnn.models.dynamics  # noqa: E402,F401  (mlp_integrator, stencil_integrator)

__all__ = ["available", "count_params", "create", "register"]
