"""Model families, inits, losses and optimizers as configured (plain PyTorch + tiny Lightning fits)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from bnstudy.data import GaussianRegressionData
from bnstudy.models import VGG, VGG_PLANS, DeepLinear, init_weights
from bnstudy.modules import DLNModule, VGGModule


@pytest.mark.parametrize("depth, convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_vgg_depths_and_width(depth, convs):
    net = VGG(depth=depth, width=0.25, norm="batch")
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == convs + 1  # + the linear classifier
    widths = [m.out_channels for _, m in layers[:-1]]
    assert widths == [int(c * 0.25) for c in VGG_PLANS[depth] if c != "M"]
    # conv -> norm -> ReLU, BN before the non-linearity
    feats = list(net.features)
    i = feats.index(layers[0][1])
    assert isinstance(feats[i + 1], nn.BatchNorm2d) and isinstance(feats[i + 2], nn.ReLU)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_takes_input_shape_from_data():
    net = VGG(depth=16, width=0.125, norm="none", num_classes=7, in_channels=1, image_size=8)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 7)  # only 3 pools happen on 8x8
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3


def test_dln_norm_after_every_layer_but_the_last():
    net = DeepLinear(depth=25, dim=10, norm="batch")
    kinds = [type(m) for m in net.layers]
    assert kinds.count(nn.Linear) == 25 and kinds.count(nn.BatchNorm1d) == 24
    assert kinds[-1] is nn.Linear and kinds[-2] is nn.BatchNorm1d
    assert all(m.bias is None for m in net.layers if isinstance(m, nn.Linear))
    assert not any(isinstance(m, (nn.ReLU, nn.Tanh)) for m in net.modules())


@pytest.mark.parametrize("scheme", ["glorot", "kaiming", "orthogonal"])
def test_init_schemes(scheme):
    torch.manual_seed(0)
    lin = nn.Linear(400, 300)
    init_weights(lin, scheme, scale=2.0)
    w = lin.weight / 2.0
    if scheme == "glorot":  # U(-a, a), a = sqrt(6 / (fan_in + fan_out)): var = 2 / (in + out)
        assert w.var().item() == pytest.approx(2 / 700, rel=0.03)
        assert w.abs().max().item() <= math.sqrt(6 / 700) + 1e-6
    elif scheme == "kaiming":
        assert w.var().item() == pytest.approx(2 / 400, rel=0.03)
    else:
        assert torch.allclose(w @ w.T, torch.eye(300), atol=1e-4)
    assert torch.all(lin.bias == 0)


def test_dln_loss_is_summed_squared_l2_by_default():
    out, target = torch.randn(50, 10), torch.randn(50, 10)
    by_hand = sum(((o - t) ** 2).sum() for o, t in zip(out, target))
    assert DLNModule(depth=2).loss_fn(out, target).item() == pytest.approx(by_hand.item(), 1e-5)
    mean = DLNModule(depth=2, reduction="mean").loss_fn(out, target).item()
    assert mean == pytest.approx(by_hand.item() / 50, 1e-5)


@pytest.mark.parametrize("name, cls, extra", [
    ("sgd", torch.optim.SGD, {"momentum": 0.0}),
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "weight_decay": 5e-4}),
    ("adam", torch.optim.Adam, {}),
    ("adamw", torch.optim.AdamW, {"weight_decay": 0.01}),
    ("rmsprop", torch.optim.RMSprop, {"momentum": 0.5}),
])
def test_optimizer_from_config_trains(name, cls, extra):
    L.seed_everything(0)
    module = DLNModule(depth=3, norm="batch", lr=1e-3, optimizer=name, **extra)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, GaussianRegressionData(num_samples=32, steps_per_epoch=2))
    opt = trainer.optimizers[0]
    assert type(opt) is cls and opt.defaults["lr"] == 1e-3
    for key, value in extra.items():
        assert opt.defaults[key] == value
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_lr_schedule_option():
    L.seed_everything(0)
    module = DLNModule(depth=2, lr=0.01, schedule="step")
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, GaussianRegressionData(num_samples=16, steps_per_epoch=4))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.01)


def test_the_model_summary_counts_real_flops_and_changes_nothing():
    """example_input_array: Lightning's summary runs one eval forward and counts its FLOPs (a DLN
    layer of 10 x 10 is 200 per sample); parameters and buffers stay as they were."""
    from lightning.pytorch.utilities.model_summary import summarize

    dln = DLNModule(depth=25, norm="batch")
    before = {k: v.clone() for k, v in dln.state_dict().items()}
    assert summarize(dln).total_flops == 25 * 2 * 10 * 10
    assert all(torch.equal(before[k], v) for k, v in dln.state_dict().items()) and dln.training
    assert summarize(VGGModule(depth=11, width=0.25, image_size=8, in_channels=1)).total_flops > 1e6

