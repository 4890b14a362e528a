"""The fast paths on the CPU: the preset configs/fast.yaml (data held on the device, bf16-mixed,
channels_last, torch.compile) in real fits: exact resume, instruments that leave the trajectory
bit for bit unchanged and measure what the eager model measures; the lazy divergence check."""
from __future__ import annotations

import shutil

import pytest
import torch

from bnstudy.cli import cli_main
from conftest import REPO
from test_cli import assert_identical, last, read_metrics

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


@needs_cxx
def test_fast_preset_resumes_exactly_and_instruments_change_nothing(in_tmp, monkeypatch):
    """configs/fast.yaml on the quickstart: 8 steps with the instruments (they measure at steps
    0, 1, 2, 4), 8 without, and 4 + 4 resumed: the same weights, BN buffers and noise, bit for
    bit; the instruments measured finite values at their steps."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_main(["fit", *QUICK, *FAST, "--trainer.max_steps=8", "--run_dir=with"])
    model = cli.model
    assert model.compiles_training_forward and model._compiled is not None
    assert cli.trainer.precision == "bf16-mixed"
    conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    cli_main(["fit", *QUICK, *FAST, *NO_INSTRUMENTS, "--trainer.max_steps=8", "--run_dir=without"])
    cli_main(["fit", *QUICK, *FAST, *NO_INSTRUMENTS, "--trainer.max_steps=4", "--run_dir=parts"])
    cli = cli_main(["fit", *QUICK, *FAST, *NO_INSTRUMENTS, "--trainer.max_steps=8",
                    "--run_dir=parts"])
    assert cli.trainer.global_step == 8
    a, b, c = weights(in_tmp / "with"), weights(in_tmp / "without"), weights(in_tmp / "parts")
    for key in b:
        assert_identical(a[key], b[key], key)
        assert_identical(c[key], b[key], key)
    rows = read_metrics(in_tmp / "with")
    steps = {int(r["step"]) for r in rows if r.get("act/layer02/mean")}
    assert steps == {0, 1, 2, 4}  # recorded in the probe's own eager forward
    for key in ("landscape/beta_eff", "ics/l2/layer03", "act/layer07/var"):
        assert torch.isfinite(torch.tensor(last(rows, key)))


# Probe values of the compiled (channels_last) path against the eager path: same model, same
# weights, same batch, same precision (bf16-mixed), measured at step 0. Only the training forward
# differs (compiled kernels vs eager ones), hence the gradient the probes reuse, by a few bf16
# roundings: relative 3% (bf16 keeps 8 bits, 2^-8 = 0.4%, over several layers), absolute 1e-3
# for values near zero (activation means after BN).
RTOL, ATOL = 3e-2, 1e-3


@needs_cxx
def test_fast_path_probes_agree_with_the_eager_path(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    one = ["--trainer.max_steps=1", "--trainer.precision=bf16-mixed"]
    cli_main(["fit", *QUICK, *one, "--run_dir=eager"])
    cli_main(["fit", *QUICK, *one, "--model.compile=true", "--model.channels_last=true",
              "--data.on_device=true", "--run_dir=fast"])
    eager, fast = (step_zero(read_metrics(in_tmp / d)) for d in ("eager", "fast"))
    compared = 0
    for key, want in eager.items():
        if key.startswith(("landscape/", "ics/", "act/", "train/loss")) and "/q" not in key:
            assert fast[key] == pytest.approx(want, rel=RTOL, abs=ATOL), key
            compared += 1
    assert compared >= 10


DIVERGE = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.norm=none",
           "--model.lr=1e4", "--model.init=kaiming", "--model.init_scale=3", "--model.width=0.125",
           "--data.batch_size=16", "--trainer.max_steps=40", "--trainer.callbacks=[]",
           "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"]


def test_lazy_divergence_check_logs_the_exact_step(in_tmp, monkeypatch):
    """The GPU's lazy check (exercised here on the CPU): the same diverged_step as the check that
    reads every loss, and a stop exactly `lag` steps later."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sync = cli_main(["fit", *DIVERGE, "--divergence.check=sync", "--run_dir=sync"])
    lazy = cli_main(["fit", *DIVERGE, "--divergence.check=lazy", "--divergence.lag=3",
                     "--run_dir=lazy"])
    step = last(read_metrics(in_tmp / "sync"), "diverged_step")
    assert step < 39 and sync.trainer.global_step == step
    assert last(read_metrics(in_tmp / "lazy"), "diverged_step") == step
    assert lazy.trainer.global_step == step + 3
