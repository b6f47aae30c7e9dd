"""Transfer learning: labels, frozen/fine-tuned updates, head swap, loading trunks, the experiment."""

from __future__ import annotations

import json
import os
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import cnn.models
from cnn.models import convert
from cnn.tasks import transfer
from cnn.train import steps as steps_lib
from cnn.train.checkpoint import Checkpointer
from cnn.train.state import TrainState, create_train_state, to_host

INPUT = (8, 8, 1)
OPTIONS = {"widths": (4, 8)}
HEAD = transfer.head_pattern(("Dense_0",))


def _flat(tree):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


@pytest.fixture(scope="module")
def batch():
    generator = np.random.default_rng(0)
    return {
        "image": jnp.asarray(generator.uniform(size=(16, *INPUT)), jnp.float32),
        "label": jnp.asarray(generator.integers(0, 10, 16), jnp.int32),
    }


@pytest.fixture(scope="module")
def source_variables():
    """simple_cnn variables with non-trivial BatchNorm statistics (as after pretraining)."""
    model = cnn.models.create("simple_cnn", num_classes=10, **OPTIONS)
    tx, _ = transfer.make_optimizer({"name": "sgd"}, "scratch", head=HEAD)
    state = create_train_state(model, tx, rng=0, input_shape=(1, *INPUT))  # the engine's cached init
    generator = np.random.default_rng(1)
    batch_stats = {  # small means (features stay mostly positive after ReLU), variances around 1
        layer: {"mean": jnp.asarray(0.05 * generator.standard_normal(stats["mean"].shape), jnp.float32),
                "var": jnp.asarray(generator.uniform(0.5, 1.5, stats["var"].shape), jnp.float32)}
        for layer, stats in state.batch_stats.items()
    }
    return {"params": state.params, "batch_stats": batch_stats}


# SGD with momentum and no weight decay: the first update is exactly -lr * scale * gradient.
LEARNING_RATE, FRACTION = 0.1, 0.25
SGD = {"name": "sgd", "learning_rate": LEARNING_RATE, "momentum": 0.9, "weight_decay": 0.0}


def _state(mode: str, variables):
    """A TrainState holding `variables` for a mode (built without an init: no compilation)."""
    model = transfer.transfer_model(base="simple_cnn", freeze_statistics=mode == "extraction", num_classes=10, **OPTIONS)
    tx, _ = transfer.make_optimizer(SGD, mode, head=HEAD, trunk_lr_fraction=FRACTION)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"],
        rng=jax.random.key_data(jax.random.key(0)),
    )


@pytest.fixture(scope="module")
def train_step():
    return jax.jit(steps_lib.make_train_step())


@pytest.fixture(scope="module")
def extraction_state(source_variables):
    return _state("extraction", source_variables)


@pytest.fixture(scope="module")
def finetune_state(source_variables):
    return _state("finetune", source_variables)


def test_head_paths_of_zoo_families():
    assert transfer.head_paths("simple_cnn", input_shape=INPUT, **OPTIONS) == ("Dense_0",)
    assert transfer.head_paths("lenet5", input_shape=(32, 32, 1)) == ("output",)
    assert transfer.head_paths("vgg11", input_shape=(32, 32, 3), classifier_width=8) == ("classifier/fc8",)
    assert transfer.head_paths("resnet18", input_shape=(32, 32, 3)) == ("fc",)
    assert transfer.head_paths("transfer", input_shape=INPUT, base="simple_cnn", **OPTIONS) == ("Dense_0",)


def test_param_labels_split_head_and_trunk(source_variables):
    labels = _flat(transfer.param_labels(source_variables["params"], HEAD))
    assert {p for p, label in labels.items() if label == "head"} == {"Dense_0/kernel", "Dense_0/bias"}
    assert {p for p, label in labels.items() if label == "trunk"} == set(labels) - {"Dense_0/kernel", "Dense_0/bias"}
    counts = transfer.count_by_label(source_variables["params"], transfer.param_labels(source_variables["params"], HEAD))
    assert counts["head"] == 8 * 10 + 10
    assert counts["head"] + counts["trunk"] == cnn.models.count_params(source_variables["params"])


