"""The fast paths on the CPU: the preset configs/fast.yaml (data held on the device, bf16-mixed,
channels_last, torch.compile) in real fits: exact resume, instruments that leave the trajectory
bit for bit unchanged and measure what the eager model measures. (The lazy divergence check is
in tests/callbacks/test_divergence_guard.py.)"""
from __future__ import annotations

import shutil

import pytest
import torch

from lightning.pytorch.callbacks import Callback

from bnstudy import lightning_cli
from bnstudy.cli import cli_main
from bnstudy.lightning_cli import STEP_HOOKS
from conftest import REPO
from tiny_fits import assert_identical, assert_same_metrics, last, read_metrics, tiny_args

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# torch.compile on the CPU generates C++: it needs a compiler
HAVE_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="torch.compile on CPU needs a C++ compiler")

QUICK = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.width=0.125",
         "--data.batch_size=16", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.log_every_n_steps=1"]
FAST = ["--config", str(REPO / "configs" / "fast.yaml")]
NO_INSTRUMENTS = ["--trainer.callbacks=[]"]


def step_zero(rows: list[dict]) -> dict[str, float]:
    """Every value logged at step 0 (the CSV spreads one step over several rows)."""
    return {k: float(v) for r in rows if r["step"] == "0" for k, v in r.items() if v}


def weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow
@needs_cxx
def test_fast_preset_resumes_exactly_and_instruments_change_nothing(in_tmp, monkeypatch):
    """configs/fast.yaml on the quickstart (bf16-mixed, channels_last, compiled, data held on the
    device): 6 steps with the instruments (they measure at steps 0, 1, 2, 4) end with the same
    weights, BN buffers and noise, bit for bit, as 3 + 3 resumed steps without them."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_main(["fit", *QUICK, *FAST, "--trainer.max_steps=6", "--run_dir=with"])
    model = cli.model
    assert model.compiles_training_forward and model._compiled is not None
    assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.on_device
    conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    cli_main(["fit", *QUICK, *FAST, *NO_INSTRUMENTS, "--trainer.max_steps=3", "--run_dir=parts"])
    cli = cli_main(["fit", *QUICK, *FAST, *NO_INSTRUMENTS, "--trainer.max_steps=6",
                    "--run_dir=parts"])
    assert cli.trainer.global_step == 6
    a, b = weights(in_tmp / "with"), weights(in_tmp / "parts")
    assert a.keys() == b.keys()
    for key in a:
        assert_identical(a[key], b[key], key)
    rows = read_metrics(in_tmp / "with")
    steps = {int(r["step"]) for r in rows if r.get("act/layer02/mean")}
    assert steps == {0, 1, 2, 4}  # recorded in the probe's own eager forward
    for key in ("landscape/beta_eff", "ics/l2/layer03", "act/layer07/var"):
        assert torch.isfinite(torch.tensor(last(rows, key)))


@pytest.mark.slow
@needs_cxx
def test_an_epoch_s_short_last_batch_runs_eagerly_without_a_recompile(in_tmp, monkeypatch):
    """The digits' 1,437 training images in batches of 1,000: steps 0 and 2 are full batches,
    step 1 the short rest (437). The compiled forward serves the full ones; the short one runs
    the same module eagerly, so dynamo compiles the net once (a new shape would recompile it:
    20 s on an H200, and new CUDA graphs). A run resumed at the short batch runs it eagerly too
    and ends with the same weights, bit for bit."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("WANDB_MODE", "disabled")
    fit = [*QUICK, *NO_INSTRUMENTS, "--data.batch_size=1000", "--model.compile=true"]
    graphs = []
    for steps, run_dir in ((3, "whole"), (1, "parts"), (3, "parts")):
        torch._dynamo.reset()
        counters.clear()
        cli = cli_main(["fit", *fit, f"--trainer.max_steps={steps}", f"--run_dir={run_dir}"])
        assert cli.trainer.global_step == steps and cli.model._compiled_rows == 1000
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1]  # the resumed run: its first batch is the short one
    a, b = weights(in_tmp / "whole"), weights(in_tmp / "parts")
    for key in a:
        assert_identical(a[key], b[key], key)
    losses = [float(r["train/loss"]) for r in read_metrics(in_tmp / "whole") if r.get("train/loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


# Probe values of the fast path (compiled training forward, channels_last, data on the device)
# against the eager path: same model, weights, batch and precision (fp32), at step 0. Only the
# training forward and backward differ (inductor's kernels vs eager ones), hence the gradient the
# probes reuse: measured 3e-5 relative at most (a near-zero cosine), 1e-7 absolute on activation
# means of ~1e-9. Tolerance: 1e-4 relative, 1e-6 absolute. (In bf16-mixed the two paths' backward
# passes round differently: measured up to 3.5% on gradient-based values, and near-zero ICS
# cosines differ by up to 0.06; losses and activations agreed exactly.)
RTOL, ATOL = 1e-4, 1e-6


@pytest.mark.slow
@needs_cxx
def test_fast_path_probes_agree_with_the_eager_path(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    one = ["--trainer.max_steps=1"]
    cli_main(["fit", *QUICK, *one, "--run_dir=eager"])
    cli_main(["fit", *QUICK, *one, "--model.compile=true", "--model.channels_last=true",
              "--data.on_device=true", "--run_dir=fast"])
    eager, fast = (step_zero(read_metrics(in_tmp / d)) for d in ("eager", "fast"))
    compared = 0
    for key, want in eager.items():
        if key.startswith(("landscape/", "ics/", "act/", "train/loss")):
            assert fast[key] == pytest.approx(want, rel=RTOL, abs=ATOL), key
            compared += 1
    assert compared >= 30




# channels_last alone and bf16-mixed against fp32 NCHW on the mini VGG's input shape (3x32x32),
# same weights and batch, at step 0. Measured (2026-12-02, this CPU, one thread): channels_last
# <= 9e-6 relative on every value away from zero (near-zero activation means and ICS cosines:
# 5e-7 absolute; activation quantiles 1.4e-4 relative, an ICS cosine of 0.009 5e-6); bf16-mixed (the probes run under the same autocast as the step): training
# loss 1e-3, beta_eff and the gradient differences 2%, the loss along the gradient step 8.4%,
# ICS distances 5%, near-zero cosines 6e-3 absolute, activation quantiles up to 0.031 (of
# unit-scale activations: bf16 rounds the activations themselves).
AGREE = {  # key prefix: (rel, abs) per variant
    "channels_last": {"": (1e-4, 1e-6), "act/": (1e-3, 1e-4), "ics/cos": (0, 1e-4)},
    "bf16": {"train/loss": (5e-3, 0), "landscape/loss_w": (5e-3, 0),
             "landscape/beta": (5e-2, 0), "landscape/grad_diff": (5e-2, 0),
             "landscape/loss": (0.15, 0), "ics/l2": (0.1, 0), "ics/rel": (0.1, 0),
             "ics/cos": (0, 0.02), "act/": (5e-2, 0.05)},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant, extra", [
    ("channels_last", ["--model.channels_last=true"]),
    ("bf16", ["--trainer.precision=bf16-mixed", "--model.channels_last=true"])])
def test_probes_agree_with_fp32_nchw_on_the_same_weights(in_tmp, monkeypatch, variant, extra):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = [*QUICK, "--data.image_size=32", "--data.channels=3", "--trainer.max_steps=1"]
    cli_main(["fit", *base, "--run_dir=ref"])
    cli_main(["fit", *base, *extra, "--run_dir=variant"])
    ref, got = (step_zero(read_metrics(in_tmp / d)) for d in ("ref", "variant"))
    compared = 0
    for key, want in ref.items():
        tol = next((t for prefix, t in sorted(AGREE[variant].items(), key=lambda kv: -len(kv[0]))
                    if key.startswith(prefix)), None)
        if tol is None or not key.startswith(("landscape/", "ics/", "act/", "train/loss")):
            continue
        assert got[key] == pytest.approx(want, rel=tol[0], abs=tol[1]), key
        compared += 1
    assert compared >= 30


def test_empty_step_hooks_are_hidden_and_the_fit_is_unchanged(in_tmp, monkeypatch):
    """StudyCLI hides from Lightning the per-step hooks that are Callback's own no-op; a hook a
    callback defines still runs (the instruments' probes are in metrics.csv), and the same fit
    with every hook left in place logs the same values and ends with the same weights."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["fit", *tiny_args("dln.yaml"), "--trainer.max_steps=4"]
    cli = cli_main([*args, "--run_dir=hidden"])
    hidden = 0
    for callback in cli.trainer.callbacks:
        for name in STEP_HOOKS:
            inherited = getattr(type(callback), name) is getattr(Callback, name)
            assert (getattr(callback, name) is None) == inherited, (type(callback), name)
            hidden += inherited
    assert hidden >= 20  # about 80 in a default fit; a tiny one still has a dozen callbacks
    monkeypatch.setattr(lightning_cli, "skip_empty_step_hooks", lambda callbacks: None)
    cli = cli_main([*args, "--run_dir=kept"])
    assert all(callable(getattr(cb, name)) for cb in cli.trainer.callbacks for name in STEP_HOOKS)
    assert assert_same_metrics(in_tmp / "hidden", in_tmp / "kept") > 100
    assert last(read_metrics(in_tmp / "hidden"), "landscape/beta_eff") is not None
    a, b = weights(in_tmp / "hidden"), weights(in_tmp / "kept")
    for key in a:
        assert_identical(a[key], b[key], key)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["--model.optimizer=sgd", "--model.optimizer=adamw",
                                       "--model.optimizer=rmsprop"])
def test_the_multi_tensor_optimizer_step_trains_as_the_loop_over_tensors(in_tmp, monkeypatch,
                                                                         optimizer):
    """The fit's optimizers take torch's multi-tensor step (modules.FOREACH): a DLN with BN
    trained by it (with momentum and weight decay) ends with the same weights, bit for bit, as
    with the per-tensor loop torch uses on a CPU by default, and logs the same values."""
    from bnstudy import modules

    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["fit", *tiny_args("dln_bn.yaml"), "--trainer.max_steps=12", "--model.momentum=0.9",
            "--model.weight_decay=0.01", optimizer, "--trainer.callbacks=[]"]
    cli = cli_main([*args, "--run_dir=foreach"])
    assert cli.trainer.optimizers[0].defaults["foreach"] is True
    monkeypatch.setattr(modules, "FOREACH", None)  # torch's default: the loop on a CPU
    cli = cli_main([*args, "--run_dir=loop"])
    assert cli.trainer.optimizers[0].defaults["foreach"] is None
    assert assert_same_metrics(in_tmp / "foreach", in_tmp / "loop") > 10
    a, b = weights(in_tmp / "foreach"), weights(in_tmp / "loop")
    for key in a:
        assert_identical(a[key], b[key], key)
