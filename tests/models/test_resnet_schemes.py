"""ImageNet ResNets read as ODEs (`create("resnet50", scheme=...)`).

References independent of the code under test: torchvision's published parameter counts and
blocks per stage, a bottleneck block's size summed by hand, a key-by-key renaming of the
torchvision layout into the ODE layout written here, and the LM-ResNet update evaluated in numpy
on the residual branches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models as models
from cnn.models import convert
from cnn.models.resnet import BasicResidual, Projection
from cnn.ode import stack_unrolled, unstack_scanned
from tests.models.helpers import random_variables, variable_shapes

# torchvision's parameter counts (1000 classes) and blocks per stage (He et al. 2016, Table 1).
TORCHVISION_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
PAPER_STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# Whether block 0 of each stage changes shape: always from stage 2 on; in stage 1 only for
# bottlenecks (64 -> 256 maps).
RESNET18_ENTRIES = (False, True, True, True)


def lm_knob_count(depth):
    """One k per block whose step can read it: a stage's entry (shape-changing) block takes an
    Euler step with the history restarted and has none (ResNet-18/34: stages 2-4; bottleneck
    ResNets: all four stages)."""
    entries = 3 if depth in (18, 34) else 4
    return sum(PAPER_STAGE_SIZES[depth]) - entries
RESNET50_ENTRIES = (True, True, True, True)

SMALL = (2, 32, 32, 3)  # ResNet-18 at 32x32: stage maps 8, 4, 2, 1


def param_count(name, **options):
    return models.count_params(variable_shapes(models.create(name, **options), (1, 64, 64, 3))["params"])


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("depth", [18, 50, 152])
def test_euler_has_torchvision_counts_and_lm_one_scalar_per_non_entry_block(depth):
    name = f"resnet{depth}"  # (scheme=None has these counts too: tests/models/test_param_counts.py)
    assert param_count(name, scheme="euler") == TORCHVISION_COUNTS[depth]
    assert param_count(name, scheme="lm") == TORCHVISION_COUNTS[depth] + lm_knob_count(depth)
    assert lm_knob_count(18) == 8 - 3 and lm_knob_count(50) == 16 - 4


def test_resnet50_counts_for_every_scheme():
    base = TORCHVISION_COUNTS[50]
    assert param_count("resnet50", scheme="two_step") == base + 2 * 12  # knobs a1 and b1, 16 - 4 entry blocks
    for scheme in ("rk2", "rk4", "ab2"):  # Runge-Kutta stages reuse the block's weights
        assert param_count("resnet50", scheme=scheme) == base, scheme


def test_tied_resnet50_keeps_entry_and_one_block_per_stage():
    # bottleneck at width f with 4f maps in and out: convs 4f*f + 9f*f + f*4f, BNs 2f + 2f + 2*4f
    block = {f: 17 * f * f + 12 * f for f in (64, 128, 256, 512)}
    # every ResNet-50 stage has an entry block; the other n - 1 blocks become one tied block
    saved = sum((n - 2) * block[f] for n, f in zip(PAPER_STAGE_SIZES[50], block))
    assert param_count("resnet50", scheme="euler", tied=True) == TORCHVISION_COUNTS[50] - saved
    assert param_count("resnet50", scheme="lm", tied=True) == TORCHVISION_COUNTS[50] - saved + 12


def test_parameter_tree_layout():
    lm50 = variable_shapes(models.create("resnet50", scheme="lm"), (1, 64, 64, 3))["params"]
    for s, n in enumerate(PAPER_STAGE_SIZES[50], start=1):
        stage = lm50[f"layer{s}"]
        assert sorted(stage) == ["blocks", "entry", "knobs"]
        assert sorted(stage["entry"]) == ["block", "shortcut"]
        assert stage["knobs"]["k"].shape == (n - 1,)  # none for the entry block
        assert stage["blocks"]["block"]["conv3"]["kernel"].shape[0] == n - 1  # stacked under scan
    assert lm50["layer1"]["entry"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 64, 256)
    euler18 = variable_shapes(models.create("resnet18", scheme="euler", scan=False), (1, 64, 64, 3))["params"]
    assert models.count_params(euler18) == TORCHVISION_COUNTS[18]
    assert param_count("resnet18", scheme="lm", scan=False) == TORCHVISION_COUNTS[18] + 5
    assert sorted(euler18["layer1"]) == ["blocks_0", "blocks_1"]  # 64 -> 64: no entry block
    assert sorted(euler18["layer2"]) == ["blocks_0", "entry"]
    assert "knobs" not in euler18["layer2"]


def test_create_options_and_bad_input():
    model = models.create("resnet18", scheme="lm", scheme_options={"k_init": (-0.2, -0.1), "constrain": True})
    assert model.scheme.name == "lm" and model.scheme.knobs[0].bounds == (-1.0, 1.0)
    assert models.create("resnet", depth=34, scheme="rk2").scheme.name == "midpoint"
    assert models.create("resnet50").scheme is None  # the torchvision layout stays the default
    with pytest.raises(ValueError, match=r"unknown scheme name='rk9'; valid names: .*euler"):
        models.create("resnet50", scheme="rk9")
    with pytest.raises(ValueError, match=r"scheme 'lm' has no option q=\.\.\."):
        models.create("resnet50", scheme="lm", scheme_options={"q": 1})
    with pytest.raises(ValueError, match=r"^h="):
        models.create("resnet50", scheme="euler", scheme_options={"h": -1.0})
    with pytest.raises(ValueError, match=r"scheme_options=\{'h': 0\.5\} given without a scheme"):
        models.create("resnet50", scheme_options={"h": 0.5})
    with pytest.raises(ValueError, match=r"tied=True needs a discretization scheme"):
        models.create("resnet50", tied=True)
    with pytest.raises(ValueError, match=r"final_survival=0\.5 needs a discretization scheme"):
        models.create("resnet50", final_survival=0.5)
    with pytest.raises(ValueError, match=r"final_survival=0\.0: must be in \(0, 1\]"):
        models.create("resnet50", scheme="lm", final_survival=0.0)
    with pytest.raises(ValueError, match=r"history_at_entry='keep'"):
        models.create("resnet50", scheme="lm", history_at_entry="keep")
    with pytest.raises(ValueError, match=r"start='zero'"):
        models.create("resnet50", scheme="lm", start="zero")
    with pytest.raises(ValueError, match=r"depth=18: this name fixes depth=50"):
        models.create("resnet50", depth=18)


def test_remat_and_history_options_keep_the_parameter_tree():
    plain = variable_shapes(models.create("resnet18", scheme="lm"), (1, 32, 32, 3))
    for options in ({"remat": True}, {"history_at_entry": "project", "start": "copy"}):
        other = variable_shapes(models.create("resnet18", scheme="lm", **options), (1, 32, 32, 3))
        assert jax.tree.structure(plain) == jax.tree.structure(other), options


# ------------------------------------------------------------------------------ same function as torchvision


def to_ode_layout(tree, sizes, entries):
    """torchvision-layout variables (`layer{s}/block{t}`, `layer{s}/shortcut`) renamed by hand into
    the unrolled ODE layout (`layer{s}/entry/{block,shortcut}`, `layer{s}/blocks_{i}/block`)."""
    out = {key: value for key, value in tree.items() if not key.startswith("layer")}
    for s, (n, entry) in enumerate(zip(sizes, entries), start=1):
        old, new = tree[f"layer{s}"], {}
        if entry:
            new["entry"] = {"block": old["block0"], "shortcut": old["shortcut"]}
        for i, t in enumerate(range(int(entry), n)):
            new[f"blocks_{i}"] = {"block": old[f"block{t}"]}
        out[f"layer{s}"] = new
    return out


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def forward(model, train):
    """Jitted `(variables, x, seed=3) -> (logits, batch_stats after the step)`; train mode updates
    BN and draws drop path from the "dropout" stream seeded by `seed`."""

    def run(variables, x, seed=3):
        if train:
            logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": jax.random.key(seed)})
            return logits, state["batch_stats"]
        return model.apply(variables, x, train=False), variables["batch_stats"]

    return jax.jit(run)


@pytest.fixture(scope="module")
def torchvision18():
    """ResNet-18 (10 classes) in the torchvision layout with random variables, a 32x32 batch, and
    its logits and BatchNorm updates in eval and train mode."""
    model = models.create("resnet18", num_classes=10)
    variables = random_variables(model, SMALL, seed=18)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(SMALL), jnp.float32)
    results = {train: forward(model, train)(variables, x) for train in (False, True)}
    return variables, x, results


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_unrolled_euler_computes_the_torchvision_network(torchvision18, train):
    variables, x, results = torchvision18
    ode_vars = {c: to_ode_layout(t, PAPER_STAGE_SIZES[18], RESNET18_ENTRIES) for c, t in variables.items()}
    model = models.create("resnet18", num_classes=10, scheme="euler", scan=False)
    assert jax.tree.structure(ode_vars) == jax.tree.structure(variable_shapes(model, SMALL))
    logits, stats = forward(model, train)(ode_vars, x)
    expected_logits, expected_stats = results[train]
    scale = float(np.max(np.abs(expected_logits)))
    assert scale > 1.0  # a nontrivial network output
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), rtol=1e-6, atol=1e-6 * scale)
    assert_trees_close(stats, to_ode_layout(expected_stats, PAPER_STAGE_SIZES[18], RESNET18_ENTRIES),
                       rtol=1e-6, atol=1e-6)
    if train:  # the running statistics really moved
        assert not np.allclose(expected_stats["layer3"]["block1"]["bn2"]["mean"],
                               variables["batch_stats"]["layer3"]["block1"]["bn2"]["mean"])


# ------------------------------------------------------------------------------ LM-ResNet by hand


@pytest.fixture(scope="module")
def lm18():
    """Unrolled LM-ResNet-18 with random variables (knobs ~ N(0, 0.1)) and its jitted eval pass
    with every module's output captured."""
    model = models.create("resnet18", num_classes=10, scheme="lm", scan=False)
    variables = random_variables(model, SMALL, seed=7)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(SMALL), jnp.float32)

    @jax.jit
    def run(variables, x):
        logits, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
        return logits, state["intermediates"]

    return model, variables, x, run


