"""Data modules: real files in CIFAR-10's own format read by torchvision's own code, digits, the DLN
data, and the in-memory loader (determinism, and an exact Lightning resume from mid-epoch)."""
from __future__ import annotations

import hashlib
import pickle
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchvision.datasets import CIFAR10

from bnstudy.data import (CIFAR10_MEAN, CIFAR10_STD, CIFAR10Data, DataNotFoundError, DigitsData,
                          FullBatchLoader, GaussianRegressionData, TensorLoader, random_crop_flip)
from conftest import REPO

# -- CIFAR-10 in its own format ------------------------------------------------------------------
PER_TRAIN_BATCH, N_TEST = 4, 6  # 5 train batch files of 4 images, one test file of 6


def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    # the real files are Python-2 pickles whose keys torchvision reads (encoding="latin1") as str
    with open(path, "wb") as f:
        pickle.dump({"batch_label": path.name, "data": data, "labels": labels}, f, protocol=2)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_files(tmp_path):
    """A tiny CIFAR-10 under tmp_path/cifar: returns (root, raw) with raw[split] = (uint8 N x 3072
    rows as stored, labels). Does not touch torchvision's expected checksums (see `cifar_root`)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw = {"train": ([], [])}
    for i in range(1, 6):
        data = rng.integers(0, 256, (PER_TRAIN_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, PER_TRAIN_BATCH)]
        _write_batch(folder / f"data_batch_{i}", data, labels)
        raw["train"][0].append(data)
        raw["train"][1].extend(labels)
    raw["train"] = (np.concatenate(raw["train"][0]), raw["train"][1])
    test = rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8), [int(v) for v in range(N_TEST)]
    _write_batch(folder / "test_batch", *test)
    raw["test"] = test
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 4,
                     "num_vis": 3072}, f, protocol=2)
    return tmp_path / "cifar", raw


@pytest.fixture
def cifar_root(cifar_files, monkeypatch):
    """torchvision checks the md5 of every batch file and of batches.meta against the official
    archive's, even with download=False. Point those expected checksums at our files' md5s, so
    torchvision's own integrity check and loader run unchanged (monkeypatch restores them)."""
    root, raw = cifar_files
    folder = root / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10, "train_list",
                        [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return root, raw


def _all_batches(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def _unnormalize(x):
    return x * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)


def test_cifar_attributes_before_setup():
    data = CIFAR10Data(root="/nonexistent", download=False)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)


def test_cifar_in_memory_loads_the_files(cifar_root):
    root, raw = cifar_root
    data = CIFAR10Data(root=str(root), batch_size=8, download=True, seed=0)  # files intact: no net
    data.prepare_data()
    data.setup("fit")
    train = data.train_dataloader()
    assert len(train) == 3  # 20 images, batches of 8, last one partial
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    # validation = test split, in file order; pixels stored as rows of 1024 R, 1024 G, 1024 B
    xv, yv = _all_batches(data.val_dataloader())
    expected = torch.from_numpy(raw["test"][0]).view(-1, 3, 32, 32).float() / 255
    assert torch.allclose(_unnormalize(xv), expected, atol=1e-6)
    assert yv.tolist() == raw["test"][1]
    assert torch.equal(_all_batches(data.test_dataloader())[0], xv)
    # training set: every image once per epoch, with its own label
    xt, yt = _all_batches(train)
    raw_x = torch.from_numpy(raw["train"][0]).view(-1, 3, 32, 32).float() / 255
    match = [int(torch.nonzero((raw_x - _unnormalize(img[None])).abs().amax((1, 2, 3)) < 1e-6)[0])
             for img in xt]  # index in the files of each image the loader gave
    assert sorted(match) == list(range(20))
    assert torch.equal(torch.tensor(raw["train"][1])[match], yt)

    plain = CIFAR10Data(root=str(root), normalize=False, download=False)
    assert torch.equal(_all_batches(plain.val_dataloader())[0], expected)


