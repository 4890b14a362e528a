"""ThroughputAtLogSteps (bnstudy/callbacks/throughput_at_log_steps.py): its counts go on across a
resume. With ActivationStats' change between steps, which also spans a resume."""
from __future__ import annotations

import pytest

from tiny_fits import assert_same_metrics, fit, rows

pytestmark = pytest.mark.slow


def test_a_run_resumed_between_two_probe_steps_logs_what_an_uninterrupted_one_does(quiet):
    """Stopped after step 15 (ActivationStats records step 15 for the change it logs at the due
    step 16) and resumed: every value of metrics.csv is an uninterrupted run's, timings aside.
    So act/*/dmean at step 16 (the moments of step 15 are in the checkpoint), and the throughput
    monitor's train/batches and train/samples, which go on counting instead of starting again."""
    whole, resumed = quiet / "whole", quiet / "resumed"
    fit(whole, "--trainer.log_every_n_steps=1", steps=20)
    fit(resumed, "--trainer.log_every_n_steps=1", steps=16)
    fit(resumed, "--trainer.log_every_n_steps=1", steps=20)
    assert_same_metrics(whole, resumed)
    counted = [r for r in rows(resumed) if r["train/batches"]]
    assert (counted[-1]["train/batches"], counted[-1]["train/samples"]) == ("20", str(20 * 16))
    assert rows(resumed)[16]["step"] == "16" and rows(resumed)[16]["act/layer02/dmean"]
