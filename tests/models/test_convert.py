"""torchvision-layout state dicts <-> Flax variables.

Round trips check that conversion loses nothing; the numpy references below (NCHW convolutions
with OIHW weights, torch's BatchNorm formula, the CHW-flattened classifier input) check that the
converted weights compute what torchvision computes with the same state dict.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import cnn.models as models
from cnn.models import convert
from tests.models.helpers import random_variables, variable_shapes


# ----------------------------------------------------------------------------- numpy references (NCHW)


def np_conv_nchw(x, weight, bias=None, stride=1, padding=0):
    """torch.nn.functional.conv2d on [n, c, h, w] with weight [out, in, kh, kw]."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = weight.shape[2:]
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # [n, c, h, w, kh, kw]
    out = np.einsum("nchwij,ocij->nohw", windows, weight, optimize=True)
    return out if bias is None else out + bias[None, :, None, None]


def np_batchnorm_eval_nchw(x, state, prefix, eps=1e-5):
    """torch BatchNorm2d in eval mode from a state dict."""
    mean, var = state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"]
    scale, shift = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
    shape = (1, -1, 1, 1)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + shift.reshape(shape)


def np_adaptive_avg_pool_nchw(x, out):
    n, c, h, w = x.shape
    result = np.zeros((n, c, out, out), x.dtype)
    for i in range(out):
        h0, h1 = (i * h) // out, -(-((i + 1) * h) // out)
        for j in range(out):
            w0, w1 = (j * w) // out, -(-((j + 1) * w) // out)
            result[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return result


def nchw(x):
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def captured_forward(model, **kwargs):
    """A jit-compiled `(variables, x) -> (logits, {path: map})` with every module's first output captured."""

    def run(variables, x):
        out, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"], **kwargs)
        flat = {}

        def visit(node, path):
            for key, value in node.items():
                if key == "__call__":
                    flat[path] = value[0]
                else:
                    visit(value, path + (key,))

        visit(state["intermediates"], ())
        return out, flat

    return jax.jit(run)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def zero_variables(name, input_shape, **options):
    shapes = variable_shapes(models.create(name, **options), input_shape)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ----------------------------------------------------------------------------- torchvision naming


def test_torchvision_key_names_and_shapes():
    """Key counts and shapes as torchvision's state_dict() has them."""
    resnet50 = convert.to_torchvision("resnet50", zero_variables("resnet50", (1, 224, 224, 3)))
    assert len(resnet50) == 320  # 53 convs, 53 BNs x 5 entries, fc weight + bias
    assert resnet50["conv1.weight"].shape == (64, 3, 7, 7)
    assert resnet50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert resnet50["layer1.0.downsample.1.running_var"].shape == (256,)
    assert resnet50["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert resnet50["layer4.2.bn3.running_var"].shape == (2048,)
    assert resnet50["fc.weight"].shape == (1000, 2048)
    assert resnet50["bn1.num_batches_tracked"].dtype == np.int64

    resnet18 = convert.to_torchvision("resnet18", zero_variables("resnet18", (1, 64, 64, 3)))
    assert "layer1.0.downsample.0.weight" not in resnet18 and resnet18["layer2.0.downsample.0.weight"].shape == (
        128, 64, 1, 1)

    # (VGG/AlexNet with a 64-unit classifier to keep this cheap; 4096 only changes fc6/fc7 sizes)
    vgg16 = convert.to_torchvision("vgg16", zero_variables("vgg16", (1, 32, 32, 3), classifier_width=64))
    assert len(vgg16) == 32
    conv_indices = sorted(int(k.split(".")[1]) for k in vgg16 if k.startswith("features") and k.endswith("weight"))
    assert conv_indices == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert vgg16["features.28.weight"].shape == (512, 512, 3, 3)
    assert vgg16["classifier.0.weight"].shape == (64, 512 * 7 * 7)
    assert vgg16["classifier.6.weight"].shape == (1000, 64)

    vgg16_bn = convert.to_torchvision("vgg16_bn", zero_variables("vgg16_bn", (1, 32, 32, 3), classifier_width=64))
    assert len(vgg16_bn) == 97
    assert vgg16_bn["features.40.weight"].shape == (512, 512, 3, 3) and vgg16_bn["features.41.running_var"].shape == (
        512,)

    alexnet = convert.to_torchvision("alexnet", zero_variables("alexnet", (1, 63, 63, 3), classifier_width=64))
    assert sorted(k for k in alexnet if k.endswith("weight")) == [
        "classifier.1.weight", "classifier.4.weight", "classifier.6.weight",
        "features.0.weight", "features.10.weight", "features.3.weight", "features.6.weight", "features.8.weight",
    ]
    assert alexnet["classifier.1.weight"].shape == (64, 256 * 6 * 6)

    googlenet = convert.to_torchvision("googlenet", zero_variables("googlenet", (1, 224, 224, 3), aux_logits=True))
    assert googlenet["conv1.conv.weight"].shape == (64, 3, 7, 7)
    assert googlenet["inception3a.branch3.1.conv.weight"].shape == (32, 16, 3, 3)  # torchvision's "5x5" is 3x3
    assert googlenet["inception5b.branch4.1.bn.running_mean"].shape == (128,)
    assert googlenet["aux1.fc1.weight"].shape == (1024, 2048)
    assert googlenet["aux2.conv.conv.weight"].shape == (128, 528, 1, 1)


# ----------------------------------------------------------------------------- VGG16


VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def torchvision_vgg16_state_dict(rng, num_classes, width=4096):
    """Random weights named and shaped as torchvision's vgg16 (features: conv, ReLU per entry, pool)
    with `width` units in fc6/fc7 (4096 in torchvision)."""
    state, index, channels = {}, 0, 3
    for entry in VGG16_CONFIG:
        if entry == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = (
            rng.standard_normal((entry, channels, 3, 3), dtype=np.float32) * np.float32(np.sqrt(2 / (9 * channels)))
        )
        state[f"features.{index}.bias"] = 0.1 * rng.standard_normal(entry, dtype=np.float32)
        index, channels = index + 2, entry
    for index, (fan_out, fan_in) in zip((0, 3, 6), ((width, 25088), (width, width), (num_classes, width))):
        state[f"classifier.{index}.weight"] = (
            rng.standard_normal((fan_out, fan_in), dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
        )
        state[f"classifier.{index}.bias"] = 0.1 * rng.standard_normal(fan_out, dtype=np.float32)
    return state


def convert_vgg16(width):
    rng = np.random.default_rng(16)
    state = torchvision_vgg16_state_dict(rng, num_classes=10, width=width)
    variables = convert.from_torchvision("vgg16", state)  # num_classes and width read from the dict
    model = models.create("vgg16", num_classes=10, classifier_width=width)
    x = rng.standard_normal((2, 64, 64, 3), dtype=np.float32)  # pool5 is 2x2: the 7x7 pool mixes positions
    forward = captured_forward(model, train=False)
    logits, maps = forward(variables, jnp.asarray(x))
    return state, variables, forward, x, logits, maps


@pytest.fixture(scope="module")
def vgg16_converted():
    return convert_vgg16(width=64)


def check_vgg16_against_numpy(state, variables, forward, x, logits, maps):
    width = state["classifier.0.weight"].shape[0]
    assert variables["params"]["classifier"]["fc8"]["kernel"].shape == (width, 10)
    # first conv: OIHW weights on the NCHW image
    conv1_1 = np_conv_nchw(nchw(x), state["features.0.weight"], state["features.0.bias"], padding=1)
    np.testing.assert_allclose(nchw(maps[("features", "conv1_1")]), conv1_1, rtol=1e-4, atol=1e-4)
    # classifier: adaptive pool to 7x7, flatten (c, h, w) as torch does, Linear
    pool5 = nchw(maps[("features", "pool5")])
    assert pool5.shape == (2, 512, 2, 2)
    flat_chw = np_adaptive_avg_pool_nchw(pool5, 7).reshape(2, 512 * 49)
    fc6 = flat_chw @ state["classifier.0.weight"].T + state["classifier.0.bias"]
    np.testing.assert_allclose(np.asarray(maps[("classifier", "fc6")]), fc6, rtol=1e-4, atol=1e-3)
    fc7 = np.maximum(fc6, 0) @ state["classifier.3.weight"].T + state["classifier.3.bias"]
    expected = np.maximum(fc7, 0) @ state["classifier.6.weight"].T + state["classifier.6.bias"]
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-3)
    # the flattening permutation matters here: reading the NHWC flattening with torch's column
    # order gives a different fc6
    flat_hwc = np.transpose(np_adaptive_avg_pool_nchw(pool5, 7), (0, 2, 3, 1)).reshape(2, -1)
    unpermuted = flat_hwc @ state["classifier.0.weight"].T + state["classifier.0.bias"]
    assert np.max(np.abs(unpermuted - fc6)) > 100 * np.max(np.abs(np.asarray(maps[("classifier", "fc6")]) - fc6))


def check_vgg16_round_trip(state, variables, forward, x, logits, maps):
    exported = convert.to_torchvision("vgg16", variables)
    assert exported.keys() == state.keys()
    for key in state:
        assert np.array_equal(exported[key], state[key]), key
    back = convert.from_torchvision("vgg16", exported)
    assert_trees_equal(back, variables)
    logits_back, _ = forward(back, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(logits_back), np.asarray(logits))


def test_vgg16_conversion_matches_numpy_nchw_computation(vgg16_converted):
    check_vgg16_against_numpy(*vgg16_converted)


def test_vgg16_round_trip_trees_and_outputs(vgg16_converted):
    check_vgg16_round_trip(*vgg16_converted)


@pytest.mark.slow
def test_vgg16_full_size_conversion():
    """The same checks with torchvision's 4096-unit classifier (138,357,544 params)."""
    case = convert_vgg16(width=4096)
    assert models.count_params(case[1]["params"]) == 138_357_544 - 990 * 4096 - 990
    check_vgg16_against_numpy(*case)
    check_vgg16_round_trip(*case)


# ----------------------------------------------------------------------------- ResNet-50


@pytest.fixture(scope="module")
def resnet50_converted():
    model = models.create("resnet50", num_classes=10)
    variables = random_variables(model, (1, 32, 32, 3), seed=50)
    state = convert.to_torchvision("resnet50", variables)
    back = convert.from_torchvision("resnet50", state)
    x = np.random.default_rng(5).standard_normal((2, 32, 32, 3), dtype=np.float32)
    return captured_forward(model, train=False), variables, state, back, x


def test_resnet50_round_trip_trees_and_outputs(resnet50_converted):
    forward, variables, state, back, x = resnet50_converted
    assert len(state) == 320
    assert_trees_equal(back, variables)
    logits, _ = forward(variables, jnp.asarray(x))
    logits_back, _ = forward(back, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(logits_back), np.asarray(logits))


def test_resnet50_conversion_matches_numpy_nchw_computation(resnet50_converted):
    forward, _, state, back, x = resnet50_converted
    logits, maps = forward(back, jnp.asarray(x))
    # stem: conv 7x7/2 pad 3, then BatchNorm with the running statistics
    stem = np_batchnorm_eval_nchw(np_conv_nchw(nchw(x), state["conv1.weight"], stride=2, padding=3), state, "bn1")
    np.testing.assert_allclose(nchw(maps[("bn1",)]), stem, rtol=1e-4, atol=1e-4)
    # layer1's projection shortcut (torchvision's layer1.0.downsample) on the max-pool output
    pooled = nchw(maps[("maxpool",)])
    shortcut = np_batchnorm_eval_nchw(np_conv_nchw(pooled, state["layer1.0.downsample.0.weight"]), state,
                                      "layer1.0.downsample.1")
    np.testing.assert_allclose(nchw(maps[("layer1", "shortcut")]), shortcut, rtol=1e-4, atol=1e-4)
    # first bottleneck branch conv1-bn1-relu-conv2(3x3)-bn2
    y = np.maximum(np_batchnorm_eval_nchw(np_conv_nchw(pooled, state["layer1.0.conv1.weight"]), state,
                                          "layer1.0.bn1"), 0)
    y = np_batchnorm_eval_nchw(np_conv_nchw(y, state["layer1.0.conv2.weight"], padding=1), state, "layer1.0.bn2")
    np.testing.assert_allclose(nchw(maps[("layer1", "block0", "bn2")]), y, rtol=1e-4, atol=1e-4)
    # head: global average pool, fc
    features = np.asarray(maps[("layer4",)], np.float64).mean(axis=(1, 2))
    expected = features @ state["fc.weight"].T + state["fc.bias"]
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- other families


def test_alexnet_classifier_reads_the_chw_flattening(rng):
    model = models.create("alexnet", num_classes=3, classifier_width=32)
    state = convert.to_torchvision("alexnet", random_variables(model, (1, 100, 100, 3), seed=3))
    variables = convert.from_torchvision("alexnet", state)
    x = rng.standard_normal((2, 100, 100, 3), dtype=np.float32)
    _, maps = captured_forward(model, train=False)(variables, jnp.asarray(x))
    pool5 = nchw(maps[("features", "pool5")])
    assert pool5.shape == (2, 256, 2, 2)
    fc6 = np_adaptive_avg_pool_nchw(pool5, 6).reshape(2, -1) @ state["classifier.1.weight"].T
    fc6 += state["classifier.1.bias"]
    np.testing.assert_allclose(np.asarray(maps[("classifier", "fc6")]), fc6, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "name,options", [("googlenet", {"aux_logits": True}), ("vgg11_bn", {"classifier_width": 32}), ("resnet34", {})]
)
def test_round_trip_other_families(name, options):
    model = models.create(name, num_classes=6, **options)
    variables = random_variables(model, (1, 64, 64, 3), seed=7)
    state = convert.to_torchvision(name, variables)
    back = convert.from_torchvision(name, state)  # num_classes and aux heads read from the dict
    assert_trees_equal(back, variables)


# ----------------------------------------------------------------------------- errors and files


@pytest.fixture(scope="module")
def resnet18_state():
    return convert.to_torchvision("resnet18", zero_variables("resnet18", (1, 64, 64, 3)))


def test_missing_key(resnet18_state):
    state = dict(resnet18_state)
    del state["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"lacks 1 keys.*layer3\.1\.bn2\.running_var"):
        convert.from_torchvision("resnet18", state)


def test_wrong_shape(resnet18_state):
    state = dict(resnet18_state)
    state["layer2.0.conv1.weight"] = np.zeros((128, 64, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"state_dict\['layer2\.0\.conv1\.weight'\] has shape \(128, 64, 5, 5\).*"
                                         r"expects \(3, 3, 64, 128\)"):
        convert.from_torchvision("resnet18", state)


def test_unexpected_key(resnet18_state):
    state = dict(resnet18_state, **{"layer5.0.conv1.weight": np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match=r"1 keys that resnet18 does not use: layer5\.0\.conv1\.weight"):
        convert.from_torchvision("resnet18", state)
    variables = convert.from_torchvision("resnet18", state, strict=False)
    assert variables["params"]["fc"]["kernel"].shape == (512, 1000)


def test_family_without_torchvision_counterpart():
    with pytest.raises(ValueError, match="LeNet5 has no torchvision counterpart"):
        convert.to_torchvision("lenet5", {"params": {}})


def test_param_dtype_of_converted_variables(resnet18_state):
    variables = convert.from_torchvision("resnet18", resnet18_state, param_dtype=jnp.bfloat16)
    assert variables["params"]["layer1"]["block0"]["conv1"]["kernel"].dtype == jnp.bfloat16


def test_load_state_dict_npz(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.npz"
    np.savez(path, **resnet18_state)
    loaded = convert.load_state_dict(path)
    assert loaded.keys() == resnet18_state.keys()
    np.testing.assert_array_equal(loaded["fc.weight"], resnet18_state["fc.weight"])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        convert.load_state_dict(tmp_path / "missing.npz")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.h5' must end in \.npz, \.pt or \.pth"):
        convert.load_state_dict(tmp_path / "weights.h5")


# ----------------------------------------------------------------------------- a .pth file from torch


def torchvision_resnet18(torch, num_classes):
    """torchvision's resnet18 written out in plain torch.nn with torchvision's module names
    (conv1, bn1, layer{1-4}.{0,1}.{conv1,bn1,conv2,bn2}, layer{2-4}.0.downsample.{0,1}, fc), so
    its state_dict has torchvision's keys. (torchvision itself does not import beside the CPU
    torch that `make test` installs.)"""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths = (64, 128, 256, 512)
            for index, width in enumerate(widths, start=1):
                cin = widths[max(index - 2, 0)]
                stride = 1 if index == 1 else 2
                setattr(self, f"layer{index}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet18()


def test_pth_file_saved_by_torch_gives_torchs_logits(tmp_path):
    """The pretrained-weights path: torch.save(state_dict) -> load_state_dict(.pth) ->
    from_torchvision -> the same logits as the torch network on the same (transposed) images."""
    from tests.benchmarks.helpers import import_torch

    torch = import_torch()
    torch.manual_seed(0)
    net = torchvision_resnet18(torch, num_classes=10)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained network has
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    net.eval()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)

    state = convert.load_state_dict(path)
    assert set(state) == set(net.state_dict())  # every torchvision key, num_batches_tracked included
    variables = convert.from_torchvision("resnet18", state)  # num_classes=10 read from fc.weight
    images = np.random.default_rng(18).standard_normal((2, 3, 64, 64)).astype(np.float32)  # NCHW
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    logits = models.create("resnet18", num_classes=10).apply(variables, images.transpose(0, 2, 3, 1), train=False)
    assert logits.shape == expected.shape == (2, 10)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0.1  # a network that outputs ~0 would agree trivially


def test_pth_file_without_torch_says_how_to_convert(tmp_path, monkeypatch):
    import sys

    (tmp_path / "weights.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ValueError, match=r"weights\.pth' is a torch file but torch is not installed.*numpy\.savez"):
        convert.load_state_dict(tmp_path / "weights.pth")
