"""Six schemes on the full MNIST (60,000 / 10,000), CPU budget of tens of minutes.

    CNN_DATA_DIR=../shared/data python -m experiments.compare_schemes \
        --config=experiments/configs/mnist.py --workdir=runs/mnist
"""

from experiments.configs import fashion_mnist


def get_config():
    return fashion_mnist.get_config("mnist")
