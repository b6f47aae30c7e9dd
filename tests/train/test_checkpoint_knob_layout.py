"""Checkpoints of LM-ResNets written before a stage's first block stopped having a `k` (it takes an
Euler step and never used it) restore onto today's model through `cnn.ode.stage.fit_knob_layout`."""

import warnings

import jax
import numpy as np
import pytest

import cnn.models
from cnn.train import optim
from cnn.train.checkpoint import Checkpointer
from cnn.train.errors import ConfigError
from cnn.train.state import create_train_state, state_to_tree, to_host, tree_to_state

STAGES_WITHOUT_BLOCK0_KNOB = ("stage2", "stage3")  # entered by a shape-changing block: an Euler step


def _host_state(depth: int):
    model = cnn.models.create("cifar_resnet", depth=depth, width=2, num_classes=10, scheme="lm")
    tx, _ = optim.make_optimizer({"name": "sgd", "momentum": 0.9})
    return to_host(create_train_state(model, tx, rng=0, input_shape=(1, 8, 8, 3)))


def _old_layout(params_like: dict, rng: np.random.Generator) -> dict:
    """A params-shaped tree in the older layout: every stage holds `k` for each of its blocks, the
    stages entered by a transition with an extra first value (unused), and all values random."""
    old = {key: dict(value) if isinstance(value, dict) else value for key, value in params_like.items()}
    for stage in ("stage1",) + STAGES_WITHOUT_BLOCK0_KNOB:
        have = old[stage].get("knobs", {}).get("k", np.zeros((0,), np.float32))
        extra = 1 if stage in STAGES_WITHOUT_BLOCK0_KNOB else 0
        old[stage]["knobs"] = {"k": rng.normal(size=have.shape[0] + extra).astype(np.float32)}
    return old


def _is_params_like(node, params) -> bool:
    return isinstance(node, dict) and set(node) == set(params)


def _to_old(tree, params, rng):
    """Every params-shaped subtree of a state tree (params, the momentum trace) to the old layout."""
    if _is_params_like(tree, params):
        return _old_layout(tree, rng)
    if isinstance(tree, dict):
        return {key: _to_old(value, params, rng) for key, value in tree.items()}
    return tree


def _params_like_subtrees(tree, params, path=()):
    if _is_params_like(tree, params):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _params_like_subtrees(value, params, path + (key,))


@pytest.mark.parametrize(
    "depth, new_lengths, refitted",
    [
        # 2 blocks per stage: the old arrays are one longer, fitted by fit_knob_layout (warned).
        (14, {"stage1": 2, "stage2": 1, "stage3": 1}, True),
        # 1 block per stage: stages 2 and 3 have no knobs left; Orbax restores the template's
        # subset of the saved tree, which leaves the old subtrees behind by itself.
        (8, {"stage1": 1}, False),
    ],
)
def test_old_knob_layout_checkpoint_restores_dropping_the_unused_block0_values(tmp_path, depth, new_lengths,
                                                                              refitted):
    template = _host_state(depth)
    tree = state_to_tree(template)
    params = tree["params"]
    # Today's layout, counted by hand: (depth - 2) / 6 blocks per stage, minus block 0 where a
    # transition's Euler step takes it.
    assert {s: params[s]["knobs"]["k"].shape[0] for s in params if "knobs" in params.get(s, {})} == new_lengths
    old_tree = _to_old(tree, params, np.random.default_rng(depth))
    old_tree["step"] = np.asarray(5, dtype=np.asarray(tree["step"]).dtype)
    blocks = (depth - 2) // 6
    subtrees = list(_params_like_subtrees(old_tree, params))
    assert len(subtrees) == 2  # params and the momentum trace
    for _, subtree in subtrees:
        assert all(subtree[s]["knobs"]["k"].shape == (blocks,) for s in ("stage1",) + STAGES_WITHOUT_BLOCK0_KNOB)

    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(5, tree_to_state(template, old_tree), data_state={"epoch": 1}, loop_state={})
    checkpointer.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored, data_state, _ = checkpointer.restore(template)
    checkpointer.close()
    assert any("older scheme-knob layout" in str(w.message) for w in caught) == refitted
    assert int(restored.step) == 5 and data_state == {"epoch": 1}

    # The expected state by hand: the old tree with stage 2 and 3's first knob value dropped (and
    # their knobs gone where no block is left to use one); every other array as saved.
    def by_hand(node):
        if _is_params_like(node, params):
            out = dict(node)
            for stage in STAGES_WITHOUT_BLOCK0_KNOB:
                rest = {key: value for key, value in node[stage].items() if key != "knobs"}
                out[stage] = {**rest, "knobs": {"k": node[stage]["knobs"]["k"][1:]}} if stage in new_lengths else rest
            return out
        return {key: by_hand(value) for key, value in node.items()} if isinstance(node, dict) else node

    expected = by_hand(old_tree)
    got = state_to_tree(to_host(restored))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(tree)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
    assert float(got["params"]["stage1"]["knobs"]["k"][0]) == float(old_tree["params"]["stage1"]["knobs"]["k"][0])


def test_knob_arrays_that_fit_neither_layout_still_refuse_with_a_config_error(tmp_path):
    template = _host_state(14)
    tree = state_to_tree(template)
    params = tree["params"]
    bad = _to_old(tree, params, np.random.default_rng(0))
    for _, subtree in _params_like_subtrees(bad, params):
        subtree["stage2"]["knobs"]["k"] = np.zeros(4, np.float32)  # 2 blocks: neither 1 nor 2 values
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(1, tree_to_state(template, bad), data_state={}, loop_state={})
    checkpointer.wait()
    with pytest.raises(ConfigError, match="stage2.knobs.k: checkpoint float32\\[4\\], model float32\\[1\\]"):
        checkpointer.restore(template)
    checkpointer.close()
