"""Model families, inits, losses and optimizers as configured (plain PyTorch + tiny Lightning fits)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from bnstudy.data import GaussianRegressionData
from bnstudy.models import VGG, VGG_PLANS, DeepLinear, FeatureMajorLinear, init_weights
from bnstudy.modules import DLNModule, VGGModule
from bnstudy.norms import FeatureMajorBatchNorm1d


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
    assert kinds.count(FeatureMajorLinear) == 25 and kinds.count(FeatureMajorBatchNorm1d) == 24
    assert kinds[-1] is FeatureMajorLinear and kinds[-2] is FeatureMajorBatchNorm1d
    assert all(m.bias is None for m in net.layers if isinstance(m, nn.Linear))
    assert not any(isinstance(m, (nn.ReLU, nn.Tanh)) for m in net.modules())


@pytest.mark.parametrize("norm", ["none", "batch", "noisy_batch", "l1", "linf"])
def test_the_feature_major_dln_computes_what_nn_linear_does(norm):
    """(W x^T)^T stores each layer's output one row per unit: the same outputs, loss gradients
    and BN statistics as nn.Linear's row-major products, to float rounding."""
    torch.manual_seed(0)
    rows = DeepLinear(depth=25, dim=10, norm=norm, feature_major=False)
    cols = DeepLinear(depth=25, dim=10, norm=norm)
    cols.load_state_dict(rows.state_dict())
    x, y = torch.randn(1000, 10), torch.randn(1000, 10)
    outs, grads = [], []
    for net in (rows, cols):
        out = net(x)
        ((out - y) ** 2).sum().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert outs[0].stride() == (10, 1) and outs[1].stride() == (1, 1000)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)  # 25 layers of rounding
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3 * grads[0].abs().max())
    for a, b in zip(rows.buffers(), cols.buffers()):  # BN's and lp's running statistics
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    if norm == "none":  # the sums did run in another order (BN's output hides it)
        assert not torch.equal(outs[1], outs[0])


def test_feature_major_batchnorm_is_batchnorm1d_in_the_dlns_layout():
    """On a feature-major input it computes BatchNorm1d's output, gradients and running
    statistics (to float rounding) and keeps the layout; on any other input it is BatchNorm1d
    bit for bit."""
    torch.manual_seed(0)
    x = (torch.randn(10, 1000) * 3 + 1).t()  # (1000, 10), one row per unit in memory
    g = torch.randn(1000, 10)
    torch_bn, ours = nn.BatchNorm1d(10), FeatureMajorBatchNorm1d(10)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 2), torch_bn.bias.uniform_(-1, 1)
    ours.load_state_dict(torch_bn.state_dict())
    results = []
    for bn in (torch_bn, ours):
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        out = bn(xi)
        out.backward(g)
        results.append((out, xi.grad, bn.weight.grad, bn.bias.grad))
    assert results[1][0].stride() == (1, 1000)  # the layout it was given
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch_bn.buffers(), ours.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    torch_bn.eval(), ours.eval()
    torch.testing.assert_close(ours(x), torch_bn(x), rtol=1e-6, atol=1e-6)
    ours.load_state_dict(torch_bn.state_dict())
    for other in (x.contiguous(), torch.randn(8, 10, 5)):  # row-major, (N, C, L): torch's path
        torch_bn.train(), ours.train()
        assert torch.equal(ours(other), torch_bn(other))
        assert all(torch.equal(a, b) for a, b in zip(torch_bn.buffers(), ours.buffers()))


