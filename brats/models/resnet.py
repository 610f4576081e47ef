"""3D ResNet (depth 10/18/34/50) with Tencent MedicalNet's module and key names, and its weights.

Key names follow MedicalNet (`conv1`, `bn1`, `layer1..4`, `downsample.0/1`) so that its released
checkpoints load strictly. Shortcuts as in those checkpoints: B (1x1x1 conv + BN) for depths 10
and 50, A (zero-padded identity, no weights) for 18 and 34.

Layouts:
- `strided` (default): stride 2 in layers 2-4, as in MONAI's ResNet; ~116 GFLOP forward at 4x128^3.
- `medicalnet`: layers 3-4 keep stride 1 with dilation 2 and 4, as the weights were pretrained
  (a segmentation backbone); ~450 GFLOP at 4x128^3.
Head: global average pool -> Dropout -> Linear(num_classes), named `fc` (the classifier group).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from brats.errors import BratsError

if TYPE_CHECKING:
    from brats.training.config import TrainConfig

log = logging.getLogger(__name__)

# depth -> (block, blocks per layer, shortcut type)
SPECS = {
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
}
CLASSIFIER_PREFIX = "fc."


class Conv3d(nn.Conv3d):
    """nn.Conv3d that computes a single-voxel output as one matrix product.

    On small inputs the last layers of a strided ResNet see maps of a voxel or two (32^3 input:
    layer4 is 1^3), where the output voxel meets only the kernel taps that overlap the input; the
    rest multiply padding. oneDNN still runs a full 3-D convolution there, and its backward pass is
    slow for what is a (B x 512) by (512 x 512) product (bench/RESULTS.md, "one-voxel
    convolution"). Same weights, keys and result (forward and gradients) as
    nn.Conv3d; any other shape (or an unbatched input) goes to nn.Conv3d, and so does a TorchScript
    trace (the default ONNX exporter keeps the plain Conv node; the dynamo exporter records the
    product, and export checks parity either way).
    """

    def window(self, size: torch.Size) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(input slices, kernel slices) that the one output voxel sees, or None when the output is
        larger than one voxel (or the convolution is grouped or not zero-padded)."""
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        inputs, taps = [], []
        for n, k, s, p, d in zip(size, self.kernel_size, self.stride, self.padding, self.dilation):
            hit = [j for j in range(k) if 0 <= j * d - p < n]
            if not 0 <= n + 2 * p - d * (k - 1) - 1 < s or not hit:  # not one voxel meeting the input
                return None
            inputs.append(slice(hit[0] * d - p, hit[-1] * d - p + 1, d))
            taps.append(slice(hit[0], hit[-1] + 1))
        return tuple(inputs), tuple(taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = None if torch.jit.is_tracing() or x.dim() != 5 else self.window(x.shape[2:])
        if window is None:
            return super().forward(x)
        inputs, taps = window
        weight = self.weight[(slice(None), slice(None), *taps)].flatten(1)
        out = F.linear(x[(slice(None), slice(None), *inputs)].flatten(1), weight, self.bias)
        return out[:, :, None, None, None]


def conv3(in_planes: int, planes: int, stride: int = 1, dilation: int = 1) -> Conv3d:
    return Conv3d(in_planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class ShortcutA(nn.Module):
    """Identity shortcut that subsamples and zero-pads channels: no weights (MedicalNet type A)."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        pad = self.planes - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad)) if pad > 0 else x


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv3(in_planes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = Conv3d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet3D(nn.Module):
    """(B, C, D, H, W) -> (B, num_classes) logits."""

    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 4,
        num_classes: int = 2,
        layout: str = "strided",
        dropout: float = 0.4,
    ):
        super().__init__()
        if depth not in SPECS:
            raise BratsError(f"depth {depth}: choose one of {sorted(SPECS)}")
        if layout not in ("strided", "medicalnet"):
            raise BratsError(f"layout {layout!r}: choose strided or medicalnet")
        kind, blocks, self.shortcut = SPECS[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.depth, self.layout, self.in_channels = depth, layout, in_channels
        self.in_planes = 64
        self.conv1 = Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        dilated = layout == "medicalnet"
        self.layer1 = self._make_layer(block, 64, blocks[0])
        self.layer2 = self._make_layer(block, 128, blocks[1], stride=2)
        self.layer3 = self._make_layer(
            block, 256, blocks[2], stride=1 if dilated else 2, dilation=2 if dilated else 1
        )
        self.layer4 = self._make_layer(
            block, 512, blocks[3], stride=1 if dilated else 2, dilation=4 if dilated else 1
        )
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, n: int, stride: int = 1, dilation: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            if self.shortcut == "A":
                downsample = ShortcutA(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    Conv3d(self.in_planes, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * block.expansion),
                )
        layers = [block(self.in_planes, planes, stride, dilation, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes, dilation=dilation) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, F, d, h, w): the last feature maps, before pooling (for CAMs)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.feature_maps(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


def build_model(cfg: TrainConfig | dict[str, Any]) -> ResNet3D:
    """The model a TrainConfig (or its dict) describes."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return ResNet3D(
        depth=get("depth"), in_channels=len(get("modalities")), layout=get("layout"), dropout=get("dropout")
    )


def param_groups(model: nn.Module, lr: float, classifier_lr_mult: float, weight_decay: float) -> list[dict]:
    """Backbone at `lr`, classifier (`fc`) at `lr * classifier_lr_mult` (RECIPE.md 6.3)."""
    backbone = [p for n, p in model.named_parameters() if not n.startswith(CLASSIFIER_PREFIX)]
    head = [p for n, p in model.named_parameters() if n.startswith(CLASSIFIER_PREFIX)]
    return [
        {"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
        {"params": head, "lr": lr * classifier_lr_mult, "weight_decay": weight_decay, "name": "classifier"},
    ]
