"""Pre-activation ResNet-18 (He, Zhang, Ren & Sun 2016, "Identity mappings in deep residual
networks", ECCV), the CIFAR-10 variant used by most adversarial-training papers.

Parameter names (``conv1``, ``layer1.0.bn1``, ..., ``bn``, ``linear``) follow the common CIFAR
implementations, so their released state dicts load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._shapes import expect_rank


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus an identity (or 1x1 conv projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # the projection sees the pre-activated input; the identity sees the raw one
        # (He et al. 2016, fig. 4e)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """3x3 stem, four stages of pre-activation blocks (64, 128, 256, 512 channels), final
    BN-ReLU, global average pooling and a linear classifier; returns logits."""

    def __init__(self, blocks: tuple[int, ...], in_channels: int = 3, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        planes = 64
        stages = []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for s in [stride] + [1] * (count - 1):
                layers.append(PreActBlock(planes, width, s))
                planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def preact_resnet18(in_shape: tuple[int, ...], n_classes: int) -> PreActResNet:
    """PreAct ResNet-18 (two blocks per stage) for (C, H, W) inputs, (3, 32, 32) for CIFAR-10."""
    channels, _, _ = expect_rank("preact-resnet18", in_shape, 3, "(C, H, W), e.g. (3, 32, 32)")
    return PreActResNet((2, 2, 2, 2), in_channels=channels, n_classes=n_classes)
