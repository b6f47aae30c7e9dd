"""Optimizers and schedules against hand-worked values and numpy re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn.train import optim
from cnn.train.steps import cross_entropy_loss


def _params(rng):
    return {
        "Conv_0": {"kernel": rng.normal(size=(3, 3, 1, 2)).astype(np.float32), "bias": rng.normal(size=2).astype(np.float32)},
        "BatchNorm_0": {"scale": rng.normal(size=2).astype(np.float32), "bias": rng.normal(size=2).astype(np.float32)},
        "k": np.float32(0.3),  # a learnable scalar (as the LM-ResNet k_t): never decayed
        # Parameters of 3 identical blocks stacked by nn.scan: rank 2 scale, rank 5 kernel.
        "blocks": {"bn": {"scale": rng.normal(size=(3, 2)).astype(np.float32)}, "conv": {"kernel": rng.normal(size=(3, 3, 3, 2, 2)).astype(np.float32)}},
    }


def _apply(tx, params, grads_list):
    state = tx.init(params)
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_piecewise_schedule_he_et_al():
    # lr 0.1, /10 after 2 and 3 epochs of 4 steps: the update with index 8 is the first at 0.01.
    config = {"learning_rate": 0.1, "schedule": "piecewise", "decay_epochs": (2, 3), "decay_factor": 0.1}
    schedule = optim.make_schedule(config, steps_per_epoch=4)
    expected = {0: 0.1, 7: 0.1, 8: 0.01, 11: 0.01, 12: 0.001, 100: 0.001}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step
    # Steps given directly win over epochs, and warmup ramps linearly from 0.
    config = {"learning_rate": 0.1, "schedule": "piecewise", "decay_steps": (10,), "warmup_steps": 4}
    schedule = optim.make_schedule(config)
    expected = {0: 0.0, 1: 0.025, 3: 0.075, 4: 0.1, 9: 0.1, 10: 0.01, 50: 0.01}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6, abs=1e-9), step


def test_cosine_schedule_with_warmup_matches_formula():
    base, end, warmup, total = 0.4, 0.004, 5, 45
    config = {"learning_rate": base, "schedule": "cosine", "warmup_steps": warmup, "end_learning_rate": end}
    schedule = optim.make_schedule(config, total_steps=total)
    for step in range(0, total + 3):
        if step < warmup:
            reference = base * step / warmup
        else:
            progress = min(step - warmup, total - warmup) / (total - warmup)
            reference = end + (base - end) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(step)) == pytest.approx(reference, rel=1e-5, abs=1e-7), step


def test_sgd_momentum_coupled_weight_decay_skips_bias_and_norm(rng):
    lr, momentum, wd = 0.1, 0.9, 0.01
    tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": lr, "momentum": momentum, "weight_decay": wd})
    params = _params(rng)
    grads = [jax.tree_util.tree_map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params) for _ in range(2)]
    result = _apply(tx, params, grads)

    def reference(path, w0, g1, g2):
        decay = wd if path[-1].key == "kernel" else 0.0  # by name, independently of rank
        t1 = g1 + decay * w0
        w1 = w0 - lr * t1
        t2 = g2 + decay * w1 + momentum * t1
        return w1 - lr * t2

    expected = jax.tree_util.tree_map_with_path(reference, params, grads[0], grads[1])
    for got, want in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The mask itself: only the conv kernel is decayed.
    mask = optim.weight_decay_mask(params)
    assert mask == {
        "Conv_0": {"kernel": True, "bias": False},
        "BatchNorm_0": {"scale": False, "bias": False},
        "k": False,
        "blocks": {"bn": {"scale": False}, "conv": {"kernel": True}},
    }


def test_adamw_decoupled_weight_decay_one_step(rng):
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-8, 0.1
    tx, _ = optim.make_optimizer({"name": "adamw", "learning_rate": lr, "b1": b1, "b2": b2, "eps": eps, "weight_decay": wd})
    params = _params(rng)
    grads = jax.tree_util.tree_map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params)
    result = _apply(tx, params, [grads])

    def reference(path, w, g):
        mu_hat = (1 - b1) * g / (1 - b1)
        nu_hat = (1 - b2) * g * g / (1 - b2)
        decay = wd * w if path[-1].key == "kernel" else 0.0
        return w - lr * (mu_hat / (np.sqrt(nu_hat) + eps) + decay)

    expected = jax.tree_util.tree_map_with_path(reference, params, grads)
    for got, want in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_by_global_norm(rng):
    lr, clip = 0.5, 1.0
    tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": lr, "momentum": 0.0, "grad_clip_norm": clip})
    params = _params(rng)
    grads = jax.tree_util.tree_map(lambda x: 3.0 * np.ones(np.shape(x), np.float32), params)
    norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree_util.tree_leaves(grads)))
    assert norm > clip
    result = _apply(tx, params, [grads])
    for w, g, got in zip(*(jax.tree_util.tree_leaves(t) for t in (params, grads, result))):
        np.testing.assert_allclose(got, w - lr * g * clip / norm, rtol=1e-6, atol=1e-7)


def test_param_groups_freeze_and_scale(rng):
    lr = 0.2
    config = {
        "name": "sgd",
        "learning_rate": lr,
        "momentum": 0.0,
        "param_groups": {
            "head": {"pattern": "^head/", "lr_scale": 0.5},
            "trunk": {"pattern": "^trunk/", "frozen": True},
        },
    }
    tx, _ = optim.make_optimizer(config)
    params = {
        "trunk": {"Conv_0": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32)}},
        "head": {"Dense_0": {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}},
        "other": {"bias": rng.normal(size=3).astype(np.float32)},
    }
    grads = jax.tree_util.tree_map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params)
    result = _apply(tx, params, [grads])
    np.testing.assert_array_equal(result["trunk"]["Conv_0"]["kernel"], params["trunk"]["Conv_0"]["kernel"])
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            result["head"]["Dense_0"][name], params["head"]["Dense_0"][name] - 0.5 * lr * grads["head"]["Dense_0"][name], rtol=1e-6
        )
    np.testing.assert_allclose(result["other"]["bias"], params["other"]["bias"] - lr * grads["other"]["bias"], rtol=1e-6)
    labels = optim.param_group_labels(params, config["param_groups"])
    assert labels == {
        "trunk": {"Conv_0": {"kernel": "trunk"}},
        "head": {"Dense_0": {"kernel": "head", "bias": "head"}},
        "other": {"bias": "default"},
    }
    assert optim.frozen_mask(params, config["param_groups"])["trunk"]["Conv_0"]["kernel"] is True


def test_label_smoothing_cross_entropy_matches_numpy(rng):
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=6).astype(np.int32)
    alpha = 0.2
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    targets = np.full((6, 5), alpha / 5)
    targets[np.arange(6), labels] += 1 - alpha
    reference = float(np.mean(-(targets * log_probs).sum(axis=1)))
    got = float(cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels), label_smoothing=alpha))
    assert got == pytest.approx(reference, rel=1e-5)
    plain = float(np.mean(-log_probs[np.arange(6), labels]))
    assert float(cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize(
    "config, kwargs, field",
    [
        ({"name": "rmsprop"}, {}, "optimizer.name"),
        ({"schedule": "step"}, {}, "optimizer.schedule"),
        ({"schedule": "cosine"}, {}, "total_steps"),
        ({"schedule": "piecewise", "decay_epochs": (3,)}, {}, "optimizer.decay_epochs"),
        ({"weight_decay": -1.0}, {}, "optimizer.weight_decay"),
        ({"grad_clip_norm": -1.0}, {}, "optimizer.grad_clip_norm"),
        ({"param_groups": {"head": {"lr_scale": 0.1}}}, {}, "optimizer.param_groups.head"),
        ({"param_groups": {"head": {"pattern": "("}}}, {}, "optimizer.param_groups.head.pattern"),
    ],
)
def test_bad_optimizer_config_names_the_field(config, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        optim.make_optimizer(config, **kwargs)
