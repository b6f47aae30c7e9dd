"""`cnn.ode.StageOptions`: the one field that carries a ResNet family's ODEStage options.

The factories still take the options as flat keywords (configs and callers pass `scan=False`);
spelled flat, as a `StageOptions` or as a mapping, they must build the same network: the same
parameter tree, bit for bit, and the same logits. The layout each option asks for (`blocks_{i}`
unrolled, `blocks` scanned, `tied_block`, knobs under "project") is checked too, so that options
silently dropped on the way to `ODEStage` would fail.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import models
from cnn.models import convert
from cnn.ode import StageOptions, fold_stage_options

INPUT_SHAPE = (2, 32, 32, 3)
FAMILIES = {  # name -> (constructor options, the first stage's parameter path)
    "cifar_resnet": ({"depth": 14, "width": 4, "scheme": "lm"}, "stage1"),
    "resnet18": ({"num_classes": 10, "scheme": "lm"}, "layer1"),
}


def init_and_logits(model):
    x = jax.random.normal(jax.random.key(7), INPUT_SHAPE)
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, np.asarray(model.apply(variables, x, train=False))


def assert_same_arrays(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert left.dtype == right.dtype
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_flat_keywords_stage_options_and_a_mapping_build_the_same_network(name, scan):
    base, first_stage = FAMILIES[name]
    flat = models.create(name, **base, scan=scan)
    variables, logits = init_and_logits(flat)
    # the option reached the stages: one layout or the other
    blocks = set(variables["params"][first_stage])
    assert ("blocks" in blocks) == scan and ("blocks_0" in blocks) == (not scan), blocks
    assert flat.stage == StageOptions(scan=scan)
    for spelled in (StageOptions(scan=scan), {"scan": scan}):
        other = models.create(name, **base, stage=spelled)
        assert other == flat  # same module: same fields, same hash
        other_variables, other_logits = init_and_logits(other)
        assert_same_arrays(other_variables, variables)
        np.testing.assert_array_equal(other_logits, logits)


def test_every_flat_option_reaches_the_stages():
    """tied, history_at_entry and start change the parameter tree in known ways (CIFAR depth 14,
    n = 2 blocks per stage: stages 2 and 3 have an entry block and one identical block)."""
    base = {"depth": 14, "width": 4, "scheme": "lm"}
    shapes = {}
    for label, options in {"default": {}, "tied": {"tied": True},
                           "project": {"history_at_entry": "project"}, "copy": {"start": "copy"}}.items():
        model = models.create("cifar_resnet", **base, **options)
        assert model.stage == StageOptions(**options)
        shapes[label] = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros(INPUT_SHAPE), train=False))
    params = {label: tree["params"] for label, tree in shapes.items()}
    assert "tied_block" in params["tied"]["stage1"] and "tied_block" not in params["default"]["stage1"]
    # "restart" with start "euler": an entry block never reads its knob; "project" and "copy" do
    assert params["default"]["stage2"]["knobs"]["k"].shape == (1,)
    assert params["project"]["stage2"]["knobs"]["k"].shape == (2,)
    assert params["copy"]["stage2"]["knobs"]["k"].shape == (2,)


def test_remat_and_per_evaluation_stats_reach_the_stages_of_a_resnet():
    model = models.create("resnet18", num_classes=10, scheme="rk2", remat=True, per_evaluation_stats=False)
    assert model.stage == StageOptions(remat=True, per_evaluation_stats=False)
    stats = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(INPUT_SHAPE), train=False))["batch_stats"]
    # RK2's second evaluation keeps its own statistics only with per_evaluation_stats=True
    assert "eval1" not in stats["layer1"]["blocks"]["block"]["bn1"]
    torchvision_layout = models.create("resnet18", remat=True)
    assert torchvision_layout.stage.remat


def test_stage_options_are_frozen_hashable_and_default_to_the_lm_resnet_reference():
    options = StageOptions()
    assert (options.tied, options.scan, options.remat, options.start, options.history_at_entry,
            options.per_evaluation_stats) == (False, True, False, "euler", "restart", True)
    assert hash(StageOptions(scan=False)) == hash(StageOptions(scan=False)) and StageOptions(scan=False) != options
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.scan = False


@pytest.mark.parametrize(
    "options, match",
    [
        ({"start": "zero"}, r"start='zero': must be one of \('euler', 'copy'\)"),
        ({"history_at_entry": "keep"}, r"history_at_entry='keep': must be one of \('restart', 'project'\)"),
        ({"scan": "no"}, r"scan='no': must be True or False"),
        ({"tied": 1}, r"tied=1: must be True or False"),
    ],
)
def test_stage_options_reject_values_they_cannot_take(options, match):
    with pytest.raises(ValueError, match=match):
        StageOptions(**options)
    with pytest.raises(ValueError, match=match):  # the flat keyword reports the same
        models.create("cifar_resnet", depth=8, scheme="lm", **options)
    with pytest.raises(ValueError, match=match):  # and so does a replace
        dataclasses.replace(StageOptions(), **options)


def test_an_option_given_flat_and_in_stage_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"scan=False and stage\.scan=True are both given"):
        models.create("cifar_resnet", depth=8, scan=False, stage={"scan": True})
    # a StageOptions value sets every option, so any flat one collides with it
    with pytest.raises(ValueError, match=r"tied=True and stage\.tied=False are both given"):
        models.create("resnet18", scheme="lm", tied=True, stage=StageOptions(scan=False))
    # different options from a mapping and flat keywords combine
    model = models.create("cifar_resnet", depth=8, tied=True, stage={"scan": False})
    assert model.stage == StageOptions(tied=True, scan=False)


def test_bad_stage_values_and_unknown_keywords():
    with pytest.raises(ValueError, match=r"stage=\{'scann': False\}: unknown option\(s\) \['scann'\]"):
        fold_stage_options({"stage": {"scann": False}})
    with pytest.raises(ValueError, match=r"stage=3: expected a StageOptions"):
        fold_stage_options({"stage": 3})
    with pytest.raises(TypeError, match="scann"):  # unknown flat keywords: the constructor's own error
        models.create("cifar_resnet", depth=8, scann=False)
    with pytest.raises(TypeError, match="scann"):
        models.create("resnet18", scheme="lm", scann=False)
    assert fold_stage_options({"depth": 8}) == {"depth": 8, "stage": StageOptions()}


def test_resnet_without_a_scheme_refuses_ode_only_stage_options():
    with pytest.raises(ValueError, match=r"history_at_entry='project' needs a discretization scheme"):
        models.create("resnet18", stage=StageOptions(history_at_entry="project"))
    with pytest.raises(ValueError, match=r"per_evaluation_stats=False needs a discretization scheme"):
        models.create("resnet18", per_evaluation_stats=False)


def test_from_torchvision_takes_the_stage_options_in_either_spelling():
    model = models.create("resnet18", num_classes=10)
    variables, _ = init_and_logits(model)
    state = convert.to_torchvision("resnet18", variables)
    scanned = convert.from_torchvision("resnet18", state, scheme="euler")
    assert_same_arrays(convert.from_torchvision("resnet18", state, scheme="euler", stage=StageOptions()), scanned)
    unrolled = convert.from_torchvision("resnet18", state, scheme="euler", scan=False)
    assert "blocks_0" in unrolled["params"]["layer1"]
    assert_same_arrays(convert.from_torchvision("resnet18", state, scheme="euler", stage={"scan": False}), unrolled)