def test_extraction_keeps_trunk_and_statistics_frozen(source_variables, extraction_state, batch, train_step):
    state = extraction_state
    for _ in range(3):
        state, _ = train_step(state, batch)
    before, after = _flat(source_variables["params"]), _flat(state.params)
    for path in before:
        if path.startswith("Dense_0/"):
            assert not np.allclose(after[path], before[path]), path
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    # Frozen BatchNorm: running statistics are not updated by the small target batches.
    for path, value in _flat(source_variables["batch_stats"]).items():
        np.testing.assert_array_equal(_flat(state.batch_stats)[path], value, err_msg=path)


def test_finetuning_changes_every_parameter_and_statistic(source_variables, finetune_state, batch, train_step):
    state = finetune_state
    for _ in range(2):
        state, _ = train_step(state, batch)
    for tree, new in (("params", state.params), ("batch_stats", state.batch_stats)):
        before, after = _flat(source_variables[tree]), _flat(new)
        for path in before:
            assert np.all(np.asarray(after[path]) != np.asarray(before[path])), f"{tree}/{path} did not change everywhere"


def test_trunk_learning_rate_is_the_configured_fraction(finetune_state, batch, train_step):
    """First SGD step (empty momentum): delta = -lr * scale * grad, scale = fraction on the trunk, 1 on the head."""
    learning_rate, fraction = LEARNING_RATE, FRACTION
    state = finetune_state

    def loss(params):  # the step's loss, written out independently
        logits, _ = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
        )
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=-1))

    grads = _flat(jax.jit(jax.grad(loss))(state.params))
    new_state, _ = train_step(state, batch)
    before, after = _flat(state.params), _flat(new_state.params)
    ratios = {"head": [], "trunk": []}
    for path, grad in grads.items():
        group = "head" if path.startswith("Dense_0/") else "trunk"
        scale = 1.0 if group == "head" else fraction
        old, new = np.asarray(before[path], np.float64), np.asarray(after[path], np.float64)
        grad = np.asarray(grad, np.float64)
        # Every entry: the update is -lr * scale * grad, up to float32 rounding of the parameter.
        rounding = 4 * np.finfo(np.float32).eps * np.abs(old)
        np.testing.assert_allclose(new - old, -learning_rate * scale * grad, rtol=1e-3, atol=rounding.max(), err_msg=path)
        well_resolved = np.abs(learning_rate * scale * grad) > 1e3 * rounding
        ratios[group].append(-(new - old)[well_resolved] / grad[well_resolved])
    head, trunk = np.concatenate(ratios["head"]), np.concatenate(ratios["trunk"])
    assert len(head) > 10 and len(trunk) > 100
    np.testing.assert_allclose(np.median(head), learning_rate, rtol=1e-4)
    np.testing.assert_allclose(np.median(trunk) / np.median(head), fraction, rtol=1e-4)


def test_scratch_mode_trains_trunk_at_full_rate():
    groups = transfer.transfer_param_groups("scratch", head=HEAD)
    assert groups["trunk"] == {"pattern": "", "lr_scale": 1.0, "frozen": False}
    assert transfer.transfer_param_groups("extraction", head=HEAD)["trunk"]["frozen"] is True
    assert transfer.transfer_param_groups("finetune", head=HEAD, trunk_lr_fraction=0.3)["trunk"]["lr_scale"] == 0.3


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"mode": "linear_probe"}, "mode"), ({"mode": "finetune", "trunk_lr_fraction": 0.0}, "trunk_lr_fraction"),
     ({"mode": "finetune", "trunk_lr_fraction": 2.0}, "trunk_lr_fraction")],
)
def test_bad_transfer_settings_name_the_argument(kwargs, argument):
    mode = kwargs.pop("mode")
    with pytest.raises(ValueError, match=argument):
        transfer.transfer_param_groups(mode, head=HEAD, **kwargs)


def test_transfer_config_wraps_the_model_and_sets_groups():
    base = ml_collections.ConfigDict({"model": "simple_cnn", "model_options": {"widths": (4, 8)}})
    config = transfer.transfer_config(base, "extraction", head=HEAD)
    assert config.model == "transfer"
    assert config.model_options.to_dict() == {"base": "simple_cnn", "freeze_statistics": True, "widths": (4, 8)}
    assert config.optimizer.param_groups.trunk.frozen is True
    again = transfer.transfer_config(config, "finetune", head=HEAD, trunk_lr_fraction=0.2)
    assert again.model_options.freeze_statistics is False and again.model_options.base == "simple_cnn"
    with pytest.raises(ValueError, match="base"):
        transfer.transfer_model(base="transfer")


