"""StepProgressBar (bnstudy/callbacks/step_progress_bar.py): a step-limited fit counts steps."""
from __future__ import annotations

import re

import pytest

from tiny_fits import ENV, TINY, bnstudy

pytestmark = pytest.mark.slow


def test_step_limited_progress_bar_counts_steps(tmp_path):
    proc = bnstudy("fit", *TINY, "--trainer.max_steps=12", f"--run_dir={tmp_path / 'run'}",
                   env={**ENV, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"Step\s.*12/12", proc.stdout), proc.stdout[-2000:]
    assert "/-2" not in proc.stdout and "Epoch" not in proc.stdout
    assert "Tip" not in proc.stdout + proc.stderr  # no third-party promotion
