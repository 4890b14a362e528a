"""The forward trace (bnstudy/instruments/trace.py): layer numbers and names, and which models
are a chain of leaf modules (the fast ICS path)."""
from __future__ import annotations

import pytest

from bnstudy import probes
from bnstudy.instruments.trace import Trace
from cases import CASES, trained_step


@pytest.mark.parametrize("case", ["vgg_noisy_bn", "dln_bn"])
def test_paper_models_take_the_chain_path(case):
    model, _, x, _ = CASES[case]()
    with probes.measuring(model):
        chain = Trace(model, x).chain
    assert chain is not None and sum(isinstance(m, probes.WEIGHT_LAYERS) for m, _ in chain) in (
        14, 25)


def test_layer_selection_by_number_and_name():
    model, loss_fn, x, y, after, _ = trained_step("vgg_bn")
    names = probes.layer_names(model, x)
    assert names[0] == "features.0" and names[-1] == "classifier"
    by_number = probes.ics(model, loss_fn, x, y, after, layers=[5, 10])
    assert list(by_number) == [names[4], names[9]]
    assert by_number == probes.ics(model, loss_fn, x, y, after, layers=[names[9], names[4]])
    with pytest.raises(ValueError):
        probes.ics(model, loss_fn, x, y, after, layers=[15])
    with pytest.raises(ValueError):
        probes.ics(model, loss_fn, x, y, after, layers=["features.1"])  # a BN, not a layer
