"""ResNets read as discretizations of an ODE: schemes, the residual stage that applies them, the
BatchNorm that keeps statistics per evaluation of `F` (`EvaluationBatchNorm`), and their numerical
analysis.

    scheme = cnn.ode.get_scheme("lm")                 # x_{t+1} = (1-k_t) x_t + k_t x_{t-1} + F(x_t)
    stage = cnn.ode.ODEStage(scheme=scheme, block=..., num_blocks=9)
    from cnn.ode import analysis
    analysis.convergence_study("rk4", f, exact, x0).slope        # observed order ~ 4

What a network really computes, from its diagnostics (`DIAGNOSTICS`):

    cnn.ode.count_f_evaluations(model, (1, 32, 32, 3))            # F calls of one forward pass
    stats = cnn.ode.implicit_solve_stats(model, variables, x)     # backward Euler: residual, sweeps
    cnn.ode.implicit_scheme_label("backward_euler", cnn.ode.summarize_implicit_solve(stats), iterations=2)
"""

from cnn.ode.norm import EvaluationBatchNorm
from cnn.ode.schemes import (
    GRADIENT_MODES,
    Coefficient,
    History,
    Knob,
    Scheme,
    SchemeSpec,
    available_schemes,
    get_scheme,
    scheme_specs,
)
from cnn.ode.stage import (
    DIAGNOSTICS,
    ODEStage,
    StageOptions,
    count_f_evaluations,
    fit_knob_layout,
    fold_stage_options,
    implicit_scheme_label,
    implicit_solve_stats,
    knob_values,
    linear_drop_path_rates,
    stack_unrolled,
    summarize_implicit_solve,
    takes_evaluation,
    unstack_scanned,
)

__all__ = [
    "DIAGNOSTICS",
    "GRADIENT_MODES",
    "Coefficient",
    "EvaluationBatchNorm",
    "History",
    "Knob",
    "ODEStage",
    "Scheme",
    "SchemeSpec",
    "StageOptions",
    "available_schemes",
    "count_f_evaluations",
    "fit_knob_layout",
    "fold_stage_options",
    "get_scheme",
    "implicit_scheme_label",
    "implicit_solve_stats",
    "knob_values",
    "linear_drop_path_rates",
    "scheme_specs",
    "stack_unrolled",
    "summarize_implicit_solve",
    "takes_evaluation",
    "unstack_scanned",
]
