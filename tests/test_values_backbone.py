"""Encoder taps against the torchvision blocks run by hand, and an export that round-trips BatchNorm statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from byol.core.backbone import CentreTapConv2d, Encoder, build_resnet, guard_strided_convs
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


def _conv(stride: int, kernel: int = 3, seed: int = 0) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(8, 16, kernel, stride=stride, padding=kernel // 2, bias=False)


def test_a_guarded_convolution_equals_torchs_and_on_a_1x1_input_uses_the_kernel_centre_alone():
    """Same outputs and gradients as torch's convolution (float32), on 1x1 inputs and on larger ones; on a 1x1
    input the taps that meet only padding get a gradient of exactly zero."""
    for stride, kernel, size in ((2, 3, 1), (2, 3, 2), (2, 3, 5), (2, 1, 1), (3, 5, 1), (2, 5, 3)):
        plain = _conv(stride, kernel)
        guarded = _conv(stride, kernel)
        guard_strided_convs(guarded)
        assert type(guarded) is CentreTapConv2d and guarded.state_dict().keys() == plain.state_dict().keys()
        x = torch.randn(4, 8, size, size, generator=torch.Generator().manual_seed(size))
        outputs = [conv(x) for conv in (plain, guarded)]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
        for out in outputs:
            (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        torch.testing.assert_close(guarded.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-6)
        if size == 1:
            off_centre = guarded.weight.grad.clone()
            off_centre[:, :, kernel // 2, kernel // 2] = 0
            assert torch.count_nonzero(off_centre) == 0
    unstrided, padded_otherwise = _conv(1), torch.nn.Conv2d(8, 16, 3, stride=2, padding=0)
    guard_strided_convs(unstrided)
    guard_strided_convs(padded_otherwise)
    assert type(unstrided) is type(padded_otherwise) is torch.nn.Conv2d  # left to the library


def test_bfloat16_training_at_16_pixels_with_the_imagenet_stem_gets_finite_exact_zero_padding_gradients():
    """ResNet-18's layer4 sees 1x1 inputs at 16 px (ImageNet stem). torch's CPU bfloat16 backward of a stride-2
    3x3 convolution of a 1x1 input returned uninitialised memory (up to 1e37, often NaN) as the weight gradient
    of the padding-only taps on an AMD EPYC (44 of 50 trials): ended runs and made identical runs differ. The
    encoder's strided convolutions compute such inputs with the kernel centre."""
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "imagenet", width=0.25)
    conv = encoder.body.get_submodule("layer4.0.conv1")
    assert type(conv) is CentreTapConv2d
    for trial in range(10):
        encoder.zero_grad()
        x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(trial))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = encoder(x)["avgpool"].float().square().mean()
        loss.backward()
        grad = conv.weight.grad.clone()
        assert torch.isfinite(grad).all() and grad[:, :, 1, 1].abs().sum() > 0
        grad[:, :, 1, 1] = 0
        assert torch.count_nonzero(grad) == 0, f"trial {trial}: padding taps got a gradient"
