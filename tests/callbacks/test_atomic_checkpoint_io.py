"""AtomicCheckpointIO (bnstudy/callbacks/atomic_checkpoint_io.py): a save that fails (a real
full-disk error) leaves the last good checkpoint intact and no temporary file."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from tiny_fits import ENV, TINY, fit, one_error_line

pytestmark = pytest.mark.slow


FILL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from bnstudy.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_failed_checkpoint_save_keeps_the_last_good_checkpoint(quiet):
    run_dir = quiet / "run"
    fit(run_dir, steps=10)
    last = run_dir / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    # resume with files limited to half a checkpoint: the next save fails with a real OSError
    proc = subprocess.run([sys.executable, "-c", FILL_DISK, str(len(good) // 2), "fit", *TINY,
                           "--trainer.max_steps=20", f"--run_dir={run_dir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    line = one_error_line(proc.stderr)
    # the first save of the resumed run: step 20's, at the end of its validation (best or last)
    assert proc.returncode == 2 and "File too large" in line
    assert re.search(r"cannot write \S+/(last|best-step=20)\.ckpt", line), line
    assert last.read_bytes() == good  # intact, and no temporary file left
    assert sorted(p.name for p in last.parent.iterdir() if "tmp" in p.name) == []
    assert torch.load(last, weights_only=True)["global_step"] == 10
