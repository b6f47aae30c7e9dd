"""Each benchmark script runs in `--quick` mode and writes `<name>.json` + `<name>.md` of the
documented structure. No timed asserts: times are only checked to be positive and finite; what
is asserted are counts (parameters, F evaluations, program size), first-step agreement with
PyTorch, and XLA's (deterministic) memory plan."""

import json
import math

import pytest

from tests.benchmarks.helpers import cifar_resnet_params, import_torch, load_script

MACHINE_KEYS = {"device", "platform", "cpu", "cpu_count", "usable_cores", "jax", "flax", "date", "quick", "command"}


def run_quick(name: str, out, *extra: str):
    """Runs the script's main in this process; returns (record from the JSON file, Markdown text)."""
    load_script(name).main(["--quick", "--out", str(out), *extra])
    record = json.loads((out / f"{name}.json").read_text())
    markdown = (out / f"{name}.md").read_text()
    assert MACHINE_KEYS <= set(record), MACHINE_KEYS - set(record)
    assert record["quick"] is True and f"benchmarks/{name}.py --quick" in record["command"]
    return record, markdown


def table_rows(markdown: str) -> list[list[str]]:
    """The data rows of the first Markdown table, as cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(lines) >= 2 and set(lines[1].replace("|", "")) == {"-"}, markdown
    width = lines[0].count("|")
    assert all(line.count("|") == width for line in lines), "ragged table"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def positive_seconds(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


# ------------------------------------------------------------------------------------ train_step


@pytest.fixture(scope="module")
def train_step_run(bench_out):
    return run_quick("train_step", bench_out)


def test_train_step_quick_jax_part(train_step_run):
    record, markdown = train_step_run
    assert record["variants"] == ["scan"] and record["batch_size"] == 8
    rows = record["rows"]
    assert [(r["depth"], r["scheme"]) for r in rows] == [(14, "euler"), (14, "lm")]
    assert rows[0]["params_jax"] == cifar_resnet_params(14)
    assert rows[1]["params_jax"] == cifar_resnet_params(14, knobs_per_block=1)  # one k_t per block
    for row in rows:
        assert positive_seconds(row["scan_seconds_per_step"])
        assert len(row["scan_samples"]) == record["repeats"]
        assert row["scan_images_per_second"] == pytest.approx(8 / row["scan_seconds_per_step"])
    table = table_rows(markdown)
    assert [cells[:2] for cells in table] == [["CIFAR ResNet-14", "euler"], ["CIFAR ResNet-14", "lm"]]


def test_train_step_quick_torch_part(train_step_run):
    record, markdown = train_step_run
    if record["torch_skipped"]:
        assert "bench" in record["torch_skipped"] and "SKIPPED" in markdown
        import_torch()  # fails under CNN_REQUIRE_TORCH=1 (`make test`) when torch is missing
        pytest.skip(f"PyTorch part of train_step.py skipped: {record['torch_skipped']}")
    for row in record["rows"]:
        assert row["params_torch"] == row["params_jax"]
        # Same weights in both frameworks: the first step's loss and gradient norm agree.
        assert row["first_step"]["torch"]["loss"] == pytest.approx(row["first_step"]["scan"]["loss"], abs=1e-4)
        assert row["first_step_grad_norm_max_rel_diff"] < 1e-4
        assert positive_seconds(row["torch_seconds_per_step"])
        assert row["scan_ratio_vs_torch"] == pytest.approx(row["torch_seconds_per_step"] / row["scan_seconds_per_step"])
        assert isinstance(row["scan_target_met"], bool)
    assert record["omp_wait_policy"] and "torch images/s" in markdown


# ---------------------------------------------------------------------------------- compile_time


def test_compile_time_quick(bench_out):
    record, markdown = run_quick("compile_time", bench_out)
    rows = {(r["depth"], r["layout"]): r for r in record["rows"]}
    assert set(rows) == {(14, "scan"), (14, "unrolled"), (20, "scan"), (20, "unrolled")}
    for (depth, _), row in rows.items():
        assert row["params"] == cifar_resnet_params(depth)
        for key in ("lower_seconds", "compile_seconds", "compile_cpu_seconds", "first_step_seconds"):
            assert positive_seconds(row[key]), (key, row[key])
        assert row["time_to_first_result_seconds"] == pytest.approx(
            row["lower_seconds"] + row["compile_seconds"] + row["first_step_seconds"]
        )
    # With nn.scan the program holds one block per stage: its size does not grow with depth.
    assert rows[(14, "scan")]["stablehlo_lines"] == rows[(20, "scan")]["stablehlo_lines"]
    assert rows[(20, "unrolled")]["stablehlo_lines"] > rows[(14, "unrolled")]["stablehlo_lines"]
    target = record["target"]
    assert (target["shallow"], target["deep"]) == (14, 20)
    assert target["compile_ratio"] == pytest.approx(rows[(20, "scan")]["compile_seconds"] / rows[(14, "scan")]["compile_seconds"])
    assert target["met"] == (target["compile_ratio"] <= 1.5)
    assert len(table_rows(markdown)) == 4


# ---------------------------------------------------------------------------------- schemes_cost


def test_schemes_cost_quick(bench_out):
    record, markdown = run_quick("schemes_cost", bench_out)
    rows = {r["scheme"]: r for r in record["rows"]}
    assert list(rows) == ["euler", "lm", "midpoint"] and record["depth"] == 14
    # F evaluations per forward, by hand for n = 2 blocks per stage: stage 1 takes n scheme
    # steps, stages 2 and 3 one plain transition step + (n - 1) scheme steps.
    assert [rows[s]["f_evaluations"] for s in ("euler", "lm", "midpoint")] == [6, 6, 2 * 2 + 2 * (1 + 2)]
    assert rows["euler"]["time_vs_euler"] == 1.0 and rows["euler"]["peak_vs_euler"] == 1.0
    for row in rows.values():
        assert positive_seconds(row["seconds_per_step"])
        assert row["peak_bytes"] == row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
        assert row["time_vs_euler"] == pytest.approx(row["seconds_per_step"] / rows["euler"]["seconds_per_step"])
    # RK2 keeps the intermediate stage's activations for the backward pass; LM keeps x_{t-1}.
    assert rows["midpoint"]["temp_bytes"] > 1.3 * rows["euler"]["temp_bytes"]
    assert rows["lm"]["temp_bytes"] >= rows["euler"]["temp_bytes"]
    assert [cells[0] for cells in table_rows(markdown)] == ["euler", "lm", "midpoint"]


# ---------------------------------------------------------------------------------------- memory


def test_memory_quick(bench_out):
    record, markdown = run_quick("memory", bench_out)
    rows = {(r["layout"], r["remat"]): r for r in record["rows"]}
    assert set(rows) == {("scan", False), ("scan", True)}
    plain, remat = rows[("scan", False)], rows[("scan", True)]
    # remat drops the activations saved inside each block: fewer temporaries, same state.
    assert remat["temp_bytes"] < plain["temp_bytes"]
    assert remat["argument_bytes"] == plain["argument_bytes"]
    assert remat["peak_vs_no_remat"] == pytest.approx(remat["peak_bytes"] / plain["peak_bytes"]) and remat["peak_vs_no_remat"] < 1
    for row in rows.values():
        assert positive_seconds(row["seconds_per_step"])
    assert len(table_rows(markdown)) == 2


# ------------------------------------------------------------------------------------------- gpu


def test_gpu_quick_runs_on_cpu(bench_out):
    import jax
    import jax.numpy as jnp

    from cnn import models

    record, markdown = run_quick("gpu", bench_out, "--option-sets", "package", "xla-defaults", "--profile")
    rows = record["resnet_rows"]
    assert [(r["model"], r["batch_size"], r["options"]) for r in rows] == [
        ("resnet18", 2, "package"), ("resnet18", 2, "xla-defaults")
    ]
    # The train step (forward, backward = 2 forwards, plus BatchNorm statistics and the update,
    # relatively large at 32x32 and batch 2) costs 3-4 forward passes: FLOPs are counted.
    model = models.create("resnet18", num_classes=1000, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).cost_analysis()
    forward = forward[0] if isinstance(forward, (list, tuple)) else forward
    for row in rows:
        assert 2.9 < row["flops_per_step"] / forward["flops"] < 4.0, row["flops_per_step"] / forward["flops"]
        assert row["images_per_second"] == pytest.approx(2 / row["seconds_per_step"])
        assert row["achieved_tflops"] == pytest.approx(row["flops_per_step"] / row["seconds_per_step"] / 1e12)
        # ResNet-18's 20 convolutions, each with its forward and its gradients (the stem's input
        # gradient is dead code): at least two per layer survive in the optimized program.
        assert row["hlo_counts"]["convolution"] >= 40, row["hlo_counts"]
    assert rows[1]["compiler_options"] is None
    assert rows[0]["compiler_options"] == record["compiler_options"]
    profile = rows[0]["profile"]
    assert profile and all(line["ms_per_step"] > 0 and line["top"] for line in profile)
    for line in profile:  # the categories partition the line's time
        assert sum(c["ms_per_step"] for c in line["categories"]) == pytest.approx(line["ms_per_step"])
    assert "profile" not in rows[1]
    epochs = record["cifar_resnet"]
    assert [(c["scheme"], c["depth"], c["steps"]) for c in epochs] == [("euler", 8, 4), ("lm", 8, 4)]
    for c in epochs:
        assert positive_seconds(c["epoch_seconds"]) and positive_seconds(c["warmup_epoch_seconds"])
        assert c["images_per_second"] == pytest.approx(4 * 64 / c["epoch_seconds"])
    tables = [block for block in markdown.split("\n\n") if block.startswith("|")]
    assert [len(table_rows(table)) for table in (tables[0], tables[-1])] == [2, 2]
    assert "Profile of resnet18" in markdown and "CIFAR ResNet-8" in tables[-1]


def test_gpu_kernel_categories():
    gpu = load_script("gpu")
    expected = {
        # names as a H200 trace of ResNet-50's train step shows them
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128": "convolutions",
        "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_": "convolutions",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bx_coopA_bias_TNT": "matrix products",
        "input_reduce_select_fusion_9": "reduction fusions (BatchNorm statistics, sums)",
        "input_scatter_fusion": "pooling fusions (max-pool window, its scatter gradient)",
        "loop_reduce_window_fusion": "pooling fusions (max-pool window, its scatter gradient)",
        "loop_add_fusion_1": "elementwise fusions",
        "loop_convert_fusion": "elementwise fusions",  # "convert" is no convolution
        "wrapped_convert": "other",
        "Memset 3": "copies and memsets",
    }
    assert {name: gpu.kernel_category(name) for name in expected} == expected
    totals = {"loop_add_fusion_1": 3_000_000, "loop_maximum_fusion": 1_000_000, "sm90_xmma_wgrad": 2_000_000}
    assert gpu._categories(totals, steps=2) == [
        {"category": "elementwise fusions", "ms_per_step": 2.0, "events": 2,
         "largest": ["loop_add_fusion_1", "loop_maximum_fusion"]},
        {"category": "convolutions", "ms_per_step": 1.0, "events": 1, "largest": ["sm90_xmma_wgrad"]},
    ]


def test_gpu_flops_from_cpu_lowering_match():
    """The fallback for backends without a lowered-HLO cost analysis (the GPU plugin) counts the
    same FLOPs as the direct analysis; and for a convolution, the hand count."""
    import jax
    import jax.numpy as jnp

    gpu = load_script("gpu")
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    direct = gpu._flops(conv.lower(x, w), conv, x, w)
    assert direct == 2 * (2 * 6 * 6 * 4) * (3 * 3 * 3)  # 2 FLOPs per multiply-add, per output element
    assert gpu._cost_analysis(conv.lower(*gpu._abstract_on_cpu((x, w))))["flops"] == direct