def test_lm_resnet18_stages_follow_the_update_rule(lm18):
    """Stage 1 (no transition, the network's start): x1 = relu(x0 + F0(x0)), x2 = relu((1-k1) x1 +
    k1 x0 + F1(x1)). Stage 2 (transition, history restarts): y1 = relu(S(x2) + G0(x2)), y2 =
    relu((1-k1') y1 + k1' S(x2) + G1(y1)). k0 is not used by a start step: stage 1 keeps it (a
    stage without a transition may be given a history), stage 2 has none (its k1' is k[0])."""
    _, variables, x, run = lm18
    _, inter = run(variables, x)
    params, stats = variables["params"], variables["batch_stats"]

    def apply(module, path, z):
        node_p, node_s = params, stats
        for key in path:
            node_p, node_s = node_p[key], node_s[key]
        return np.asarray(module.apply({"params": node_p, "batch_stats": node_s}, jnp.asarray(z), train=False),
                          np.float64)

    relu = functools.partial(np.maximum, 0.0)
    x0 = np.asarray(inter["maxpool"]["__call__"][0], np.float64)
    k = np.asarray(params["layer1"]["knobs"]["k"], np.float64)
    assert np.all(k != 0)
    f64 = BasicResidual(features=64)
    x1 = relu(x0 + apply(f64, ("layer1", "blocks_0", "block"), x0))
    x2 = relu((1 - k[1]) * x1 + k[1] * x0 + apply(f64, ("layer1", "blocks_1", "block"), x1))
    stage1 = np.asarray(inter["layer1"]["__call__"][0][0])
    np.testing.assert_allclose(stage1, x2, rtol=1e-5, atol=1e-5)

    k = np.asarray(params["layer2"]["knobs"]["k"], np.float64)
    assert k.shape == (1,)  # block 0 (the transition's Euler step) has no k
    shortcut = apply(Projection(features=128, strides=2), ("layer2", "entry", "shortcut"), stage1)
    y1 = relu(shortcut + apply(BasicResidual(features=128, strides=2), ("layer2", "entry", "block"), stage1))
    g1 = apply(BasicResidual(features=128), ("layer2", "blocks_0", "block"), y1)
    y2 = relu((1 - k[0]) * y1 + k[0] * shortcut + g1)
    np.testing.assert_allclose(np.asarray(inter["layer2"]["__call__"][0][0]), y2, rtol=1e-5, atol=1e-5)
    # and the pure Euler update would differ: the k terms matter
    euler = relu(y1 + g1)
    assert np.max(np.abs(euler - y2)) > 1e-3


