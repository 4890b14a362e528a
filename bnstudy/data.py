"""Lightning data modules of the study: CIFAR-10, scikit-learn digits, and the DLN's Gaussian data.

Training batches come from in-memory loaders (`TensorLoader`, `FullBatchLoader`): no worker
processes, a shuffle order that depends only on (seed, epoch) and never touches the global RNG,
and a `state_dict` that Lightning stores in every checkpoint, so a run resumed from a mid-epoch
checkpoint sees exactly the batches an uninterrupted run sees.

How Lightning (2.6) drives a stateful train loader, which the loaders below rely on:
- `FitLoop.setup_data` calls `load_state_dict` (when resuming) *before* it calls `iter()`; it also
  calls `iter()` once just to check that the loader is iterable (`_check_dataloader_iterable`).
  `__iter__` is therefore a generator: nothing happens, and no epoch is counted, until the first
  batch is requested.
- A new epoch calls `iter()` again; the loader counts epochs itself (one per started pass).
- The train data fetcher prefetches a batch ahead only when the loader has no length
  (`_PrefetchDataFetcher.__iter__`); ours have `__len__`, so at checkpoint time the number of
  batches yielded equals the number of batches trained on, and that is the saved position.
- At the end of an epoch the iterator is never exhausted (the fetcher stops at `len`), so a
  checkpoint taken there has position == len; resuming from it starts the next epoch.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import lightning as L
import numpy as np
import torch

# Per-channel mean and std of the CIFAR-10 training set (50,000 images, pixels scaled to [0, 1]),
# std over all pixels of a channel. (The often-quoted (0.2023, 0.1994, 0.2010) is not the pixel
# std of the training set.)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class DataNotFoundError(RuntimeError):
    """A data set is not on disk and could not be downloaded. The message is one line that says
    what to do; it is raised `from None` so the user sees that line, not a chain of tracebacks."""


def _derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (e.g. (seed, epoch)), so neighbouring seeds
    and epochs give unrelated streams."""
    entropy = [int(k) % 2**64 for k in keys]  # SeedSequence takes non-negative ints only
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(*keys))


def _replicas(datamodule: L.LightningDataModule) -> dict:
    """The DDP split of the attached trainer (one replica outside a distributed fit)."""
    trainer = datamodule.trainer
    if trainer is None or trainer.world_size == 1:
        return {}
    return {"num_replicas": trainer.world_size, "rank": trainer.global_rank}


def _resident(datamodule: L.LightningDataModule, tensors: Sequence[torch.Tensor]
              ) -> tuple[torch.Tensor, ...]:
    """`tensors` on the attached trainer's device when the data module's `on_device` is set (the
    whole set is copied once; batches are then gathered on the device, no host copy per step)."""
    trainer = datamodule.trainer
    if not datamodule.on_device or trainer is None:
        return tuple(tensors)
    device = trainer.strategy.root_device
    cache = datamodule.__dict__.setdefault("_resident_cache", {})
    key = (device, tuple(id(t) for t in tensors))
    if key not in cache:
        cache[key] = tuple(t.to(device) for t in tensors)
    return cache[key]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


