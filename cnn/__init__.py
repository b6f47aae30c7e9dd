"""cnn: convolutional networks in JAX/Flax, with ResNets read as discretizations of an ODE.

Subpackages (imports point one way: ops <- ode <- models <- train <- tasks):
  cnn.ops      convolution arithmetic and primitives (conv, transposed conv, pooling, unpooling)
  cnn.ode      discretization schemes and the residual stage that applies them
  cnn.models   the classic CNN families and a registry (`cnn.models.create`)
  cnn.data     offline TFDS builders, the embedded default dataset, synthetic data, augmentation
  cnn.train    train state, jit/pmap steps, the training loop, Orbax checkpoints
  cnn.metrics  accuracy, confusion matrices, IoU, VOC mAP
  cnn.tasks    segmentation, detection, transfer learning, sliding window, style transfer
"""

__version__ = "0.1.0"