def test_lm_from_torchvision_with_k_zero_is_the_pretrained_network(lm18, torchvision18):
    run = lm18[3]
    variables, x, results = torchvision18
    state = convert.to_torchvision("resnet18", variables)
    lm_vars = convert.from_torchvision("resnet18", state, scheme="lm", scan=False, knobs={"k": 0.0})
    assert all(np.all(np.asarray(lm_vars["params"][f"layer{s}"]["knobs"]["k"]) == 0) for s in range(1, 5))
    logits, _ = run(lm_vars, x)
    expected = np.asarray(results[False][0])
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-6, atol=1e-6 * np.max(np.abs(expected)))


# ------------------------------------------------------------------------------ scan vs unrolled


def test_scanned_and_unrolled_lm_resnet18_agree_in_training():
    """Same weights in both layouts (`stack_unrolled`): same logits and BatchNorm updates with drop
    path on (the per-block dropout keys are split identically). At 64x64 layer4's maps are 2x2:
    batch statistics over 1x1 maps of 2 samples would amplify rounding differences."""
    options = dict(num_classes=10, scheme="lm", final_survival=0.5)
    unrolled = models.create("resnet18", scan=False, **options)
    scanned = models.create("resnet18", **options)
    shape = (2, 64, 64, 3)
    v_unrolled = random_variables(unrolled, shape, seed=3)
    v_scanned = {c: stack_unrolled(t) for c, t in v_unrolled.items()}
    assert jax.tree.structure(v_scanned) == jax.tree.structure(variable_shapes(scanned, shape))
    x = jnp.asarray(np.random.default_rng(4).standard_normal(shape), jnp.float32)
    logits_u, stats_u = forward(unrolled, True)(v_unrolled, x)
    logits_s, stats_s = forward(scanned, True)(v_scanned, x)
    scale = float(np.max(np.abs(logits_u)))
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits_u), rtol=1e-5, atol=1e-5 * scale)
    assert_trees_close(unstack_scanned(stats_s), stats_u, rtol=1e-5, atol=1e-5)
    # drop path really acted: other dropout keys give another output
    logits_other, _ = forward(unrolled, True)(v_unrolled, x, 4)
    assert np.max(np.abs(np.asarray(logits_other) - np.asarray(logits_u))) > 1e-3 * scale


