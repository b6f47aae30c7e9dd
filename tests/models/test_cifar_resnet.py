"""CIFAR ResNets: exact parameter counts against a closed-form count written here and He et al.'s
published sizes, shapes, option A vs B, schemes, scan vs unrolled, bf16, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models as models
from cnn.models.cifar_resnet import CifarResidual, PadShortcut
from cnn.ode import stack_unrolled, unstack_scanned

# He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M parameters.
PUBLISHED_MILLIONS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


def closed_form_count(depth, num_classes=10, width=16, shortcut="A", preactivation=False, extra_per_block=0):
    """Conv/BN/dense sizes summed by hand (BN = scale + bias per channel)."""
    n = (depth - 2) // 6
    c = [width, 2 * width, 4 * width]
    total = 3 * 3 * 3 * width  # stem conv
    total += 0 if preactivation else 2 * width  # stem BN (post-activation only)
    for s in range(3):
        c_in = width if s == 0 else c[s - 1]
        for b in range(n):
            fan_in = c_in if b == 0 else c[s]
            convs = 9 * fan_in * c[s] + 9 * c[s] * c[s]
            bns = (2 * fan_in + 2 * c[s]) if preactivation else 4 * c[s]
            total += convs + bns + extra_per_block
        if s > 0 and shortcut == "B":
            total += c_in * c[s] + (2 * c_in if preactivation else 2 * c[s])
    total += 2 * c[2] if preactivation else 0  # final BN
    total += c[2] * num_classes + num_classes  # classifier
    return total


def param_count(name="cifar_resnet", x_shape=(1, 32, 32, 3), **options):
    model = models.create(name, **options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x_shape), train=False))
    return models.count_params(shapes["params"])


@pytest.mark.parametrize("depth", sorted(PUBLISHED_MILLIONS))
def test_parameter_counts_are_exact_and_match_the_paper(depth):
    count = param_count(depth=depth)
    assert count == closed_form_count(depth)
    assert round(count / 1e6, 2 if depth < 110 else 1) == PUBLISHED_MILLIONS[depth]


def test_published_exact_counts_of_the_common_reproduction():
    # option A counts printed by the widely used PyTorch reproduction of the CIFAR ResNets
    expected = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962, 1202: 19_421_274}
    for depth, value in expected.items():
        assert closed_form_count(depth) == value
    assert param_count("resnet20") == 269_722 and param_count("cifar_resnet56") == 853_018


@pytest.mark.parametrize("preactivation", [False, True])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_counts_for_every_variant(preactivation, shortcut):
    for depth in (20, 56):
        got = param_count(depth=depth, shortcut=shortcut, preactivation=preactivation, num_classes=100)
        assert got == closed_form_count(depth, 100, shortcut=shortcut, preactivation=preactivation)


def test_option_b_adds_exactly_the_two_projections():
    # 1x1 convs 16->32 and 32->64 plus their BNs
    assert param_count(depth=20, shortcut="B") - param_count(depth=20) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_schemes_change_the_count_only_by_their_knobs():
    base = param_count(depth=56)
    # one k per block that reads it: stage 1's 9 blocks; stages 2 and 3 start with a transition
    # whose Euler step (history restarted) reads none, so 8 each
    assert param_count(depth=56, scheme="lm") == base + 9 + 8 + 8
    assert param_count(depth=56, scheme="two_step") == base + 2 * 25
    for scheme in ("rk2", "heun", "rk4", "ab2", "leapfrog", "backward_euler"):
        assert param_count(depth=56, scheme=scheme) == base, scheme
    assert param_count("lm_resnet56") == closed_form_count(56, shortcut="B", preactivation=True, extra_per_block=1) - 2
    # "project" keeps the transition's k (its step reads the projected history)
    assert param_count(depth=56, scheme="lm", history_at_entry="project") == base + 27


def test_tied_weights_keep_one_block_per_stage_after_the_entry():
    n = 9
    untied = param_count(depth=56)
    tied = param_count(depth=56, tied=True)
    saved = sum((n - 1 if s == 0 else n - 2) * (18 * c * c + 4 * c) for s, c in enumerate((16, 32, 64)))
    # stage 1 has no entry block: all 9 blocks tied into 1; stages 2, 3: entry + 8 tied into 1
    assert untied - tied == saved


def test_create_with_scheme_and_aliases():
    model = models.create("cifar_resnet", depth=56, scheme="lm", num_classes=10)
    assert model.depth == 56 and model.scheme.name == "lm"
    assert models.create("lm_resnet20").preactivation is True
    assert models.create("resnet110").depth == 110
    custom = models.create("cifar_resnet", depth=20, scheme="lm", scheme_options={"k_init": (-0.2, -0.1), "constrain": True})
    assert custom.scheme.knobs[0].bounds == (-1.0, 1.0)
    for name in ("resnet20", "cifar_resnet32", "lm_resnet44", "cifar_resnet"):
        assert name in models.available()


# ------------------------------------------------------------------------------------ forward


@pytest.fixture(scope="module")
def small():
    """LM-ResNet-14 at width 4 on 16x16 inputs, initialized once: small enough to compile quickly."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    model = models.create("cifar_resnet", depth=14, width=4, num_classes=7, scheme="lm")
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    return model, variables, x


