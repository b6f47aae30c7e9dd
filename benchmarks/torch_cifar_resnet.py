"""The CIFAR ResNet of `cnn.models.cifar_resnet` written in PyTorch (eager), for benchmarking.

Same network as `cnn.models.create("cifar_resnet", depth=d, scheme=s)` with the defaults
(He et al. 2016 post-activation blocks, option-A shortcuts, width 16):

- stem conv3x3(16, no bias) - BN - ReLU;
- three stages of `n = (d - 2) / 6` blocks, 16/32/64 maps; the residual branch is
  `F = BN(conv3x3(ReLU(BN(conv3x3(x)))))`; every step is followed by ReLU;
- option A at the two transitions: `S(x) = x[:, :, ::2, ::2]` zero-padded with the new channels
  half before and half after;
- global average pooling, linear classifier with bias;
- BatchNorm eps 1e-5, momentum 0.1 (PyTorch's convention; Flax's momentum 0.9 is the same
  running-average weight). Running variance: PyTorch stores the unbiased batch variance, Flax
  the biased one (train-mode outputs are identical; only eval with running statistics differs
  by a factor n/(n-1)).

Schemes: "euler" (`x_{t+1} = relu(x_t + F(x_t))`) and "lm" (LM-ResNet,
`x_{t+1} = relu((1 - k_t) x_t + k_t x_{t-1} + F(x_t))`, one learnable `k_t` per block, init
U[-0.1, 0]). As in `cnn.ode.ODEStage` with its defaults (`start="euler"`,
`history_at_entry="restart"`), every stage starts with a plain step `x_1 = relu(S(x_0) + F_0(x_0))`
(S = identity in the first stage) whose `S(x_0)` becomes `x_{t-1}` of the next block; `k_0` of
each stage exists but is unused, as in the Flax model.

`load_flax_variables(net, variables)` copies a Flax model's `params` + `batch_stats` (scanned or
unrolled stages) into this network, so both compute the same function (checked in
`tests/benchmarks`). Needs the `bench` extra (`pip install -e ".[bench]"`, i.e. torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("euler", "lm")


class Residual(nn.Module):
    """`F(x) = BN(conv3x3(ReLU(BN(conv3x3(x, stride)))))`, NCHW."""

    def __init__(self, in_channels: int, features: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, features, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(features, features, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def pad_shortcut(x: torch.Tensor, features: int, stride: int) -> torch.Tensor:
    """Option A: `x[:, :, ::s, ::s]` with `features - channels` zero channels, half before, half after."""
    extra = features - x.shape[1]
    return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, extra // 2, extra - extra // 2))


class Stage(nn.Module):
    """`n` residual blocks stepped by "euler" or "lm"; block 0 may change shape (option A)."""

    def __init__(self, in_channels: int, features: int, stride: int, num_blocks: int, scheme: str):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme={scheme!r}: must be one of {SCHEMES}")
        self.scheme, self.features, self.stride = scheme, features, stride
        self.transition = stride != 1 or in_channels != features
        self.blocks = nn.ModuleList(
            [Residual(in_channels if i == 0 else features, features, stride if i == 0 else 1) for i in range(num_blocks)]
        )
        if scheme == "lm":
            # One k per block that reads it (as cnn.ode.ODEStage): a transition's block 0 takes a
            # plain step, so its k would be unused. Drawn for every block, the first dropped.
            self.k_offset = int(self.transition)
            self.k = nn.Parameter(torch.empty(num_blocks).uniform_(-0.1, 0.0)[self.k_offset:].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = None
        for i, block in enumerate(self.blocks):
            derivative = block(x)
            state = pad_shortcut(x, self.features, self.stride) if (i == 0 and self.transition) else x
            if previous is None or self.scheme == "euler":
                update = state + derivative
            else:
                k = self.k[i - self.k_offset]
                update = (1 - k) * state + k * previous + derivative
            previous = state
            x = F.relu(update)
        return x


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth `6n + 2`: `[batch, channels, h, w] -> [batch, num_classes]` logits."""

    def __init__(self, depth: int = 20, num_classes: int = 10, scheme: str = "euler", in_channels: int = 3, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth!r}: a CIFAR ResNet has depth 6n+2 with n >= 1")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
        self.stages = nn.ModuleList(
            [
                Stage(width * 2 ** max(s - 1, 0), width * 2**s, 1 if s == 0 else 2, n, scheme)
                for s in range(3)
            ]
        )
        self.fc = nn.Linear(4 * width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean(dim=(2, 3)))