def test_frozen_statistics_wrapper_keeps_the_variable_tree(source_variables):
    wrapped = transfer.transfer_model(base="simple_cnn", freeze_statistics=True, num_classes=10, **OPTIONS)
    plain = cnn.models.create("simple_cnn", num_classes=10, **OPTIONS)
    images = jnp.asarray(np.random.default_rng(2).uniform(size=(4, *INPUT)), jnp.float32)
    logits, updates = wrapped.apply(source_variables, images, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(logits, plain.apply(source_variables, images, train=False), rtol=1e-6)
    assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(source_variables["batch_stats"])


def test_swap_head_keeps_trunk_and_reinitializes_classifier(source_variables):
    target = cnn.models.create("simple_cnn", num_classes=3, **OPTIONS)
    swapped = transfer.swap_head(source_variables, target, rng=5, input_shape=INPUT, head=HEAD)
    flat, source = _flat(swapped["params"]), _flat(source_variables["params"])
    assert flat["Dense_0/kernel"].shape == (8, 3) and flat["Dense_0/bias"].shape == (3,)
    for path in source:
        if not path.startswith("Dense_0/"):
            np.testing.assert_array_equal(flat[path], source[path], err_msg=path)
    for path, value in _flat(source_variables["batch_stats"]).items():
        np.testing.assert_array_equal(_flat(swapped["batch_stats"])[path], value)
    # The result runs in the target model.
    assert target.apply(swapped, jnp.zeros((2, *INPUT)), train=False).shape == (2, 3)


def test_swap_head_rejects_a_different_trunk(source_variables):
    wider = cnn.models.create("simple_cnn", num_classes=3, widths=(4, 16))
    with pytest.raises(ValueError, match="Conv_1/kernel has shape"):
        transfer.swap_head(source_variables, wider, rng=0, input_shape=INPUT, head=HEAD)
    with pytest.raises(ValueError, match="head="):
        transfer.swap_head(source_variables, wider, rng=0, input_shape=INPUT, head="^nothing/")


def test_load_run_variables_reads_an_engine_checkpoint(source_variables, tmp_path):
    state = _state("finetune", source_variables)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    checkpointer.save(7, to_host(state), data_state={"epoch": 0, "step": 0, "seed": 0})
    checkpointer.close()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "simple_cnn"}))
    variables, config = transfer.load_run_variables(tmp_path / "run")
    assert config["model"] == "simple_cnn"
    for tree in ("params", "batch_stats"):
        loaded, saved = _flat(variables[tree]), _flat(source_variables[tree])
        assert set(loaded) == set(saved)
        for path in saved:
            np.testing.assert_array_equal(loaded[path], saved[path])
    with pytest.raises(FileNotFoundError, match="step=3"):
        transfer.load_run_variables(tmp_path / "run", step=3)
    with pytest.raises(FileNotFoundError, match="run_dir"):
        transfer.load_run_variables(tmp_path / "missing")


def test_trunk_from_a_torchvision_layout_file(tmp_path):
    """AlexNet weights written in torchvision layout (.npz), read back, head swapped to 5 classes."""
    options = {"classifier_width": 8}
    model = cnn.models.create("alexnet", num_classes=10, **options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 63, 63, 3)), train=False))
    generator = np.random.default_rng(0)  # random values of the right shapes (no init to compile)
    variables = jax.tree_util.tree_map(lambda s: generator.standard_normal(s.shape).astype(np.float32), shapes)
    path = tmp_path / "alexnet.npz"
    np.savez(path, **convert.to_torchvision("alexnet", variables, **options))
    loaded = transfer.load_torchvision_variables(path, "alexnet")
    head = transfer.head_pattern(transfer.head_paths("alexnet", input_shape=(63, 63, 3), **options))
    target = cnn.models.create("alexnet", num_classes=5, **options)
    swapped = transfer.swap_head(loaded, target, rng=1, input_shape=(63, 63, 3), head=head)
    original, result = _flat(variables["params"]), _flat(swapped["params"])
    assert result["classifier/fc8/kernel"].shape == (8, 5)
    for path in original:
        if not path.startswith("classifier/fc8"):
            np.testing.assert_array_equal(result[path], original[path], err_msg=path)


def test_balanced_subset_draws_per_class():
    labels = np.repeat(np.arange(4), [5, 7, 6, 9])
    source = {"image": np.arange(len(labels))[:, None], "label": labels}
    subset = transfer.balanced_subset(source, 5, seed=3)
    assert np.bincount(subset["label"]).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(labels[subset["image"][:, 0]], subset["label"])  # images follow labels
    assert len(set(subset["image"][:, 0].tolist())) == 20  # without replacement
    with pytest.raises(ValueError, match="per_class=6"):
        transfer.balanced_subset(source, 6)
    with pytest.raises(ValueError, match="per_class"):
        transfer.balanced_subset(source, 0)