def test_cifar_dataloader_path_agrees_with_in_memory(cifar_root):
    root, _ = cifar_root
    fast = CIFAR10Data(root=str(root), batch_size=8, download=False, in_memory=True)
    slow = CIFAR10Data(root=str(root), batch_size=8, download=False, in_memory=False,
                       num_workers=0)
    slow.setup("fit")
    xf, yf = _all_batches(fast.val_dataloader())
    xs, ys = _all_batches(slow.val_dataloader())
    assert torch.allclose(xf, xs, atol=1e-6) and torch.equal(yf, ys)
    # shuffled training sets: same images and labels, compared in a canonical order (sorted by
    # a random projection of the pixels, which no two distinct images share)
    weights = torch.randn(3 * 32 * 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def canon(x, y):
        order = torch.argsort(x.flatten(1).double() @ weights)
        return x[order], y[order]

    (xf, yf), (xs, ys) = (canon(*_all_batches(d.train_dataloader())) for d in (fast, slow))
    assert torch.allclose(xf, xs, atol=1e-6) and torch.equal(yf, ys)


def test_cifar_missing_files_is_one_clear_error(tmp_path):
    root = tmp_path / "nothing here"
    data = CIFAR10Data(root=str(root), download=False)
    data.prepare_data()  # download=False: nothing to do, no network
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as info:
        data.setup("fit")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and str(root) in message
    assert "cifar-10-python.tar.gz" in message and "--data.root" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_cifar_corrupted_files_are_the_same_error(cifar_files):
    # our tiny files do not have the official md5s, so torchvision's integrity check rejects them
    root, _ = cifar_files
    with pytest.raises(DataNotFoundError, match="corrupted"):
        CIFAR10Data(root=str(root), download=False).setup("fit")


def test_random_crop_flip_gives_padded_crops():
    x = torch.randn(16, 3, 6, 6)
    fill = [-1.0, -2.0, -3.0]
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2, fill=fill)
    assert out.shape == x.shape
    padded = torch.tensor(fill).view(1, 3, 1, 1).expand(16, 3, 10, 10).clone()
    padded[:, :, 2:8, 2:8] = x
    crops = padded.unfold(2, 6, 1).unfold(3, 6, 1)  # (16, 3, 5, 5, 6, 6): every crop offset
    flipped = 0
    for n in range(16):
        cands = crops[n].permute(1, 2, 0, 3, 4).reshape(25, 3, 6, 6)
        plain = (cands == out[n]).flatten(1).all(1).any()
        mirrored = (cands.flip(3) == out[n]).flatten(1).all(1).any()
        assert plain or mirrored
        flipped += int(mirrored and not plain)
    assert 0 < flipped < 16  # both flipped and unflipped images occur
    again = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2, fill=fill)
    assert torch.equal(out, again)


def test_cifar_augmentation_pads_black(cifar_root):
    root, _ = cifar_root
    data = CIFAR10Data(root=str(root), batch_size=20, download=False, augment=True)
    x, _ = next(iter(data.train_dataloader()))
    plain, _ = next(iter(CIFAR10Data(root=str(root), batch_size=20, download=False)
                         .train_dataloader()))
    assert not torch.allclose(x, plain)  # same seed and order, but cropped/flipped
    raw = _unnormalize(x)
    assert (raw.abs() < 1e-6).all(1).any()  # some pixels are padding, black in raw space
    assert torch.equal(_all_batches(data.val_dataloader())[0],
                       _all_batches(CIFAR10Data(root=str(root), download=False).val_dataloader())[0])


