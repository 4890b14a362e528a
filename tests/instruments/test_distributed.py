"""DDP: two CPU processes (gloo) get the same numbers on every rank, equal to one process on the
global batch (models without BN), through the plain probes and through a Lightning DDP fit.

One spawn runs both parts (starting processes is the slow part); every wait has a deadline.
"""
from __future__ import annotations

import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from bnstudy import probes
from bnstudy.models import VGG, DeepLinear, init_weights
from cases import spawned

WORLD = 2
DEADLINE_S = 150


def problems() -> dict:
    """Models without BN, mean-reduced losses (the mean of the ranks' means is the global mean,
    as DDP averages gradients), one global batch, and an update W^{t+1}."""
    out = {}
    torch.manual_seed(0)
    vgg = VGG(11, 0.0625, "none", image_size=8)
    init_weights(vgg)
    out["vgg"] = (vgg, F.cross_entropy, torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    dln = DeepLinear(8, 6, "none")
    init_weights(dln)
    x = torch.randn(32, 6)
    out["dln"] = (dln, lambda o, t: F.mse_loss(o, t, reduction="sum") / o.shape[0], x,
                  x @ torch.randn(6, 6))
    for name, (model, loss_fn, x, y) in out.items():
        g = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        after = {n: p.detach() - 0.1 * gi for (n, p), gi in zip(model.named_parameters(), g)}
        out[name] = (model, loss_fn, x, y, after)
    return out


def measure(model, loss_fn, x, y, after) -> dict:
    return {"ics": probes.ics(model, loss_fn, x, y, after),
            "landscape": probes.landscape(model, loss_fn, x, y, [0.05, 0.2]),
            "random": probes.random_landscape(model, loss_fn, x, y, [0.05, 0.2], seed=4),
            "curv": probes.hessian_eigs(model, loss_fn, x, y, k=2, tol=1e-6)["eigenvalues"],
            "trace": probes.hessian_trace(model, loss_fn, x, y, samples=4)["trace"]}


def dln_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g)
    return TensorDataset(x, x @ torch.randn(10, 10, generator=g))