# ------------------------------------------------------------------------------ converter


def test_converter_maps_torchvision_weights_into_both_ode_layouts(torchvision18):
    variables, _, _ = torchvision18
    state = convert.to_torchvision("resnet18", variables)
    expected = {c: to_ode_layout(t, PAPER_STAGE_SIZES[18], RESNET18_ENTRIES) for c, t in variables.items()}
    unrolled = convert.from_torchvision("resnet18", state, scheme="euler", scan=False)
    assert_trees_equal(unrolled, expected)
    scanned = convert.from_torchvision("resnet18", state, scheme="euler")
    assert_trees_equal(scanned, {c: stack_unrolled(t) for c, t in expected.items()})
    # RK schemes use the same parameters; their BatchNorms in identical blocks keep statistics
    # per F evaluation (eval1..eval3 for RK4), each starting from torchvision's
    rk4 = convert.from_torchvision("resnet18", state, scheme="rk4")
    assert_trees_equal(rk4["params"], scanned["params"])
    per_evaluation = []

    def split(tree):
        if "mean" in tree:
            children = {k: v for k, v in tree.items() if k.startswith("eval")}
            per_evaluation.extend((children[k], tree) for k in sorted(children))
            return {k: v for k, v in tree.items() if not k.startswith("eval")}
        return {k: split(v) for k, v in tree.items()}

    assert_trees_equal(split(rk4["batch_stats"]), scanned["batch_stats"])
    # bn1, bn2 of each stage's (stacked) identical blocks, 3 extra evaluations each
    assert len(per_evaluation) == 3 * 2 * 4
    for child, parent in per_evaluation:
        assert_trees_equal(child, {"mean": parent["mean"], "var": parent["var"]})
    back = convert.to_torchvision("resnet18", rk4, scheme="rk4")
    assert all(np.array_equal(back[key], state[key]) for key in state)
    # round trips back to torchvision names
    for layout, options in ((unrolled, {"scan": False}), (scanned, {})):
        exported = convert.to_torchvision("resnet18", layout, scheme="euler", **options)
        assert exported.keys() == state.keys()
        for key in state:
            np.testing.assert_array_equal(exported[key], state[key], err_msg=key)


