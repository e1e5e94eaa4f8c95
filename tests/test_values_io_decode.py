"""Decoding an image folder: a non-square image keeps its centre (short side to the size, then a centred
square), exact pixels where no resampling is needed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from byol.core.image_folder import _decoded, load_image_folder
from byol.core.progress import Progress


def test_a_non_square_image_is_cropped_to_its_centre(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # 8 high, 12 wide: short side already 8
    tall = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(wide).save(tmp_path / "a" / "0_wide.png")
    Image.fromarray(tall).save(tmp_path / "a" / "1_tall.png")
    data = load_image_folder(tmp_path, 8, workers=1)
    assert data.images.shape == (2, 3, 8, 8)
    assert torch.equal(data.images[0], torch.from_numpy(wide[:, 2:10]).permute(2, 0, 1))
    assert torch.equal(data.images[1], torch.from_numpy(tall[2:10, :]).permute(2, 0, 1))


class FakeClock:
    def __init__(self, *times: float):
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_a_long_decode_says_how_far_it_is_and_a_short_one_says_nothing(capsys):
    """A large folder decodes for hours, once: a line at most every 30 s with the count, the rate and the
    time left, and the total time at the end; a decode shorter than that prints nothing of it."""
    progress = Progress(100_000, every=30, clock=FakeClock(0, 10, 40, 50, 100, 5400))
    for done in (4_096, 20_000, 25_000, 50_000, 100_000):  # at 10, 40, 50, 100 s and 90 min
        progress.update(done)
    assert capsys.readouterr().out.splitlines() == [
        "[data] decoding: 20,000 of 100,000 images (20%), 500 images/s, about 3 min left",
        "[data] decoding: 50,000 of 100,000 images (50%), 500 images/s, about 2 min left",
        "[data] decoding done: 100,000 images in 1.5 h (19 images/s)"]
    quick = Progress(10_000, every=30, clock=FakeClock(0, 5, 12))
    quick.update(5_000)
    quick.update(10_000)
    assert capsys.readouterr().out == ""


def test_decoding_reports_after_every_chunk_in_order(tmp_path):
    (tmp_path / "a").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    files = []
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "a" / f"{i}.png")
        files.append(tmp_path / "a" / f"{i}.png")

    class Recorder:
        seen: list[int] = []

        def update(self, done: int) -> None:
            self.seen.append(done)

    recorder = Recorder()
    arrays = list(_decoded(files, 4, False, workers=2, chunk=2, progress=recorder))
    assert recorder.seen == [2, 4, 5]
    assert all(np.array_equal(a, image.transpose(2, 0, 1)) for a, image in zip(arrays, pixels, strict=True))


def test_a_long_feature_extraction_says_how_far_it_is(monkeypatch, capsys):
    """kNN, cached linear probes and t-SNE maps embed whole splits first: minutes of silence on a CPU for
    CIFAR-10 (about 320 images/s with ResNet-18 here). A line every 30 s, as decoding does; the values unchanged."""
    from types import SimpleNamespace

    import byol.core.progress as progress
    from byol.core.backbone import Encoder
    from byol.core.features import extract_features

    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    encoder = Encoder("resnet18", "cifar", [], width=0.125)
    quiet = extract_features(encoder, images, ["avgpool"], [0.5] * 3, [0.25] * 3, batch_size=10)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=FakeClock(0, 10, 35, 50, 100)))
    slow = extract_features(encoder, images, ["avgpool"], [0.5] * 3, [0.25] * 3, batch_size=10)
    assert capsys.readouterr().out.splitlines() == [
        "[features] embedding: 20 of 40 images (50%), 1 images/s, about 35 s left",
        "[features] embedding done: 40 images in 2 min (0 images/s)"]
    assert torch.equal(slow, quiet)
