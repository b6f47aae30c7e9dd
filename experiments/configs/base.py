"""The base configs of the scheme comparison and the ablations: every field those scripts read.

Config files build on these instead of importing the experiment scripts, so loading a config
pulls in neither matplotlib nor an experiment (only ml_collections and `cnn.train.config`).
"""

import ml_collections

from cnn.train.config import default_config


def scheme_comparison() -> ml_collections.ConfigDict:
    """Fields every scheme-comparison config sets (`experiments/compare_schemes.py`)."""
    config = ml_collections.ConfigDict()
    config.name = "compare_schemes"
    # The one scheme address: each entry a scheme name or a name with the scheme's options (and an
    # optional row label), e.g. ("euler", {"name": "backward_euler", "iterations": 20,
    # "tolerance": 1e-3}) -- `cnn.ode.SchemeSpec`.
    config.schemes = ("euler", "lm")
    config.depths = (20,)
    config.seeds = (0,)
    config.model = "cifar_resnet"
    config.model_options = ml_collections.ConfigDict({"width": 16})  # common to every cell
    # Per-scheme model options on top (keyed by label), e.g. {"lm": {"preactivation": True, "shortcut": "B"}} for
    # the LM-ResNet paper's networks next to He et al.'s original ResNets.
    config.scheme_model_options = ml_collections.ConfigDict()
    config.train = default_config()
    config.train.model = "cifar_resnet"
    config.train.progress = False  # one bar over cells instead
    config.data_in_memory = False  # read TFDS datasets' raw files straight into RAM
    config.only = ()  # cell names to (re)run; () runs every unfinished cell
    # Paired comparisons (experiments/stats.py): Holm at family-wise level alpha; the minimum
    # detectable difference is stated at this power.
    config.alpha = 0.05
    config.power = 0.8
    config.noise_sigmas = 2.0  # the ablations' older rule: beyond this many standard errors
    config.progress = True  # a bar over cells
    config.report_only = False  # only (re)write the report from the finished cells
    # Train the seeds of a cell as one ensemble program (cnn.train.ensemble, per-member data);
    # False trains one seed per program. Either way every cell is written as its single run.
    config.ensembles = True
    return config


def ablation() -> ml_collections.ConfigDict:
    """The fields of an ablation config (`experiments/ablations.py`)."""
    config = scheme_comparison()
    config.name = "ablations"
    config.depth = 20
    config.baseline = "euler"
    # name -> {"knob": group label, "scheme": a scheme value as in `schemes`,
    #          "model_options": {...other cifar_resnet options...}}
    config.variants = ml_collections.ConfigDict()
    return config
