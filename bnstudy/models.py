"""The two networks of the paper as plain nn.Modules (no Lightning): VGG and the deep linear network.

Layer numbering follows docs/protocol.md: layer i is the i-th Conv/Linear module in forward order.
"""
from __future__ import annotations

import torch
from torch import nn

from bnstudy.norms import NoiseConfig, make_norm

# Channel plans; "M" is a 2x2 max pool. VGG-16 (13 conv layers) matches the paper's figures.
VGG_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}
INITS = ("glorot", "kaiming", "orthogonal", "default")


def init_weights(model: nn.Module, scheme: str = "glorot", scale: float = 1.0) -> None:
    """Initialize every Conv/Linear weight with `scheme` times `scale`; biases to zero.

    glorot = Xavier uniform (Glorot & Bengio 2010), kaiming = He normal for ReLU, orthogonal,
    default = torch's own initialization (left as it is, then scaled). Norm layers keep gamma=1,
    beta=0.
    """
    if scheme not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {scheme!r}")
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        with torch.no_grad():
            if scheme == "glorot":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif scheme == "orthogonal":
                nn.init.orthogonal_(m.weight)
            m.weight.mul_(scale)
            if m.bias is not None and scheme != "default":
                m.bias.zero_()


class VGG(nn.Module):
    """VGG-like network for small images: [conv3x3 -> norm -> ReLU]* with max pools, then one
    linear classifier (as in the CIFAR VGGs of Madry lab's `robustness` library).

    Pools are skipped once the feature map is 1x1, so small inputs (8x8 digits) work with any depth.
    """

    def __init__(
        self,
        depth: int = 16,
        width: float = 1.0,
        norm: str = "batch",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        noise: NoiseConfig | None = None,
        groups: int = 32,
        conv_bias: bool = True,
    ):
        super().__init__()
        if depth not in VGG_PLANS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_PLANS)}; got {depth}")
        if width <= 0:
            raise ValueError(f"width must be > 0; got {width}")
        layers: list[nn.Module] = []
        channels, size, index = in_channels, image_size, 0
        for item in VGG_PLANS[depth]:
            if item == "M":
                if size > 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = max(1, int(round(item * width)))
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=conv_bias),
                make_norm(norm, out, spatial=True, noise=noise, layer_index=index, groups=groups),
                nn.ReLU(inplace=False),
            ]
            channels, index = out, index + 1
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DeepLinear(nn.Module):
    """Deep linear network: `depth` fully connected `dim` x `dim` layers, no non-linearity
    (`dim` as in DLNModule and the data).

    With a norm, it follows every layer but the last (docs/protocol.md section 7 default).
    """

    def __init__(
        self,
        depth: int = 25,
        dim: int = 10,
        norm: str = "none",
        noise: NoiseConfig | None = None,
        bias: bool = False,
        groups: int = 32,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dim, dim, bias=bias))
            if i < depth - 1 and norm != "none":
                layers.append(make_norm(norm, dim, spatial=False, noise=noise, layer_index=i,
                                        groups=groups))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