def test_trainable_only_step_skips_the_frozen_trunk(extraction_state, batch, train_step):
    """The feature-extraction step without trunk gradients costs far fewer FLOPs than the engine's,
    and makes the same update (the engine's optimizer zeroes the trunk's)."""
    state = extraction_state
    lean_step = jax.jit(transfer.trainable_step(transfer.param_labels(state.params, HEAD)))
    full_flops = transfer.compiled_flops(train_step.lower(state, batch))
    lean_flops = transfer.compiled_flops(lean_step.lower(state, batch))
    assert 0 < lean_flops < 0.7 * full_flops
    engine_state, _ = train_step(state, batch)
    lean_state, _ = lean_step(state, batch)
    for path, value in _flat(engine_state.params).items():
        np.testing.assert_allclose(_flat(lean_state.params)[path], value, rtol=1e-5, atol=1e-7, err_msg=path)


# ------------------------------------------------------------------------------------------------
# The experiment


def _experiment():
    import experiments.transfer as experiment
    from experiments.configs import transfer as configs

    return experiment, configs


def test_transfer_experiment_tiny_end_to_end(tmp_path):
    experiment, configs = _experiment()
    results = experiment.main(configs.get_tiny_config(), tmp_path)
    assert set(results["modes"]) == {"extraction", "finetune", "scratch"}
    for name in ("results.md", "results.json", "transfer.png"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    for mode in transfer.MODES:
        assert f"| {mode} |" in table
    modes = results["modes"]
    # Every mode starts from fit's init_variables: no step-0 checkpoint is written; the pretrained
    # modes take every variable of the swapped-head model, scratch none.
    for mode in transfer.MODES:
        run = tmp_path / f"{mode}_seed0"
        assert "0" not in [p.name for p in (run / "checkpoints").iterdir()], mode
        overlaid = json.loads((run / "results.json").read_text())["init_variables"]
        if mode == "scratch":
            assert overlaid is None
        else:
            assert overlaid["copied"] == overlaid["total"] > 0, (mode, overlaid)
    # The extraction run started from the pretrained trunk and did not move it (init + freeze).
    pretrained, _ = transfer.load_run_variables(tmp_path / "pretrain")
    extracted, _ = transfer.load_run_variables(tmp_path / "extraction_seed0")
    for tree in ("params", "batch_stats"):
        for path, value in _flat(pretrained[tree]).items():
            if not path.startswith("Dense_0/"):
                np.testing.assert_array_equal(_flat(extracted[tree])[path], value, err_msg=path)
    head_size = 16 * 10 + 10
    assert modes["extraction"]["trainable_params"] == head_size
    assert modes["finetune"]["trainable_params"] == modes["scratch"]["trainable_params"] > head_size
    assert modes["extraction"]["trainable_gflops"] < 0.7 * modes["finetune"]["trainable_gflops"]
    for row in modes.values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["engine_gflops"] > 0


@pytest.mark.slow
@pytest.mark.shared_data
def test_transfer_experiment_mnist_to_fashion(tmp_path, shared_data_dir):
    """The recorded configuration with one seed (about 10 minutes on 2 CPU cores).

    Measured once (seed 0, CPU): MNIST pretraining 0.9865; Fashion-MNIST with 100 labels per class:
    extraction 0.7073, fine-tuning 0.7759, scratch 0.8061; trainable-only GFLOPs per step
    0.656 (extraction) vs 1.984 (fine-tuning, scratch). The 3-seed table is in experiments/transfer.py.
    """
    experiment, configs = _experiment()
    config = configs.get_config()
    config.seeds = (0,)
    config.data_dir = str(shared_data_dir)
    config.progress = False
    results = experiment.main(config, tmp_path)
    modes = results["modes"]
    assert results["pretraining"]["accuracy"] > 0.98
    assert min(row["accuracy_mean"] for row in modes.values()) > 0.65
    # Updating the trunk helps on this pair (MNIST features alone are too specific for clothing).
    assert modes["finetune"]["accuracy_mean"] > modes["extraction"]["accuracy_mean"] + 0.03
    assert modes["extraction"]["trainable_gflops"] < 0.5 * modes["finetune"]["trainable_gflops"]