def test_resnet50_conversion_places_each_torchvision_tensor():
    """Bottlenecks: stage 1 has an entry block too, so torchvision's block t is blocks[t - 1]."""
    model = models.create("resnet50", num_classes=10)
    state = convert.to_torchvision("resnet50", random_variables(model, (1, 32, 32, 3), seed=50))
    scanned = convert.from_torchvision("resnet50", state, scheme="lm", knobs={"k": 0.0})
    params, stats = scanned["params"], scanned["batch_stats"]

    def oihw_to_hwio(weight):
        return np.transpose(weight, (2, 3, 1, 0))

    np.testing.assert_array_equal(params["layer1"]["entry"]["shortcut"]["conv"]["kernel"],
                                  oihw_to_hwio(state["layer1.0.downsample.0.weight"]))
    np.testing.assert_array_equal(params["layer1"]["entry"]["block"]["conv1"]["kernel"],
                                  oihw_to_hwio(state["layer1.0.conv1.weight"]))
    np.testing.assert_array_equal(params["layer3"]["blocks"]["block"]["conv2"]["kernel"][4],
                                  oihw_to_hwio(state["layer3.5.conv2.weight"]))
    np.testing.assert_array_equal(stats["layer4"]["blocks"]["block"]["bn3"]["var"][1],
                                  state["layer4.2.bn3.running_var"])
    assert params["layer3"]["knobs"]["k"].shape == (5,)  # 6 blocks, the entry block has no k
    # without the knobs it is the Euler layout, which exports back to the same state dict
    euler = dict(scanned, params={key: ({n: v for n, v in tree.items() if n != "knobs"} if key.startswith("layer")
                                        else tree) for key, tree in params.items()})
    back = convert.to_torchvision("resnet50", euler, scheme="euler", num_classes=10)
    assert back.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)


def test_converter_bad_input(torchvision18):
    variables, _, _ = torchvision18
    state = convert.to_torchvision("resnet18", variables)
    with pytest.raises(ValueError, match=r"knobs=None: scheme='lm' has learnable knobs \['k'\].*knobs=\{'k': 0\.0\}"):
        convert.from_torchvision("resnet18", state, scheme="lm")
    with pytest.raises(ValueError, match=r"knobs=\{'k': 0\.0\}: this model has no learnable scheme knobs"):
        convert.from_torchvision("resnet18", state, scheme="euler", knobs={"k": 0.0})
    with pytest.raises(ValueError, match=r"k=1\.0 lies outside the open interval k_bounds=\(-1\.0, 1\.0\)"):
        convert.from_torchvision("resnet18", state, scheme="lm", scheme_options={"constrain": True}, knobs={"k": 1.0})
    with pytest.raises(ValueError, match=r"tied=True: a tied stage holds one weight set"):
        convert.from_torchvision("resnet18", state, scheme="euler", tied=True)
    lm_vars = convert.from_torchvision("resnet18", state, scheme="lm", knobs={"k": 0.0})
    with pytest.raises(ValueError, match=r"scheme='lm' has learnable knobs \['k'\].*cannot hold"):
        convert.to_torchvision("resnet18", lm_vars, scheme="lm")
    with pytest.raises(ValueError, match=r"tied=True"):
        convert.to_torchvision("resnet18", lm_vars, scheme="euler", tied=True)