# -- bad arguments -------------------------------------------------------------------------------
@pytest.mark.parametrize("make, name", [
    (lambda: CIFAR10Data(batch_size=0), "data.batch_size"),
    (lambda: CIFAR10Data(num_workers=-1), "data.num_workers"),
    (lambda: DigitsData(batch_size=-3), "data.batch_size"),
    (lambda: DigitsData(image_size=4), "data.image_size"),
    (lambda: DigitsData(channels=2), "data.channels"),
    (lambda: DigitsData(upscale="bicubic"), "data.upscale"),
    (lambda: GaussianRegressionData(x_dist="cauchy"), "data.x_dist"),
    (lambda: GaussianRegressionData(dim=0), "data.dim"),
    (lambda: GaussianRegressionData(num_samples=0), "data.num_samples"),
    (lambda: GaussianRegressionData(steps_per_epoch=0), "data.steps_per_epoch"),
    (lambda: TensorLoader((torch.zeros(3),), batch_size=0), "batch_size"),
    (lambda: TensorLoader((torch.zeros(3), torch.zeros(4)), batch_size=2), "equal length"),
])
def test_bad_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


# -- digits --------------------------------------------------------------------------------------
def test_digits_split_shapes_and_determinism():
    data = DigitsData(batch_size=64, seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)
    data.setup("fit")
    (xt, yt), (xv, yv) = data.train_set, data.test_set
    assert xt.shape == (1437, 1, 8, 8) and xv.shape == (360, 1, 8, 8)
    assert xt.dtype == torch.float32 and yt.dtype == torch.long
    assert abs(float(xt.mean())) < 1e-5 and abs(float(xt.std()) - 1) < 1e-3  # standardized
    # stratified: every class about 20% held out
    frac = torch.bincount(yv, minlength=10) / (torch.bincount(yv, minlength=10) + torch.bincount(yt))
    assert ((frac - 0.2).abs() < 0.02).all()
    assert len(data.train_dataloader()) == 23 and torch.equal(next(iter(data.val_dataloader()))[0], xv)
    same, other = DigitsData(seed=0), DigitsData(seed=1)
    same.setup(), other.setup()
    assert torch.equal(same.test_set[0], xv) and torch.equal(same.test_set[1], yv)
    assert not torch.equal(other.test_set[1], yv)


