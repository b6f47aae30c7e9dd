"""ResNets read as discretizations of an ODE: schemes, the residual stage that applies them, the
BatchNorm that keeps statistics per evaluation of `F` (`EvaluationBatchNorm`), and their numerical
analysis.

    scheme = cnn.ode.get_scheme("lm")                 # x_{t+1} = (1-k_t) x_t + k_t x_{t-1} + F(x_t)
    stage = cnn.ode.ODEStage(scheme=scheme, block=..., num_blocks=9)
    from cnn.ode import analysis
    analysis.convergence_study("rk4", f, exact, x0).slope        # observed order ~ 4
"""

from cnn.ode.norm import EvaluationBatchNorm
from cnn.ode.schemes import (
    Coefficient,
    History,
    Knob,
    Scheme,
    available_schemes,
    get_scheme,
)
from cnn.ode.stage import (
    ODEStage,
    knob_values,
    linear_drop_path_rates,
    stack_unrolled,
    takes_evaluation,
    unstack_scanned,
)

__all__ = [
    "Coefficient",
    "EvaluationBatchNorm",
    "History",
    "Knob",
    "ODEStage",
    "Scheme",
    "available_schemes",
    "get_scheme",
    "knob_values",
    "linear_drop_path_rates",
    "stack_unrolled",
    "takes_evaluation",
    "unstack_scanned",
]