# -- augmentation ------------------------------------------------------------------------------
def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     fill: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Batched torchvision-style RandomCrop(size, padding) + RandomHorizontalFlip(0.5) on an
    (N, C, H, W) tensor. `fill` is the per-channel pad value (default 0); for normalized images
    pass (0 - mean) / std so the padding is black, as torchvision's pad-then-normalize gives."""
    n, c, h, w = x.shape
    padded = x.new_zeros(n, c, h + 2 * padding, w + 2 * padding)
    if fill is not None:
        padded += torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    # one crop offset per image, then gather the crops with advanced indexing
    # drawn on the CPU generator whatever the device (the same crops either way), then moved
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    if x.device.type != "cpu":
        top, left, flip = (t.pin_memory().to(x.device, non_blocking=True)
                           if x.device.type == "cuda" else t.to(x.device) for t in (top, left, flip))
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# -- loaders -----------------------------------------------------------------------------------
class TensorLoader:
    """Batches of in-memory tensors, (x, y) per batch, for Lightning.

    The order of epoch e is a permutation drawn from a generator seeded with (seed, e); the
    optional `transform(x, generator)` gets a generator seeded with (seed, e, batch index). Both
    depend only on the position, so resuming needs nothing but (epoch, position): that is the
    state Lightning saves through `state_dict` / `load_state_dict`.

    Under DDP (num_replicas > 1) rank r takes every num_replicas-th sample of each global batch
    and an incomplete last global batch is dropped. With `limit_train_batches` below its length an epoch-end checkpoint resumes inside the cut
    epoch instead of starting the next one (the loader cannot see Lightning's limit).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, transform: Optional[Transform] = None,
                 num_replicas: int = 1, rank: int = 0):
        _check_positive("batch_size", batch_size)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas); got {rank} of {num_replicas}")
        # Under DDP every rank walks the same permutation in global batches of
        # batch_size * num_replicas and takes every num_replicas-th sample of each, so the ranks
        # together train on exactly what one process would with the global batch.
        self.num_replicas, self.rank = num_replicas, rank
        if len(tensors) == 0 or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("tensors must be a non-empty sequence of tensors of equal length; "
                             f"got lengths {[len(t) for t in tensors]}")
        self.tensors = tuple(tensors)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.transform = drop_last, transform
        self._epoch = 0         # epoch of the pass in progress (or of the last one)
        self._position = 0      # batches yielded in that pass
        self._started = False   # has any pass started (then a new iter() means a new epoch)
        self._resume = False    # load_state_dict was called: the next pass continues the saved one

    @property
    def num_samples(self) -> int:
        return len(self.tensors[0])

    def __len__(self) -> int:
        step = self.batch_size * self.num_replicas
        if self.drop_last or self.num_replicas > 1:  # no rank may get an empty last batch
            return self.num_samples // step
        return -(-self.num_samples // step)

    def _begin_pass(self) -> tuple[int, int]:
        """(epoch, first batch) of the pass that starts now: the saved one after load_state_dict,
        else the next epoch (epoch 0 the first time)."""
        if self._resume:
            self._resume = False
            if self._position >= len(self):  # saved at the end of an epoch: go on with the next
                self._epoch, self._position = self._epoch + 1, 0
        elif self._started:
            self._epoch, self._position = self._epoch + 1, 0
        self._started = True
        return self._epoch, self._position

    def __iter__(self):
        # A generator, so that merely calling iter() (Lightning does, to check iterability)
        # neither counts an epoch nor moves the position.
        epoch, start = self._begin_pass()
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=_generator(self.seed, epoch))
        else:
            order = torch.arange(self.num_samples)
        # on the data's device, once per epoch: a CPU index would be copied to it every batch
        order = order.to(self.tensors[0].device)
        step = self.batch_size * self.num_replicas
        for i in range(start, len(self)):
            idx = order[i * step:(i + 1) * step][self.rank::self.num_replicas]
            x, *rest = (t[idx] for t in self.tensors)
            if self.transform is not None:
                x = self.transform(x, _generator(self.seed, epoch, i))
            self._position = i + 1  # counted when handed out: Lightning trains on it next
            yield (x, *rest)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "started": self._started,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint was written with data seed {state['seed']}, "
                             f"this run has seed {self.seed}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._started = bool(state.get("started", True))
        self._resume = self._started


class FullBatchLoader(TensorLoader):
    """The whole data set as one batch, `steps` times per epoch (full-batch gradient descent with
    fewer Lightning epoch boundaries). Stateful like TensorLoader, so mid-epoch resume is exact
    and Lightning does not warn about an unresumable loader."""

    def __init__(self, tensors: Sequence[torch.Tensor], steps: int, num_replicas: int = 1,
                 rank: int = 0):
        _check_positive("steps_per_epoch", steps)
        # under DDP each rank holds every num_replicas-th sample: together, the full batch
        tensors = tuple(t[rank::num_replicas] for t in tensors)
        super().__init__(tensors, batch_size=len(tensors[0]))
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        _, start = self._begin_pass()
        for i in range(start, len(self)):
            self._position = i + 1
            yield self.tensors


# -- CIFAR-10 ----------------------------------------------------------------------------------
class CIFAR10Data(L.LightningDataModule):
    """CIFAR-10. Validation and test both use the test split (the paper reports test accuracy over
    training).

    Args:
        root: directory holding (or to receive) `cifar-10-batches-py/`.
        batch_size: training batch size (paper: 128).
        download: download in `prepare_data` if the files are missing.
        augment: random crop (4-pixel padding) + horizontal flip (paper: off by default).
        normalize: standardize each channel with CIFAR10_MEAN / CIFAR10_STD (train-set stats).
        in_memory: hold the data as tensors and batch it with TensorLoader (fast, exactly
            resumable); False = torch DataLoader over the torchvision dataset with workers.
        num_workers: DataLoader workers (in_memory=False only).
        seed: shuffle/augmentation seed.
        eval_batch_size: batch size of the validation/test loaders (no gradients: larger is faster).
        on_device: hold the whole data set on the training device (GPU memory: 0.7 GB for
            CIFAR-10 in fp32) and gather batches there: no host work or copy per step. Needs
            in_memory. Same batches, same order, bit for bit.
    """

    num_classes = 10
    in_channels = 3
    image_size = 32

    def __init__(self, root: str = "data/cifar10", batch_size: int = 128, download: bool = True,
                 augment: bool = False, normalize: bool = True, in_memory: bool = True,
                 num_workers: int = 2, seed: int = 0, eval_batch_size: int = 1000,
                 on_device: bool = False):
        super().__init__()
        _check_positive("data.batch_size", batch_size)
        _check_positive("data.eval_batch_size", eval_batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0; got {num_workers!r}")
        self.save_hyperparameters()
        self.root, self.batch_size, self.download = str(root), batch_size, download
        self.augment, self.normalize, self.in_memory = augment, normalize, in_memory
        self.num_workers, self.seed, self.eval_batch_size = num_workers, seed, eval_batch_size
        if on_device and not in_memory:
            raise ValueError("data.on_device needs data.in_memory=true")
        self.on_device = on_device
        self._splits: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # train? -> (x, y)

    def _not_found(self, reason: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"CIFAR-10 not found under '{self.root}' ({reason}): download {CIFAR10_URL} and "
            f"extract it into '{self.root}' (to give '{Path(self.root) / 'cifar-10-batches-py'}'), "
            "or pass --data.root=<directory that holds cifar-10-batches-py>")

    def _dataset(self, train: bool, transform=None):
        """torchvision's CIFAR10 (which checks the md5 of every batch file), without downloading;
        a missing or corrupted file becomes one DataNotFoundError."""
        from torchvision.datasets import CIFAR10
        try:
            return CIFAR10(self.root, train=train, transform=transform, download=False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted ..."
            raise self._not_found("files missing or corrupted") from None

    def prepare_data(self) -> None:
        if not self.download:
            return
        from torchvision.datasets import CIFAR10
        # torchvision's urlopen has no timeout: bound each socket operation so a machine without
        # internet fails in seconds instead of hanging
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:  # returns at once when the files are there and intact
            CIFAR10(self.root, train=True, download=True)
        except Exception as e:  # no network, HTTP error, bad archive, ...
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise self._not_found(f"download failed: {type(e).__name__}: {first_line}") from None
        finally:
            socket.setdefaulttimeout(previous)

    def setup(self, stage: Optional[str] = None) -> None:
        if not self.in_memory:
            return
        for train in (True, False):
            if train not in self._splits:
                self._splits[train] = self._load_tensors(train)

    def _load_tensors(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._dataset(train)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255)  # NHWC uint8 -> NCHW
        if self.normalize:
            x = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(
                1, 3, 1, 1)
        return x.contiguous(), torch.tensor(ds.targets, dtype=torch.long)

    def _crop_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        fill = [-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)] if self.normalize else None
        return random_crop_flip(x, generator, padding=4, fill=fill)

    def _torchvision_transform(self, train: bool):
        from torchvision import transforms as T
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if (
            train and self.augment) else []
        steps.append(T.ToTensor())
        if self.normalize:
            steps.append(T.Normalize(CIFAR10_MEAN, CIFAR10_STD))
        return T.Compose(steps)

    def _loader(self, train: bool):
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.in_memory:
            self.setup()
            return TensorLoader(_resident(self, self._splits[train]), batch_size, shuffle=train,
                                seed=self.seed,
                                **(_replicas(self) if train else {}),
                                transform=self._crop_flip if (train and self.augment) else None)
        return torch.utils.data.DataLoader(
            self._dataset(train, self._torchvision_transform(train)), batch_size=batch_size,
            shuffle=train, num_workers=self.num_workers,
            generator=_generator(self.seed) if train else None,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader(train=True)

    def val_dataloader(self):
        return self._loader(train=False)

    def test_dataloader(self):
        return self._loader(train=False)


# -- scikit-learn digits -----------------------------------------------------------------------
class DigitsData(L.LightningDataModule):
    """scikit-learn's 8x8 digits (1797 images, ships with scikit-learn, no download): a stratified
    80/20 train/test split fixed by `seed`, pixels scaled to [0, 1] and then standardized with the
    mean and std of the training pixels. Validation and test use the held-out 20%.

    Args:
        batch_size: training batch size.
        seed: the train/test split and the shuffling.
        image_size: side of the images the model sees. 8 keeps the digits as they are; a larger
            size upscales them (`upscale` interpolation) before standardizing. 32 with
            channels=3 gives a CIFAR-shaped stand-in on which VGG-16 has the paper's geometry: five
            2x2 pools take 32x32 down to 1x1. On 8x8 the VGG skips its last two pools and its
            last convs run on 1x1 maps, where a 3x3 kernel has one live tap in nine.
        channels: 1 (gray) or 3 (the gray image repeated, like a colour image).
        upscale: interpolation for image_size > 8: "bilinear" (smooth strokes) or "nearest"
            (blocky copies of the 8x8 pixels).
        on_device: hold the set on the training device, as CIFAR10Data's.
    """

    num_classes = 10
    SIZE = 8  # the images as scikit-learn ships them
    UPSCALE_MODES = ("bilinear", "nearest")

    def __init__(self, batch_size: int = 64, seed: int = 0, image_size: int = 8, channels: int = 1,
                 upscale: str = "bilinear", on_device: bool = False):
        super().__init__()
        _check_positive("data.batch_size", batch_size)
        if image_size < self.SIZE:
            raise ValueError(f"data.image_size must be >= {self.SIZE} (the digits are "
                             f"{self.SIZE}x{self.SIZE}); got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3; got {channels}")
        if upscale not in self.UPSCALE_MODES:
            raise ValueError(f"data.upscale must be one of {', '.join(self.UPSCALE_MODES)}; "
                             f"got {upscale!r}")
        self.save_hyperparameters()
        self.batch_size, self.seed, self.on_device = batch_size, seed, on_device
        self.image_size, self.in_channels, self.upscale = image_size, channels, upscale
        self.train_set: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.test_set: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _resize(self, x: np.ndarray) -> torch.Tensor:
        """(N, 8, 8) in [0, 1] -> (N, channels, image_size, image_size)."""
        t = torch.from_numpy(x).unsqueeze(1)
        if self.image_size != self.SIZE:
            size = (self.image_size, self.image_size)
            t = (torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
                 if self.upscale == "bilinear" else
                 torch.nn.functional.interpolate(t, size=size, mode="nearest"))
        return t.expand(-1, self.in_channels, -1, -1).contiguous()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
        x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.2,
                                                  stratify=digits.target, random_state=self.seed)
        x_tr, x_te = self._resize(x_tr), self._resize(x_te)
        mean, std = x_tr.numpy().mean(), x_tr.numpy().std()  # numpy: population std, as before
        as_tensors = lambda x_, y_: ((x_ - float(mean)) / float(std), torch.from_numpy(y_).long())
        self.train_set, self.test_set = as_tensors(x_tr, y_tr), as_tensors(x_te, y_te)

    def train_dataloader(self):
        self.setup()
        return TensorLoader(_resident(self, self.train_set), self.batch_size, shuffle=True,
                            seed=self.seed, **_replicas(self))

    def val_dataloader(self):
        self.setup()
        return TensorLoader(_resident(self, self.test_set), len(self.test_set[0]))

    def test_dataloader(self):
        return self.val_dataloader()


# -- the deep linear network's regression data -------------------------------------------------
class GaussianRegressionData(L.LightningDataModule):
    """y = A x with A (dim x dim) i.i.d. N(0, 1) and x ~ N(0, I) (or uniform on [-sqrt 3, sqrt 3]^dim,
    also mean 0 and covariance I); rows of X are samples, Y = X A^T. A then X are drawn from one
    generator seeded with `seed`, so the same seed gives the same A and X. Training is full-batch:
    the train loader yields the whole set `steps_per_epoch` times per epoch. Validation and test:
    `num_samples` fresh samples of the same A from a second generator stream, one batch.
    `on_device`: hold the set on the training device, as CIFAR10Data's."""

    def __init__(self, dim: int = 10, num_samples: int = 1000, seed: int = 0,
                 x_dist: Literal["normal", "uniform"] = "normal", steps_per_epoch: int = 100,
                 on_device: bool = False):
        super().__init__()
        _check_positive("data.dim", dim)
        _check_positive("data.num_samples", num_samples)
        _check_positive("data.steps_per_epoch", steps_per_epoch)
        if x_dist not in ("normal", "uniform"):
            raise ValueError(f"data.x_dist must be 'normal' or 'uniform'; got {x_dist!r}")
        self.save_hyperparameters()
        self.dim, self.num_samples, self.seed = dim, num_samples, seed
        self.x_dist, self.steps_per_epoch, self.on_device = x_dist, steps_per_epoch, on_device
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(dim, dim, generator=g)
        self.X = self._sample_x(g)
        self.Y = self.X @ self.A.T
        self.X_test = self._sample_x(_generator(seed, 1))
        self.Y_test = self.X_test @ self.A.T

    def _sample_x(self, g: torch.Generator) -> torch.Tensor:
        if self.x_dist == "normal":
            return torch.randn(self.num_samples, self.dim, generator=g)
        return (torch.rand(self.num_samples, self.dim, generator=g) * 2 - 1) * 3 ** 0.5

    def train_dataloader(self):
        return FullBatchLoader(_resident(self, (self.X, self.Y)), self.steps_per_epoch,
                               **_replicas(self))

    def val_dataloader(self):
        return TensorLoader(_resident(self, (self.X_test, self.Y_test)), self.num_samples)

    def test_dataloader(self):
        return self.val_dataloader()
