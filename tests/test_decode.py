"""Decoding one image file: the centred square resized to data.image_size, from a bounded amount of memory."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from byol.core.errors import DataError
from byol.core.image_folder import _decode, load_image_folder


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (JPEG-friendly, like a photograph)."""
    rng = np.random.default_rng(seed)
    a = np.cumsum(np.cumsum(rng.normal(size=(h, w, 3)), 0), 1)
    return ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


def reference(im: Image.Image, size: int) -> np.ndarray:
    """The centred square of the fully decoded image, resized in float: what a decode should approximate."""
    a = np.asarray(im.convert("RGB"), dtype=np.float32)
    h, w = a.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(a[top:top + side, left:left + side].mean(2), "F")  # one channel is enough
    return np.asarray(square.resize((size, size), Image.BILINEAR))


def test_a_long_thin_image_is_read_through_its_centre_square_without_enlarging_it_whole(tmp_path, monkeypatch):
    """A 100,000 x 2 PNG (a few hundred bytes): resizing its short side to 32 first would make a 1.6-million-pixel
    wide image (a 1,000,000 x 1 file: 32 million, 6 GB of memory measured); only the square is resized."""
    a = np.zeros((2, 100_000, 3), np.uint8)
    a[:, 50_000 - 1:50_000 + 1] = (255, 0, 0)  # the centre square is red, the rest black
    path = tmp_path / "thin.png"
    Image.fromarray(a).save(path)
    sizes = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    out = _decode(path, 32, skip_bad=False)
    assert out.shape == (3, 32, 32)
    assert max(w * h for w, h in sizes) <= 32 * 32
    assert out[0, :, 8:24].min() > 200 and out[1:].max() < 40  # the centre's red (its edges blend with the black)


@pytest.mark.parametrize(("h", "w"), [(48, 64), (64, 48), (30, 90)])
def test_the_centre_square_of_a_non_square_image_is_kept(tmp_path, h, w):
    im = Image.fromarray(photo(h, w))
    im.save(tmp_path / "a.png")
    out = _decode(tmp_path / "a.png", 16, skip_bad=False).astype(np.float32).mean(0)
    assert np.abs(out - reference(im, 16)).mean() < 3.0  # interpolation differs, the content does not
    flipped = reference(im.transpose(Image.FLIP_LEFT_RIGHT), 16)  # an off-centre crop would be closer to this
    assert np.abs(out - flipped).mean() > np.abs(out - reference(im, 16)).mean() + 3.0


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    """JPEG's DCT decodes at 1/2..1/8 scale directly (4-7x faster for photo-size files at 32-64 px: see
    benchmarks/decode.py); the result stays close to resizing the full decode."""
    im = Image.fromarray(photo(375, 500))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    (tmp_path / "a.jpg").write_bytes(buf.getvalue())
    with Image.open(tmp_path / "a.jpg") as probe:
        probe.draft("RGB", (32, 32))
        assert probe.size == (63, 47)  # decoded at 1/8 scale: still more than 32 a side
    full = reference(Image.open(io.BytesIO(buf.getvalue())), 32)
    out = _decode(tmp_path / "a.jpg", 32, skip_bad=False).astype(np.float32).mean(0)
    assert np.abs(out - full).mean() < 3.0


def test_a_jpeg_of_the_training_size_is_decoded_exactly(tmp_path):
    """No reduction and no resize for a JPEG already data.image_size a side (CIFAR-10's JPEG copy)."""
    Image.fromarray(photo(32, 32)).save(tmp_path / "a.jpg", quality=90)
    with Image.open(tmp_path / "a.jpg") as im:
        exact = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(_decode(tmp_path / "a.jpg", 32, skip_bad=False), exact)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, expected
def test_an_image_above_pillows_warning_threshold_is_refused_not_decoded(tmp_path, monkeypatch):
    """Pillow only warns between its threshold and twice it (89 to 179 million pixels: gigabytes each, eight
    decoding at once); such a file is refused in one line, or skipped with data.skip_bad_files."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(photo(40, 40)).save(folder / "big.png")  # 1,600 pixels: Pillow itself would only warn
    Image.fromarray(photo(20, 20)).save(folder / "small.png")
    with pytest.raises(DataError, match=r"big.png' is larger than Pillow decodes \(40x40 pixels, more than 1,000\)"):
        load_image_folder(tmp_path / "train", 8, workers=1)
    with pytest.warns(UserWarning, match="skipping unreadable image .*big.png"):
        data = load_image_folder(tmp_path / "train", 8, workers=1, skip_bad_files=True)
    assert len(data) == 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, expected
def test_a_large_jpeg_under_the_threshold_after_reduction_is_decoded(tmp_path, monkeypatch):
    """The threshold applies to what is decoded: a JPEG read at 1/8 scale counts at that size."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    Image.fromarray(photo(64, 64)).save(tmp_path / "a.jpg", quality=90)  # 4,096 pixels, 64 at 1/8 scale
    assert _decode(Path(tmp_path / "a.jpg"), 8, skip_bad=False).shape == (3, 8, 8)
