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


class FeatureMajorLinear(nn.Linear):
    """nn.Linear computing y = (W x^T)^T: the same product, with y stored one row per unit
    (a transposed view, strides (1, batch)).

    Why: the DLN multiplies a full batch of 1,000 samples by 10 x 10 weights, and MKL's sgemm
    for a 1000 x 10 row-major result is about 5x slower on a CPU than for its 10 x 1000
    transpose (31 against 6 us here); the backward's two products gain as much. Elementwise ops
    and the norms' per-unit reductions keep the layout, so a step of the 25-layer DLN without a
    norm runs about 2x faster. The numbers equal nn.Linear's up to float rounding (the sums run
    in another order); `DeepLinear(feature_major=False)` keeps nn.Linear's rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        if self.bias is None:
            return torch.mm(self.weight, x.t()).t()
        return torch.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()


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
        feature_major: bool = True,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        linear = FeatureMajorLinear if feature_major else nn.Linear
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(linear(dim, dim, bias=bias))
            if i < depth - 1 and norm != "none":
                layers.append(make_norm(norm, dim, spatial=False, noise=noise, layer_index=i,
                                        groups=groups))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@torch.no_grad()
def function_preserving_bn(plain: nn.Module, bn: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Put a network without BN into the same architecture with BN (after each layer, as VGG and
    DeepLinear place it) so that, on `inputs` in train mode, it computes the same function: the
    weights copied layer by layer, and each BN's affine set to undo its normalization, gamma_j =
    the unit's batch std (sqrt(var + eps), as BN divides by) and beta_j = its batch mean. This is
    the counter-argument's mapping for Lemma 4.5: any point of the plain network is a point of
    the BN network with the same loss (gamma = 1, beta = 0 would change the function). Returns
    `bn`, changed in place; its running statistics are left as they were."""
    layers = (nn.Conv2d, nn.Linear)
    plain_layers = [m for m in plain.modules() if isinstance(m, layers)]
    bn_layers = [m for m in bn.modules() if isinstance(m, layers)]
    if len(plain_layers) != len(bn_layers):
        raise ValueError(f"the networks differ: {len(plain_layers)} against {len(bn_layers)} "
                         f"Conv/Linear layers")
    for a, b in zip(plain_layers, bn_layers):
        b.weight.copy_(a.weight)
        if b.bias is not None:
            b.bias.copy_(a.bias if a.bias is not None else torch.zeros_like(b.bias))
    # each layer's output in the plain network: the BN after it sees the same (the layers
    # before it already compute the plain function), so its batch statistics are these
    outputs: dict[nn.Module, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, args, out: outputs.setdefault(m, out))
             for m in plain_layers]
    was = plain.training
    try:
        plain(inputs) if was else plain.train()(inputs)
    finally:
        plain.train(was)
        for h in hooks:
            h.remove()
    order = list(bn.modules())
    for a, b in zip(plain_layers, bn_layers):
        norm = next((m for m in order[order.index(b) + 1:]
                     if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        following = order[order.index(b) + 1:]
        nxt = next((m for m in following if isinstance(m, layers)), None)
        if norm is None or (nxt is not None and order.index(norm) > order.index(nxt)):
            continue  # no BN right after this layer (the DLN's last one)
        y = outputs[a]
        dims = [0] + list(range(2, y.dim()))
        var, mean = torch.var_mean(y.double(), dim=dims, unbiased=False)
        norm.weight.copy_((var + norm.eps).sqrt())
        norm.bias.copy_(mean)
    return bn