def fit(batch_size: int, rank: int = 0, world: int = 1, fixed_batch: bool = False,
        kept: dict | None = None, **trainer_kw):
    """A short DLN fit (no BN, the paper's summed loss: DLNModule scales each rank's partial sum
    so DDP's gradient average is the full-batch sum's) with the instruments at every step; the
    Instruments state a checkpoint would carry at the end goes into `kept`."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from bnstudy.instruments import (ICS, ActivationStats, Curvature, Instruments, Landscape,
                                     RandomLandscape)
    from bnstudy.modules import DLNModule

    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    module = DLNModule(depth=6, norm="none", reduction="sum", lr=0.0005, momentum=0.9)
    inst = Instruments([ICS(every=1), Landscape(every=1, lr_multiples=[0.5, 2]),
                        RandomLandscape(every=2, lr_multiples=[1]),
                        ActivationStats(every=2, units=4),
                        Curvature(every=1, tol=1e-6, fixed_batch=fixed_batch)])
    class Keep(Callback):
        def on_train_end(self, trainer, pl_module):  # before the probes' teardown
            if kept is not None:
                kept.update(inst.state_dict())

    trainer = L.Trainer(max_steps=3, accelerator="cpu", callbacks=[inst, Keep()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, **trainer_kw)
    # rank r takes samples r, r + world, ...: the ranks' batches together are the global batch
    # (Lightning's own distributed sampler always shuffles training data)
    data = Subset(dln_data(), range(rank, len(dln_data()), world))
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    return inst.history


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    for name, (model, loss_fn, x, y, after) in problems().items():
        shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        results[name] = measure(model, loss_fn, x[shard], y[shard], after)
    # Lightning joins the process group already there (LOCAL_RANK etc. are set)
    results["fit"] = fit(16, rank, WORLD, strategy="ddp", devices=WORLD,
                         use_distributed_sampler=False)
    # Curvature on the first global batch: each rank keeps its own part of it
    kept = {}
    results["fit_fixed"] = fit(16, rank, WORLD, fixed_batch=True, kept=kept, strategy="ddp",
                               devices=WORLD, use_distributed_sampler=False)
    results["fixed_batches"] = kept["curv"]["batches"]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def assert_close(a, b, rel):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close(a[k], b[k], rel)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9)
    else:
        assert a == b


def assert_ics_close(a, b):
    """ICS's distances between two float32 gradients G and G': ||G - G'|| is known to the
    rounding of ||G||, not of itself (a layer the update barely moves has ||G - G'|| near 3e-5 of
    ||G||, and DDP's sum of the ranks' parts rounds otherwise than one process's sum: 9e-5 of it
    apart was seen), so l2 is compared to 1e-6 of ||G|| and rel to 1e-6, both also to 1e-5 of
    themselves."""
    assert a.keys() == b.keys()
    for layer, v in b.items():
        g_norm = v["l2"] / v["rel"] if v["rel"] else 0.0
        assert a[layer]["l2"] == pytest.approx(v["l2"], rel=1e-5, abs=1e-6 * g_norm), layer
        assert a[layer]["rel"] == pytest.approx(v["rel"], rel=1e-5, abs=1e-6), layer
        assert a[layer]["cos"] == pytest.approx(v["cos"], rel=1e-5, abs=1e-9), layer


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S + 30)
def test_probes_agree_across_ranks_and_with_one_process(tmp_path):
    ranks = spawned(worker, tmp_path, WORLD, DEADLINE_S)
    fixed_batches = [r.pop("fixed_batches") for r in ranks]  # tensors: compared below

    # the same numbers on every rank, bit for bit (but the wall times; and Lanczos' residual and
    # product count, which rounding may move by an iteration between DDP and one process)
    skip = ("time/", "curv/residual", "curv/hvps")
    drop_times = lambda h: [(s, {k: v for k, v in m.items() if not k.startswith(skip)})  # noqa
                            for s, m in h]
    for r in ranks:
        r["fit"], r["fit_fixed"] = drop_times(r["fit"]), drop_times(r["fit_fixed"])
    assert ranks[0] == ranks[1]
    # equal to one process on the global batch
    for name, (model, loss_fn, x, y, after) in problems().items():
        single = measure(model, loss_fn, x, y, after)
        ours = dict(ranks[0][name])
        assert_ics_close(ours.pop("ics"), single["ics"])
        assert_close(ours, {k: v for k, v in single.items() if k != "ics"}, rel=1e-5)
        assert max(v["l2"] for v in single["ics"].values()) > 0
    # a Lightning DDP fit (per-rank batch 16) against one process with the global batch 32
    history = ranks[0]["fit"]
    assert [s for s, _ in history] == [0, 1, 2]
    # keys name the paper's layer numbers (6 layers), not module paths
    assert {k for k in history[0][1] if k.startswith(("ics/", "act/"))} == (
        {f"ics/{m}/layer0{i}" for m in ("l2", "rel", "cos") for i in range(1, 7)}
        | {f"act/layer0{i}/{s}" for i in range(1, 7)
           for s in ("mean", "var", "q05", "q25", "q50", "q75", "q95")})  # no dmean at step 0
    assert history[0][1]["curv/lambda_max"] > 0
    assert_close(history, drop_times(fit(32)), rel=1e-4)
    fixed = ranks[0]["fit_fixed"]
    assert_close(fixed, drop_times(fit(32, fixed_batch=True)), rel=1e-4)
    assert fixed[0][1]["curv/lambda_max"] == history[0][1]["curv/lambda_max"]  # step 0: one batch
    assert fixed[1][1]["curv/lambda_max"] != pytest.approx(history[1][1]["curv/lambda_max"],
                                                           rel=1e-3)  # then the step's, not it
    # every rank's state (rank 0's goes in the checkpoint) holds every rank's first batch, so a
    # resume puts each rank back on its own
    x, y = dln_data().tensors
    for batches in fixed_batches:
        assert len(batches) == WORLD
        for k, (bx, by) in enumerate(batches):
            assert torch.equal(bx, x[k::WORLD][:16]) and torch.equal(by, y[k::WORLD][:16])