def test_output_and_stage_shapes(small):
    model, variables, x = small
    logits, state = model.apply(variables, x, train=False, capture_intermediates=True)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    inter = state["intermediates"]
    shapes = [inter[f"stage{s}"]["__call__"][0][0].shape for s in (1, 2, 3)]
    assert shapes == [(2, 16, 16, 4), (2, 8, 8, 8), (2, 4, 4, 16)]
    # other input sizes work (global average pooling): 32x32 canonical, odd sizes round up
    for hw in (32, 9):
        out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros((1, hw, hw, 3)))
        assert out.shape == (1, 7)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = PadShortcut(features=7, strides=2).apply({}, x, train=False)
    expected = np.zeros((2, 2, 2, 7), np.float32)
    expected[..., 2:5] = np.asarray(x)[:, ::2, ::2, :]  # 4 new channels: 2 before, 2 after
    np.testing.assert_array_equal(np.asarray(y), expected)


def test_first_stage_is_the_post_activation_lm_update(small):
    """Stage 1 (2 blocks): x1 = relu(x0 + F0(x0)) (Euler start), x2 = relu((1-k) x1 + k x0 + F1(x1))."""
    model, variables, x = small
    _, state = model.apply(variables, x, train=False, capture_intermediates=True)
    inter = state["intermediates"]
    x0 = jax.nn.relu(inter["bn1"]["__call__"][0])
    out = inter["stage1"]["__call__"][0][0]
    p, stats = variables["params"]["stage1"], variables["batch_stats"]["stage1"]

    def residual(i, z):
        block = {"params": jax.tree_util.tree_map(lambda a: a[i], p["blocks"]["block"]),
                 "batch_stats": jax.tree_util.tree_map(lambda a: a[i], stats["blocks"]["block"])}
        return CifarResidual(features=4).apply(block, z, train=False)

    k = p["knobs"]["k"]
    x1 = jax.nn.relu(x0 + residual(0, x0))
    x2 = jax.nn.relu((1 - k[1]) * x1 + k[1] * x0 + residual(1, x1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x2), rtol=1e-5, atol=1e-6)


def test_bfloat16_forward_is_close_to_float32(small):
    model, variables, x = small
    bf16 = models.create("cifar_resnet", depth=14, width=4, num_classes=7, scheme="lm", dtype=jnp.bfloat16)
    y32 = model.apply(variables, x, train=False)
    y16 = bf16.apply(variables, x, train=False)
    assert y16.dtype == jnp.float32  # logits are returned in float32
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), rtol=0, atol=0.05 * scale)
    assert float(jnp.max(jnp.abs(y16 - y32))) > 0  # really computed in bf16


def test_scan_and_unrolled_models_agree(small):
    """Same weights in both layouts: identical logits and BatchNorm updates in training (drop path
    on); gradients are compared at the stage level in tests/ode/test_stage.py."""
    x = small[2]
    kw = dict(depth=14, width=4, scheme="lm", shortcut="B", final_survival=0.5)
    scanned = models.create("cifar_resnet", **kw)
    unrolled = models.create("cifar_resnet", scan=False, **kw)
    v_s = scanned.init(jax.random.PRNGKey(0), x, train=False)
    v_u = {c: unstack_scanned(t) for c, t in v_s.items()}
    assert "blocks_0" in v_u["params"]["stage1"] and "blocks" not in v_u["params"]["stage1"]
    rngs = {"dropout": jax.random.PRNGKey(3)}
    y_s, upd_s = scanned.apply(v_s, x, train=True, rngs=rngs, mutable=["batch_stats"])
    y_u, upd_u = unrolled.apply(v_u, x, train=True, rngs=rngs, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_s), np.asarray(y_u), rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), unstack_scanned(upd_s), upd_u)
    assert jax.tree_util.tree_structure(stack_unrolled(v_u)) == jax.tree_util.tree_structure(v_s)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("depth", [21, 2, 0, 18.0])
def test_depth_not_6n_plus_2_is_rejected(depth):
    with pytest.raises(ValueError, match=r"depth="):
        models.create("cifar_resnet", depth=depth)


def test_other_bad_options_are_rejected():
    with pytest.raises(ValueError, match=r"shortcut='C'"):
        param_count(depth=20, shortcut="C")
    with pytest.raises(ValueError, match=r"name='rk9'"):
        models.create("cifar_resnet", scheme="rk9")
    with pytest.raises(ValueError, match=r"^h="):
        models.create("cifar_resnet", scheme="euler", scheme_options={"h": 0.0})
    with pytest.raises(ValueError, match=r"depth=56: this name fixes depth=20"):
        models.create("resnet20", depth=56)
    with pytest.raises(ValueError, match=r"x has shape"):
        param_count(depth=20, x_shape=(32, 32, 3))
