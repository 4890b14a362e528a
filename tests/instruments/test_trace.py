"""The forward trace (bnstudy/instruments/trace.py): layer numbers and names, the parameters a
selection names (the Hessian blocks), and which models are a chain of leaf modules (the fast ICS
path)."""
from __future__ import annotations

import pytest

from bnstudy import probes
from bnstudy.instruments.trace import Trace
from cases import CASES, conv_bn, trained_step


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


def test_parameter_selections_name_what_the_docs_say():
    model, _, x, _ = conv_bn()  # Conv, BN, ReLU, Conv, BN, ReLU, Flatten, Linear
    names = probes.parameter_names
    assert names(model, x) == [n for n, _ in model.named_parameters()]
    assert names(model, x, [1]) == ["0.weight", "0.bias"]  # layer 1: the first conv
    assert names(model, x, [3, 1]) == ["0.weight", "0.bias", "7.weight", "7.bias"]
    assert names(model, x, ["1"]) == ["1.weight", "1.bias"]  # a module path: its BN
    assert names(model, x, ["3.weight", 2]) == ["3.weight", "3.bias"]
    assert names(model, x, 2) == ["3.weight", "3.bias"]
    with pytest.raises(ValueError, match="layer number 4 out of range 1..3"):
        names(model, x, [4])
    with pytest.raises(ValueError, match="'nope' is neither a layer number"):
        names(model, x, ["nope"])
    with pytest.raises(ValueError, match="'2' selects no trainable parameter"):
        names(model, x, ["2"])  # the ReLU
    model[0].bias.requires_grad_(False)
    assert names(model, x, [1]) == ["0.weight"]
