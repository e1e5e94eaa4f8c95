"""Encoder taps against the torchvision blocks run by hand, and an export that round-trips BatchNorm statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from byol.core.backbone import Encoder, build_resnet
from byol.core.checkpoint import load_encoder, save_encoder


def test_taps_are_the_named_blocks_outputs_pooled_to_their_grids():
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "imagenet", ["layer2.0", "layer3.0"], {"layer2.0": 2}, width=0.125).eval()
    body = build_resnet("resnet18", "imagenet", 0.125).eval()  # torchvision's network, the encoder's weights
    body.load_state_dict(encoder.body.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = encoder(x)
        h = body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x)))))
        block2 = body.layer2[0](h)
        block3 = body.layer3[0](body.layer2[1](block2))
        pooled = body.layer4(body.layer3[1](block3)).mean(dim=(2, 3))
    torch.testing.assert_close(got["layer2.0"], F.adaptive_avg_pool2d(block2, 2).flatten(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["layer3.0"], F.adaptive_avg_pool2d(block3, 1).flatten(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["avgpool"], pooled, rtol=1e-5, atol=1e-6)


def test_export_round_trip_keeps_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "imagenet", ["layer2.0"], width=0.125).train()
    with torch.no_grad():  # running statistics away from their 0 / 1 start
        for _ in range(2):
            encoder(torch.randn(4, 3, 32, 32) * 3 + 1)
    save_encoder(encoder, tmp_path / "encoder.pt")
    loaded, _ = load_encoder(tmp_path / "encoder.pt")
    original = encoder.state_dict()
    assert original["body.bn1.running_mean"].abs().sum() > 0
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = loaded.eval()(x), encoder.eval()(x)
    assert all(torch.equal(got[t], want[t]) for t in want)
