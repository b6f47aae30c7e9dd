"""`EvaluationBatchNorm` against flax's BatchNorm and numpy, and per-evaluation statistics in
`ODEStage` and the ResNets: hand-computed running averages of each RK evaluation, and the eval
mode that matches training once the averages have converged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import models
from cnn.ode import EvaluationBatchNorm, ODEStage, StageOptions, get_scheme, takes_evaluation
from cnn.ode.norm import is_evaluation_name

EPS = 1e-5


def random_x(shape=(6, 3, 3, 4), seed=0, shift=0.0):
    return jax.random.normal(jax.random.key(seed), shape) * 2.0 + shift


def np_normalize(x, mean, var, scale, bias):
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


def init_with_affine(module, x, seed=1):
    """Variables of `module` with random (non-default) scale and bias, so the affine part shows."""
    variables = module.init(jax.random.key(0), x)
    c = x.shape[-1]
    scale = 1.0 + 0.3 * jax.random.normal(jax.random.key(seed), (c,))
    bias = 0.5 * jax.random.normal(jax.random.key(seed + 1), (c,))
    return {**variables, "params": {"scale": scale, "bias": bias}}


# ------------------------------------------------------------------------------- the module


def test_evaluation_zero_is_flax_batchnorm_exactly():
    x = random_x()
    ours = EvaluationBatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS)
    variables = init_with_affine(flax_bn, x)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    y_ref, stats_ref = flax_bn.apply(variables, x, mutable=["batch_stats"])
    y, stats = ours.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, y_ref)
    jax.tree.map(np.testing.assert_array_equal, stats, stats_ref)
    trained = stats_ref | {"params": variables["params"]}
    y_eval = EvaluationBatchNorm(use_running_average=True, epsilon=EPS).apply(trained, x)
    np.testing.assert_array_equal(y_eval, nn.BatchNorm(use_running_average=True, epsilon=EPS).apply(trained, x))


def test_later_evaluations_keep_their_own_statistics_and_share_the_affine_parameters():
    x0, x1 = random_x(seed=0), random_x(seed=5, shift=3.0)

    class TwoEvaluations(nn.Module):
        @nn.compact
        def __call__(self, a, b, train):
            norm = EvaluationBatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, name="bn")
            return norm(a), norm(b, evaluation=1)

    model = TwoEvaluations()
    variables = model.init(jax.random.key(0), x0, x1, False)
    assert jax.tree.map(jnp.shape, variables) == {
        "params": {"bn": {"scale": (4,), "bias": (4,)}},
        "batch_stats": {"bn": {"mean": (4,), "var": (4,), "eval1": {"mean": (4,), "var": (4,)}}},
    }
    scale, bias = 1.0 + 0.3 * np.arange(4), 0.1 * np.arange(4) - 0.2
    variables = {**variables, "params": {"bn": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}}
    (y0, y1), updated = model.apply(variables, x0, x1, True, mutable=["batch_stats"])
    stats = updated["batch_stats"]["bn"]
    for x, y, mine in ((x0, y0, stats), (x1, y1, stats["eval1"])):
        xn = np.asarray(x, np.float64)
        mean, var = xn.mean(axis=(0, 1, 2)), xn.var(axis=(0, 1, 2))  # biased, as in training
        np.testing.assert_allclose(y, np_normalize(xn, mean, var, scale, bias), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(mine["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mine["var"], 0.9 + 0.1 * var, rtol=1e-5)
    # eval mode: each evaluation is normalized with its own running statistics
    (e0, e1) = model.apply({**variables, **updated}, x0, x1, False)
    for x, e, mine in ((x0, e0, stats), (x1, e1, stats["eval1"])):
        expected = np_normalize(np.asarray(x, np.float64), np.asarray(mine["mean"]), np.asarray(mine["var"]), scale, bias)
        np.testing.assert_allclose(e, expected, rtol=1e-4, atol=1e-4)


def test_names_of_per_evaluation_children():
    names = {"eval1": True, "eval12": True, "eval0": False, "eval": False, "evaluation": False,
             "mean": False, "eval1x": False, 1: False}
    assert {name: is_evaluation_name(name) for name in names} == names


@pytest.mark.parametrize("evaluation", [-1, 1.5, "1", None])
def test_bad_evaluation_is_rejected(evaluation):
    norm = EvaluationBatchNorm(use_running_average=True)
    with pytest.raises(ValueError, match="evaluation="):
        norm.init(jax.random.key(0), jnp.ones((2, 3)), evaluation=evaluation)


# ------------------------------------------------------------------------------- in a stage


class NormBlock(nn.Module):
    """F(z) = BN(z): makes the statistics of each evaluation's input visible."""

    @nn.compact
    def __call__(self, z, *, train, evaluation=0):
        return EvaluationBatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, name="bn")(
            z, evaluation=evaluation
        )


class SharedNormBlock(nn.Module):
    """The same without an `evaluation` argument: one set of statistics for every evaluation."""

    @nn.compact
    def __call__(self, z, *, train):
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, name="bn")(z)


def batch_moments(z):
    z = np.asarray(z, np.float64)
    return z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))


def np_bn_train(z):
    mean, var = batch_moments(z)
    return (z - mean) / np.sqrt(var + EPS)


