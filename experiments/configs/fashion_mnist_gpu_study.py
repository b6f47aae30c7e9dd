"""The GPU study: Euler vs LM-ResNet vs RK2 (midpoint) vs AB2 on the full Fashion-MNIST at depths
20, 56 and 110, 8 paired seeds, trained to convergence; run in 15-minute GPU windows.

    bash experiments/gpu_study.sh            # on a lent GPU, one window (see that script's header)
    QUICK=1 OUT=/tmp/gpu_study bash experiments/gpu_study.sh   # the same steps at tiny sizes, on CPU

`experiments/gpu_study.py` runs the cells in the order of the questions they answer, as many as
fit the window, and hands the finished cells back for `experiments/results/fashion_mnist_gpu_study/`;
the next window starts from those. The grid alone, without the window logic:

    CNN_DATA_DIR=../shared/data python -m experiments.compare_schemes \
        --config=experiments/configs/fashion_mnist_gpu_study.py --workdir=runs/fashion_mnist_gpu_study

Design:
- Questions: (1) LM vs Euler at equal depth (20, 56, 110); (2) LM-56 vs Euler-110 (twice the
  residual blocks: 27 vs 54; the LM-ResNet paper's claim, `compare_schemes.paired_comparisons`
  pairs LM-d with Euler-(2d-2)); (3) each scheme's cost per step; (4) whether the answer holds
  across depths. RK2 and AB2 answer the same questions for two more schemes.
- Recipe: He et al.'s CIFAR ResNet recipe on 28x28 Fashion-MNIST: width 16, batch 128, SGD
  momentum 0.9, lr 0.1 with a one-epoch warm-up (ResNet-110 needs one) and cosine decay to zero,
  weight decay 5e-4, `cifar_standard` augmentation (4-pixel pad-and-crop and horizontal flips:
  label-preserving for clothing), 30 epochs (14,040 steps). Sanity bar: ResNet-20 (Euler) at
  >= 94% test accuracy; Euler-d20 trains in the first window, so a shortfall shows before the
  deep cells are spent (then raise num_epochs, in a new results folder).
- bfloat16 compute (parameters and BatchNorm statistics in float32), nondeterministic GPU kernels
  (the comparison is over seeds; bit-exact reruns are not needed), in-memory data.
- 8 paired seeds per cell, trained as ensembles (one program, the step vmapped over the seeds;
  each seed its own data order and augmentation); a window may split a cell's seeds into packs
  of 4, 2 or 1 that fit (a member computes its seed's single run up to rounding either way).

Budget arithmetic (an estimate until a GPU has run it; the driver replaces it by measured step
times as cells finish, and `python -m experiments.gpu_study plan` redoes it from the committed cells):
- Measured on one H200 (experiments/RESULTS.md §2): one ResNet at batch 256, bfloat16, scan
  stages: 5.9 ms/step at depth 20 (9 F evaluations per forward), 10.2 ms at depth 56 (27):
  23.0 and 39.8 us per image, i.e. 14.6 us + 0.93 us per F evaluation. Assumed for an ensemble
  step (8 seeds x 128 = 1,024 images): the same cost per image, no gain from the larger kernels
  (likely pessimistic: at these sizes one ResNet leaves the GPU mostly idle). F evaluations per
  forward: 9 / 27 / 54 (Euler, LM, AB2) and 16 / 52 / 106 (midpoint) at depths 20 / 56 / 110.
- Per 8-seed cell of 14,040 steps: depth 20: 331 s (midpoint 424 s); depth 56: 573 s (907 s);
  depth 110: 935 s (1,631 s). Per depth: 1,417 s, 2,626 s and 4,436 s; the grid: 8,479 s of
  training steps, 2.4 GPU hours, plus per pack ~20 s of start-up, ~60 s of compilation (a guess)
  and 15% for the per-epoch evaluations and margin.
- A window: 15 minutes of device time = ~1.5 min to start the machine + one command of at most
  600 s (the driver's budget: 570 s, of which 45 s are kept for the report) + copying back: about
  505 s of packs. Packs that fit are 8 seeds at depth 20, 4 at depth 56, 2 at depth 110 (1 for
  midpoint), and a pack estimated from the prior alone has at most 4 seeds. `plan` at the prior:
  36 windows, LM vs Euler at depth 20 after window 3, at depth 56 after 7, LM-56 vs Euler-110
  after 11, LM vs Euler at depth 110 after 15, the other two schemes after that.
"""

import ml_collections

from experiments.configs.base import scheme_comparison as base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The study; `variant="quick"` is `quick_config()` (the CPU rehearsal)."""
    if variant == "quick":
        return quick_config()
    if variant:
        raise ValueError(f"variant={variant!r} is not one of '', 'quick'")
    config = base_config()
    config.name = "fashion_mnist_gpu_study"
    config.schemes = ("euler", "lm", "midpoint", "ab2")
    config.depths = (20, 56, 110)
    config.seeds = (0, 1, 2, 3, 4, 5, 6, 7)
    config.model_options = {"width": 16}
    config.data_in_memory = True  # the raw IDX files straight into RAM: the GPU is not starved
    config.ensembles = True

    train = config.train
    train.dataset = "fashion_mnist"
    train.train_split = "train"
    train.eval_split = "test"
    train.num_classes = 10
    train.batch_size = 128
    train.num_epochs = 30.0  # 468 steps per epoch
    train.dtype = "bfloat16"
    train.deterministic = False  # determinism costs speed and is not needed for the comparison
    train.augment = "cifar_standard"  # pad 4 + random 28x28 crop, random horizontal flip
    train.optimizer.name = "sgd"
    train.optimizer.learning_rate = 0.1
    train.optimizer.momentum = 0.9
    train.optimizer.weight_decay = 5e-4
    train.optimizer.schedule = "cosine"
    train.optimizer.warmup_epochs = 1.0
    train.log_every_steps = 234  # twice per epoch
    train.eval_every_steps = 0  # once per epoch: the learning curves show the plateau
    train.eval_batch_size = 1000
    train.checkpoint.every_steps = 0  # final checkpoint only: a pack runs within one window
    train.checkpoint.max_to_keep = 1
    train.checkpoint.best_metric = ""
    return config


def quick_config() -> ml_collections.ConfigDict:
    """The study's grid at rehearsal size, on any CPU in seconds per cell: depth 20 only, Euler
    and LM, seeds 0 and 1, 3 steps of batch 16 on the embedded Fashion-MNIST subset pooled to
    7x7, width 4, float32, evaluation on 200 test images."""
    config = get_config()
    config.name = "fashion_mnist_gpu_study_quick"
    config.schemes = ("euler", "lm")
    config.depths = (20,)
    config.seeds = (0, 1)
    config.model_options = {"width": 4}
    config.data_in_memory = False  # the embedded subset is in memory anyway

    train = config.train
    train.dataset = "fashion_mnist_small"
    train.eval_split = "test[:200]"
    train.input_pool = 4
    train.batch_size = 16
    train.num_epochs = 0.0
    train.num_train_steps = 3
    train.dtype = "float32"
    train.optimizer.warmup_epochs = 0.0
    train.optimizer.warmup_steps = 1
    train.log_every_steps = 1
    train.eval_every_steps = 3
    train.eval_batch_size = 200
    return config