def count_params(net: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def sgd(net: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """SGD matching `cnn.train.optim` (`"sgd"`): weight decay on conv and linear weights only
    (Flax's `kernel` leaves), none on BatchNorm, biases or LM knobs."""
    decay = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in net.parameters() if id(p) not in decay_ids]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, momentum=momentum,
    )


def make_train_step(net: nn.Module, optimizer: torch.optim.Optimizer):
    """`step(images [b, c, h, w], labels [b]) -> loss`: forward, cross-entropy, backward, update."""
    net.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


# ----------------------------------------------------------------------------- Flax -> torch


def _blocks_of(stage: Mapping[str, Any]) -> list[tuple[Mapping[str, Any], Mapping[str, Any] | None]]:
    """The per-block subtrees of a Flax stage, in order: `entry/block`, then `blocks/block`
    (scanned: sliced along the leading axis) or `blocks_{i}/block` (unrolled)."""
    params, stats = stage["params"], stage.get("batch_stats", {})
    found = []
    if "entry" in params:
        found.append((params["entry"]["block"], stats.get("entry", {}).get("block")))
    if "blocks" in params:
        leaves = params["blocks"]["block"]
        count = int(np.asarray(leaves["conv1"]["kernel"]).shape[0])
        for i in range(count):
            found.append(
                (
                    _index(params["blocks"]["block"], i),
                    _index(stats["blocks"]["block"], i) if "blocks" in stats else None,
                )
            )
    i = 0
    while f"blocks_{i}" in params:
        found.append((params[f"blocks_{i}"]["block"], stats.get(f"blocks_{i}", {}).get("block")))
        i += 1
    return found


def _index(tree: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: _index(v, i) if isinstance(v, Mapping) else np.asarray(v)[i] for k, v in tree.items()}


def _copy(target: torch.Tensor, value: Any) -> None:
    value = torch.from_numpy(np.array(value, dtype=np.float32))
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"shape {tuple(value.shape)} does not fit the torch tensor of shape {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)


def _conv(conv: nn.Conv2d, kernel: Any) -> None:
    _copy(conv.weight, np.transpose(np.asarray(kernel), (3, 2, 0, 1)))  # HWIO -> OIHW


def _bn(bn: nn.BatchNorm2d, params: Mapping[str, Any], stats: Mapping[str, Any] | None) -> None:
    _copy(bn.weight, params["scale"])
    _copy(bn.bias, params["bias"])
    if stats is not None:
        _copy(bn.running_mean, stats["mean"])
        _copy(bn.running_var, stats["var"])


def load_flax_variables(net: CifarResNet, variables: Mapping[str, Any]) -> CifarResNet:
    """Copies the variables of the matching Flax `cifar_resnet` (`{"params", "batch_stats"}`)
    into `net` in place and returns it. Raises ValueError when a shape does not fit."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    _conv(net.conv1, params["conv1"]["kernel"])
    _bn(net.bn1, params["bn1"], stats.get("bn1"))
    for s, stage in enumerate(net.stages):
        name = f"stage{s + 1}"
        blocks = _blocks_of({"params": params[name], "batch_stats": stats.get(name, {})})
        if len(blocks) != len(stage.blocks):
            raise ValueError(f"{name}: the Flax variables have {len(blocks)} blocks, the torch stage {len(stage.blocks)}")
        for module, (block_params, block_stats) in zip(stage.blocks, blocks):
            _conv(module.conv1, block_params["conv1"]["kernel"])
            _conv(module.conv2, block_params["conv2"]["kernel"])
            _bn(module.bn1, block_params["bn1"], None if block_stats is None else block_stats["bn1"])
            _bn(module.bn2, block_params["bn2"], None if block_stats is None else block_stats["bn2"])
        if stage.scheme == "lm" and stage.k.numel():
            _copy(stage.k, params[name]["knobs"]["k"])
    _copy(net.fc.weight, np.asarray(params["fc"]["kernel"]).T)
    _copy(net.fc.bias, params["fc"]["bias"])
    return net


__all__ = ["CifarResNet", "Residual", "SCHEMES", "Stage", "count_params", "load_flax_variables", "make_train_step", "pad_shortcut", "sgd"]
