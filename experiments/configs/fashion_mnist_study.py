"""The CPU study: Euler vs LM-ResNet vs RK2 (midpoint) on real Fashion-MNIST, 8 paired seeds.

Needs the original IDX files (set CNN_DATA_DIR, e.g. to ../shared/data); about 70 minutes on a
2-core CPU when nothing else runs (the recorded run: 2 h 15 min beside other jobs), resumable cell by cell:

    CNN_DATA_DIR=../shared/data python -m experiments.compare_schemes \
        --config=experiments/configs/fashion_mnist_study.py --workdir=runs/fashion_mnist_study

Design, and why:
- Questions: (1) LM vs Euler at equal depth, (2) LM at depth d vs Euler at depth 2d-2 (the same
  number of residual blocks doubled: LM-14 has 2 blocks per stage, Euler-26 has 4; the LM-ResNet
  paper's claim), (3) the cost of each scheme per step. Depths 14 and 26 answer all three; depth
  8 would not (LM with one block per stage is Euler's network).
- 8 paired seeds: seed s fixes the data order, the augmentation and the initial block weights
  for every scheme, so differences are taken per seed (experiments/stats.py).
- Data: the first 20,000 training images (a budget choice: the full 60,000 would take three
  times as long) and the full 10,000-image test split (a test error SE of about 0.3 pp
  per network, less for paired differences). Average-pooled to 14x14 on device (`input_pool=2`),
  with horizontal flips (label-preserving for clothing).
- Width 8: on this 2-core CPU a width-8 ResNet-20 train step (batch 128 of 14x14) took 33 ms
  against 81 ms at width 16 (2026-12-06); the study compares schemes at equal width.
- 8 epochs with a cosine schedule to zero: the learning curves (metrics.jsonl, evaluated every
  epoch) show whether test accuracy still moves in the last epochs; the report says so.
- One seed per program (`ensembles=False`): on CPU, XLA runs the vmapped (grouped) convolutions
  of an ensemble slower than the members one at a time (benchmarks/RESULTS.md), and with 1,248
  steps per run the per-run start-up that ensembles save is negligible.
"""

from experiments.configs.base import scheme_comparison as base_config


def get_config():
    config = base_config()
    config.name = "fashion_mnist_study"
    config.schemes = ("euler", "lm", "midpoint")
    config.depths = (14, 26)
    config.seeds = (0, 1, 2, 3, 4, 5, 6, 7)
    config.model_options = {"width": 8}
    config.data_in_memory = True  # the raw IDX files straight into RAM
    config.ensembles = False

    train = config.train
    train.dataset = "fashion_mnist"
    train.train_split = "train[:20000]"
    train.eval_split = "test"
    train.input_pool = 2  # 28x28 -> 14x14, on device
    train.num_classes = 10
    train.batch_size = 128
    train.num_epochs = 8.0  # 156 steps per epoch (the last partial batch is dropped)
    train.augment = "random_flip"
    train.optimizer.name = "sgd"
    train.optimizer.learning_rate = 0.1
    train.optimizer.momentum = 0.9
    train.optimizer.weight_decay = 5e-4
    train.optimizer.schedule = "cosine"
    train.optimizer.warmup_epochs = 0.5
    train.log_every_steps = 157
    train.eval_every_steps = 0  # once per epoch
    train.eval_batch_size = 1000
    train.checkpoint.every_steps = -1  # with every evaluation: a killed run resumes from its last epoch
    train.checkpoint.max_to_keep = 1
    train.checkpoint.best_metric = ""
    return config
