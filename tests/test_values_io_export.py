"""The encoder export records the taps it is asked to (not the ones the monitors added), with the weights
unchanged; loading it gives back those taps and weights."""

from __future__ import annotations

import torch

from byol.core.backbone import Encoder
from byol.core.checkpoint import load_encoder, safe_load, save_encoder


def test_an_export_records_the_taps_asked_for_and_the_same_weights(tmp_path):
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "cifar", ["layer2.0", "layer3.0"], {"layer2.0": 2}, width=0.25)
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, meta={"loss": "multi"}, taps=["layer2.0"])  # layer3.0: a monitor's tap only
    blob = safe_load(path)
    assert blob["backbone"] == {"name": "resnet18", "stem": "cifar", "width": 0.25, "taps": ["layer2.0"],
                                "grids": {"layer2.0": 2}}
    assert encoder.config["taps"] == ["layer2.0", "layer3.0"]  # the live encoder is left as it was
    loaded, meta = load_encoder(path)
    assert loaded.taps == ["avgpool", "layer2.0"] and meta == {"loss": "multi"}
    for name, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    save_encoder(encoder, path)  # default: the encoder's own taps
    assert safe_load(path)["backbone"]["taps"] == ["layer2.0", "layer3.0"]