def _bilinear_oracle(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bilinear resampling written out: output pixel i samples the input at
    (i + 0.5) * 8 / size - 0.5, clamped to the border, separably along rows and columns."""
    src = np.clip((np.arange(size) + 0.5) * img.shape[0] / size - 0.5, 0, img.shape[0] - 1)
    grid = np.arange(img.shape[0])
    rows = np.stack([np.interp(src, grid, img[:, j]) for j in range(img.shape[1])], axis=1)
    return np.stack([np.interp(src, grid, rows[i]) for i in range(size)])


@pytest.mark.parametrize("upscale", ["bilinear", "nearest"])
def test_digits_upscaled_to_a_cifar_shaped_stand_in(upscale):
    small, big = DigitsData(seed=0), DigitsData(seed=0, image_size=32, channels=3, upscale=upscale)
    assert (big.in_channels, big.image_size) == (3, 32)
    small.setup(), big.setup()
    (xs, ys), (xb, yb) = small.train_set, big.train_set
    assert xb.shape == (1437, 3, 32, 32) and big.test_set[0].shape == (360, 3, 32, 32)
    assert torch.equal(ys, yb)  # the same split, the same order
    assert torch.equal(xb[:, 0], xb[:, 1]) and torch.equal(xb[:, 0], xb[:, 2])  # gray in 3 channels
    assert abs(float(xb.mean())) < 1e-5 and abs(float(xb.std()) - 1) < 1e-3  # standardized again
    # undo both standardizations (each is affine), then compare with the upscaled raw pixels
    raw = lambda x: (x - x.mean()) / x.std()
    for i in (0, 7):
        img = xs[i, 0].double().numpy()
        want = np.repeat(np.repeat(img, 4, 0), 4, 1) if upscale == "nearest" \
            else _bilinear_oracle(img, 32)
        np.testing.assert_allclose(raw(xb[i, 0].double().numpy()), raw(want), atol=1e-5)


@pytest.mark.slow
def test_vgg16_on_32x32_digits_has_the_papers_five_pools(in_tmp):
    """On 8x8 digits VGG-16 keeps 3 of its 5 pools and its last six convs see 1x1 maps; on the
    32x32 stand-in all five pools run and the classifier sees 1x1 maps, as on CIFAR-10."""
    from bnstudy.cli import cli_main

    def net(*data_args):
        cli = cli_main(["--config", str(REPO / "configs" / "vgg_bn.yaml"), "--model.width=0.0625",
                        "--data=bnstudy.data.DigitsData", *data_args], run=False)
        return cli.model.net

    small, big = net(), net("--data.image_size=32", "--data.channels=3")
    pools = lambda m: sum(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert (pools(small), pools(big)) == (3, 5)
    assert big.features[0].in_channels == 3 and big.classifier.in_features == 32  # 512/16 x 1 x 1
    assert big(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# -- the DLN's Gaussian data ---------------------------------------------------------------------
def test_gaussian_regression_determinism():
    a, b, c = (GaussianRegressionData(dim=5, num_samples=50, seed=s) for s in (3, 3, 4))
    assert a.dim == 5 and a.A.shape == (5, 5) and a.X.shape == (50, 5)
    assert torch.equal(a.A, b.A) and torch.equal(a.X, b.X) and torch.equal(a.X_test, b.X_test)
    assert not torch.equal(a.A, c.A) and not torch.equal(a.X, c.X)
    assert torch.allclose(a.Y, a.X @ a.A.T) and torch.allclose(a.Y_test, a.X_test @ a.A.T)
    # the held-out set comes from its own stream: none of its draws repeat a draw of A or X
    assert not torch.isin(a.X_test, torch.cat([a.A.flatten(), a.X.flatten()])).any()
    u = GaussianRegressionData(dim=5, num_samples=2000, x_dist="uniform")
    assert u.X.abs().max() <= 3 ** 0.5 and abs(float(u.X.var()) - 1) < 0.1
    batches = list(a.train_dataloader())
    assert len(batches) == 100 and all(torch.equal(x, a.X) and torch.equal(y, a.Y)
                                       for x, y in batches)
    (xv, yv), = list(a.val_dataloader())
    assert torch.equal(xv, a.X_test) and torch.equal(yv, a.Y_test)


# -- the in-memory loader ------------------------------------------------------------------------
def _epoch(loader):
    return [b for b in loader]


def test_tensor_loader_determinism_and_global_rng():
    x, y = torch.arange(10.).view(10, 1), torch.arange(10)
    rng_before = torch.get_rng_state()
    one, two = TensorLoader((x, y), 4, shuffle=True, seed=7), TensorLoader((x, y), 4, shuffle=True,
                                                                           seed=7)
    e0, e1 = _epoch(one), _epoch(one)
    assert torch.equal(torch.get_rng_state(), rng_before)  # never touches the global RNG
    assert len(one) == 3 and [len(b[1]) for b in e0] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in e0]).tolist()) == list(range(10))
    assert not torch.equal(torch.cat([b[1] for b in e0]), torch.cat([b[1] for b in e1]))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(e0, _epoch(two)))
    assert [len(b[1]) for b in TensorLoader((x, y), 4, drop_last=True)] == [4, 4]
    assert torch.equal(torch.cat([b[1] for b in TensorLoader((x, y), 3)]), y)  # no shuffle


def _aug(x, generator):
    return x + torch.rand(x.shape, generator=generator)


def test_tensor_loader_state_resumes_exactly():
    x, y = torch.randn(10, 2), torch.arange(10)
    ref = TensorLoader((x, y), 3, shuffle=True, seed=1, transform=_aug)
    stream = [b for _ in range(3) for b in ref]  # three epochs, uninterrupted
    for cut in (2, 4, 8):  # mid-epoch 0, exactly at the end of epoch 0, mid-epoch 1
        run = TensorLoader((x, y), 3, shuffle=True, seed=1, transform=_aug)
        seen, it = [], iter(run)
        iter(run)  # an extra iter() that is never advanced (Lightning does this) changes nothing
        while len(seen) < cut:
            try:
                seen.append(next(it))
            except StopIteration:
                it = iter(run)
        state = run.state_dict()
        resumed = TensorLoader((x, y), 3, shuffle=True, seed=1, transform=_aug)
        resumed.load_state_dict(state)
        first = [b for b in resumed]  # the rest of the saved epoch, or all of the next one
        assert len(first) == len(run) - cut % len(run)
        seen += first
        while len(seen) < len(stream):
            seen += [b for b in resumed]
        assert len(seen) == len(stream)
        for a, b in zip(seen, stream):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_full_batch_loader_state():
    loader = FullBatchLoader((torch.ones(4, 2), torch.zeros(4, 2)), steps=5)
    it = iter(loader)
    next(it), next(it)
    resumed = FullBatchLoader((torch.ones(4, 2), torch.zeros(4, 2)), steps=5)
    resumed.load_state_dict(loader.state_dict())
    assert len(list(resumed)) == 3 and len(list(resumed)) == 5
    assert resumed.state_dict()["epoch"] == 1


# -- a real Lightning fit, interrupted mid-epoch and resumed --------------------------------------
def _fit(tmp_path, max_steps, callbacks=(), ckpt_path=None):
    from bnstudy.modules import VGGModule
    L.seed_everything(0, verbose=False)
    model = VGGModule(width=0.0625, depth=11, num_classes=10, in_channels=1, image_size=8, lr=0.05)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks), default_root_dir=tmp_path,
                        enable_checkpointing=bool(callbacks), num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # weights_only=False: our own fresh checkpoints, and VGGModule's hparams hold a NoiseConfig
        # that torch.load(weights_only=True) refuses unless it is registered as a safe global
        trainer.fit(model, datamodule=DigitsData(batch_size=128, seed=0), ckpt_path=ckpt_path,
                    weights_only=False)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return model, trainer


@pytest.fixture
def one_thread():
    # tiny models: several intra-op threads only fight over a busy machine (30x slower here)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lightning_resume_mid_epoch_is_exact(tmp_path, one_thread):
    # 1437 digits in batches of 128: 12 steps per epoch; 30 steps cross two epoch boundaries
    steps = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step}", every_n_train_steps=5,
                            save_top_k=-1, auto_insert_metric_name=False)
    ends = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="end{epoch}-{step}", save_top_k=-1,
                           every_n_epochs=1, save_on_train_epoch_end=True,
                           auto_insert_metric_name=False)
    full, trainer = _fit(tmp_path / "full", 30, [steps, ends])
    assert trainer.global_step == 30
    epochs = trainer.current_epoch
    final = {k: v.clone() for k, v in full.state_dict().items()}
    ckpts = {p.name: p for p in (tmp_path / "ckpt").iterdir()}
    # step 5: mid-epoch 0; step 15: mid-epoch 1; end of epoch 0 (step 12)
    for name in ("step5.ckpt", "step15.ckpt", "end0-12.ckpt"):
        resumed, trainer = _fit(tmp_path / name, 30, ckpt_path=ckpts[name])
        assert trainer.global_step == 30 and trainer.current_epoch == epochs
        for key, value in resumed.state_dict().items():
            assert torch.equal(value, final[key]), (name, key)


def test_ddp_ranks_split_each_global_batch_between_them():
    from bnstudy.data import FullBatchLoader, TensorLoader

    x, y = torch.arange(50.0).view(50, 1), torch.arange(50)
    single = list(TensorLoader((x, y), 8, shuffle=True, seed=3))
    ranks = [list(TensorLoader((x, y), 4, shuffle=True, seed=3, num_replicas=2, rank=r))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 50 // 8  # the incomplete last global batch is dropped
    for i, (a, b) in enumerate(zip(*ranks)):
        assert a[0].shape == b[0].shape == (4, 1)
        together = torch.cat([a[1], b[1]]).sort().values
        assert torch.equal(together, single[i][1].sort().values)  # same samples as one process
        assert not set(a[1].tolist()) & set(b[1].tolist())
    halves = [next(iter(FullBatchLoader((x, y), 1, num_replicas=2, rank=r)))[1] for r in range(2)]
    assert torch.equal(torch.cat(halves).sort().values, y)