def test_feature_major_batchnorm_training_forward_is_batchnorm1d_on_the_transposed_view(
        monkeypatch):
    """Its training forward calls torch.batch_norm itself (without _BatchNorm.forward's Python):
    bit for bit what BatchNorm1d gives on the (1, units, batch) view it stands for, in outputs,
    gradients, running statistics and the count of batches, over several steps."""
    torch_forward = nn.BatchNorm1d.forward

    def not_for_ours(self, x):  # ours must not go through _BatchNorm.forward here
        assert type(self) is nn.BatchNorm1d, "FeatureMajorBatchNorm1d took torch's path"
        return torch_forward(self, x)

    monkeypatch.setattr(nn.BatchNorm1d, "forward", not_for_ours)
    torch.manual_seed(0)
    torch_bn, ours = nn.BatchNorm1d(10), FeatureMajorBatchNorm1d(10)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 2), torch_bn.bias.uniform_(-1, 1)
    ours.load_state_dict(torch_bn.state_dict())
    for _ in range(3):
        x = (torch.randn(10, 1000) * 3 + 1).t()
        g = torch.randn(10, 1000).t()
        results = []
        for bn, view in ((torch_bn, True), (ours, False)):
            xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            out = bn(xi.t().unsqueeze(0)).squeeze(0).t() if view else bn(xi)
            out.backward(g)
            results.append((out, xi.grad, bn.weight.grad, bn.bias.grad))
        assert all(torch.equal(a, b) for a, b in zip(*results))
        assert all(torch.equal(a, b) for a, b in zip(torch_bn.buffers(), ours.buffers()))
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("norm", ["batch", "noisy_batch", "l1", "l2", "linf"])
def test_every_activation_of_a_normalized_dln_stays_feature_major(norm):
    """The products stay in their fast orientation only if every norm keeps the layout."""
    net = DeepLinear(depth=5, dim=10, norm=norm)
    strides = []
    for m in net.layers:
        m.register_forward_hook(lambda mod, inp, out: strides.append(out.stride()))
    net(torch.randn(1000, 10)).sum().backward()
    assert len(strides) == 9 and set(strides) == {(1, 1000)}  # norms and products alike


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



def test_noisy_bn_is_evaluated_with_and_without_its_noise():
    """val/acc (noise off, the default convention) and val/acc_noise (fresh noise seeded by the
    step): the second evaluation of the same weights repeats the first, and evaluating changes
    nothing in training."""
    from bnstudy.data import DigitsData

    def fit(validate: bool):
        L.seed_everything(0, verbose=False)
        module = VGGModule(depth=11, width=0.125, norm="noisy_batch", image_size=8,
                           in_channels=1)
        trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_checkpointing=False,
                            enable_model_summary=False, val_check_interval=3,
                            limit_val_batches=1 if validate else 0, num_sanity_val_steps=0)
        data = DigitsData(batch_size=32)
        trainer.fit(module, data)
        return module, trainer, data

    module, trainer, data = fit(validate=True)
    first = {k: float(trainer.callback_metrics[k]) for k in ("val/acc", "val/acc_noise",
                                                               "val/loss", "val/loss_noise")}
    assert first["val/loss"] != first["val/loss_noise"]
    again = trainer.validate(module, data, verbose=False)[0]
    assert again["val/loss_noise"] == first["val/loss_noise"]
    assert again["val/acc_noise"] == first["val/acc_noise"]
    plain, _, _ = fit(validate=False)
    assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), plain.net.parameters()))


@pytest.mark.parametrize("make", [lambda norm: DeepLinear(6, 10, norm),
                                  lambda norm: VGG(11, 0.125, norm, image_size=8, in_channels=1)])
def test_the_function_preserving_bn_mapping_keeps_the_function(make):
    """Lemma 4.5's counter-argument: the plain network put into the BN network with gamma = the
    batch std and beta = the batch mean computes the plain function on that batch (before the
    loss); gamma = 1, beta = 0 does not."""
    from bnstudy.models import function_preserving_bn

    torch.manual_seed(0)
    plain, bn = make("none"), make("batch")
    init_weights(plain)
    x = torch.randn(32, 10) if isinstance(plain, DeepLinear) else torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        want = plain.train()(x)
        mapped = function_preserving_bn(plain, bn, x).train()(x)
        naive = make("batch")
        for a, b in zip([m for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                        [m for m in naive.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias) if b.bias is not None else None
        changed = naive.train()(x)
    assert torch.allclose(mapped, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert not torch.allclose(changed, want, rtol=1e-2)