def test_midpoint_stage_keeps_one_running_average_per_evaluation():
    """Midpoint: K1 = F(x), K2 = F(x + h/2 K1). With F = BN (scale 1, bias 0) the inputs of the two
    evaluations are x and x + h/2 BN(x), whose moments give the two running averages."""
    h = 0.5
    x = np.asarray(random_x(shift=1.0), np.float64)
    stage = ODEStage(get_scheme("midpoint", h=h), NormBlock, num_blocks=1)
    variables = stage.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
    _, updated = stage.apply(variables, jnp.asarray(x, jnp.float32), train=True, mutable=["batch_stats"])
    stats = updated["batch_stats"]["blocks"]["block"]["bn"]
    second_input = x + h / 2 * np_bn_train(x)
    for mine, z in ((stats, x), (stats["eval1"], second_input)):
        mean, var = batch_moments(z)
        np.testing.assert_allclose(mine["mean"][0], 0.1 * mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(mine["var"][0], 0.9 + 0.1 * var, rtol=1e-4)

    # per_evaluation_stats=False (or a block without `evaluation`): both evaluations update one
    # average, one after the other
    for stage in (ODEStage(get_scheme("midpoint", h=h), NormBlock, 1, options=StageOptions(per_evaluation_stats=False)),
                  ODEStage(get_scheme("midpoint", h=h), SharedNormBlock, 1)):
        variables = stage.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
        assert "eval1" not in variables["batch_stats"]["blocks"]["block"]["bn"]
        _, updated = stage.apply(variables, jnp.asarray(x, jnp.float32), train=True, mutable=["batch_stats"])
        shared = updated["batch_stats"]["blocks"]["block"]["bn"]
        (m0, v0), (m1, v1) = batch_moments(x), batch_moments(second_input)
        np.testing.assert_allclose(shared["mean"][0], 0.9 * 0.1 * m0 + 0.1 * m1, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(shared["var"][0], 0.9 * (0.9 + 0.1 * v0) + 0.1 * v1, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["euler", "lm", "midpoint", "heun", "rk4", "backward_euler"])
def test_one_set_of_statistics_per_evaluation_of_each_scheme(scheme):
    resolved = get_scheme(scheme)
    stage = ODEStage(resolved, NormBlock, num_blocks=2, options=StageOptions(scan=False))
    variables = stage.init(jax.random.key(0), random_x(), train=False)
    for i in range(2):
        bn = variables["batch_stats"][f"blocks_{i}"]["block"]["bn"]
        expected = {f"eval{k}" for k in range(1, resolved.evals_per_step)}
        assert {key for key in bn if key.startswith("eval")} == expected
    hand_count = {"euler": 1, "lm": 1, "midpoint": 2, "heun": 2, "rk4": 4, "backward_euler": 3}  # 3 sweeps
    assert resolved.evals_per_step == hand_count[scheme]


def test_model_blocks_take_the_evaluation_and_simple_blocks_do_not():
    assert takes_evaluation(models.cifar_resnet.CifarResidual())
    assert takes_evaluation(models.resnet.BottleneckResidual())
    assert takes_evaluation(NormBlock())
    assert not takes_evaluation(SharedNormBlock())


# ------------------------------------------------------------------------------- in a network


@pytest.mark.parametrize("per_evaluation_stats, matches", [(True, True), (False, False)])
def test_eval_mode_reproduces_training_once_each_evaluation_has_its_own_average(per_evaluation_stats, matches):
    """Train-mode passes over one fixed batch (no optimizer) drive the running averages to that
    batch's statistics (0.9^200 ~ 1e-9). Then eval mode computes what train mode computes --
    with statistics per evaluation. Shared statistics average over the two RK2 evaluations,
    so eval mode stays off."""
    model = models.create("cifar_resnet", depth=8, width=4, scheme="midpoint",
                          per_evaluation_stats=per_evaluation_stats)
    x = random_x((16, 8, 8, 3), seed=3, shift=0.5)
    variables = model.init(jax.random.key(0), x, train=False)

    @jax.jit
    def converge(variables):
        def body(_, stats):
            _, updated = model.apply({**variables, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return updated["batch_stats"]
        return jax.lax.fori_loop(0, 200, body, variables["batch_stats"])

    variables = {**variables, "batch_stats": converge(variables)}
    train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    eval_logits = model.apply(variables, x, train=False)
    gap = float(jnp.max(jnp.abs(eval_logits - train_logits)))
    scale = float(jnp.max(jnp.abs(train_logits)))
    if matches:
        assert gap < 1e-3 * scale, (gap, scale)
    else:
        assert gap > 1e-2 * scale, (gap, scale)


def test_parameter_counts_do_not_change():
    """Per-evaluation statistics live in batch_stats: RK2 has Euler's (published) parameters."""
    shapes = {s: jax.eval_shape(lambda s=s: models.create("resnet20", scheme=s).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)) for s in ("euler", "midpoint")}
    count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))  # noqa: E731
    assert count(shapes["midpoint"]["params"]) == count(shapes["euler"]["params"]) == 269_722
    # the second evaluation's mean and var for bn1, bn2 of each stage's identical blocks: stage 1
    # (16 maps, no transition) has 3 of them, stages 2 and 3 (32, 64 maps) 2 after their entry
    extra = count(shapes["midpoint"]["batch_stats"]) - count(shapes["euler"]["batch_stats"])
    assert extra == 2 * 2 * (3 * 16 + 2 * 32 + 2 * 64)


def test_training_computes_the_same_function_either_way():
    """Per-evaluation statistics change only the running averages: in train mode (batch
    statistics) the logits and gradients are those of shared statistics, from the same weights."""
    x = random_x((8, 8, 8, 3), seed=4)
    labels = jnp.arange(8) % 10
    results = []
    for per_evaluation_stats in (True, False):
        model = models.create("cifar_resnet", depth=14, width=4, scheme="rk4", per_evaluation_stats=per_evaluation_stats)
        variables = model.init(jax.random.key(0), x, train=False)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        results.append((value, logits, grads))
    (v1, l1, g1), (v2, l2, g2) = results
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
