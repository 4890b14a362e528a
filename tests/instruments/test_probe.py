"""What every probe shares (bnstudy/instruments/probe.py): schedules, and the layer keys that let
BN and no-BN runs of one architecture log the same keys per layer number."""
from __future__ import annotations

import pytest
import torch

from bnstudy import probes
from bnstudy.instruments import ICS, ActivationStats, Instruments, Probe
from bnstudy.models import DeepLinear
from cases import LIGHTNING_NOISE, dln_data, dln_module, fit_keys, images, vgg_module

pytestmark = LIGHTNING_NOISE


@pytest.mark.parametrize("model", ["vgg", "dln"])
def test_norm_variants_log_the_same_keys_per_layer_number(model):
    """BN and no-BN runs of one architecture log the same ics/act keys, so their curves of layer i
    overlay in W&B and `bnstudy plot`, although the DLN's module paths differ (layer 2 is layers.2
    with BN, layers.1 without; VGG keeps its paths, the norm slot being an Identity)."""
    make, data, count = ((vgg_module, images, 14) if model == "vgg" else
                         (dln_module, dln_data, 6))
    runs = {norm: fit_keys(make(norm), data()) for norm in ("batch", "none")}
    assert runs["batch"][0] == runs["none"][0]
    numbers = [f"layer{i:02d}" for i in range(1, count + 1)]
    stats = ("mean", "var", "dmean", "dvar", "q05", "q25", "q50", "q75", "q95")
    assert runs["none"][0] == ({f"ics/{m}/{n}" for m in ("l2", "cos") for n in numbers}
                               | {f"act/{n}/{s}" for n in numbers for s in stats})
    for norm, (_, metrics) in runs.items():  # layer01 is the first layer: G' = G
        assert metrics["ics/l2/layer01"] == 0, norm
        assert metrics["ics/cos/layer01"] == pytest.approx(1, abs=1e-12), norm
        assert metrics["ics/l2/layer02"] > 0, norm
    if model == "dln":  # the module paths do differ
        paths = [probes.layer_names(DeepLinear(6, 10, norm), torch.randn(2, 10))[1]
                 for norm in ("batch", "none")]
        assert paths == ["layers.2", "layers.1"]


def test_schedules():
    p = Probe(every=5, log_spaced=True, start=0, stop=40)
    assert [t for t in range(50) if p.due(t)] == [0, 1, 2, 4, 5, 8, 10, 15, 16, 20, 25, 30, 32,
                                                   35]
    assert [t for t in range(12) if Probe(every=4, log_spaced=False, start=2).due(t)] == [2, 6,
                                                                                           10]
    act = ActivationStats(every=10, log_spaced=False)
    assert [t for t in range(25) if act.active(t)] == [0, 9, 10, 19, 20]  # and each t - 1
    with pytest.raises(ValueError):
        Instruments([ICS(), ICS()])
