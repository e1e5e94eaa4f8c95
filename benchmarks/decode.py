"""What decoding a folder of photograph-size JPEGs costs: ours (``byol.core.image_folder``: JPEG decoded at a
reduced scale where that still covers ``data.image_size``, then the centred square resized) against the full
decode and the same resize (what the cache held before, version v2), in one run on the same files.

The files are made here: smooth random images of 500 x 375 (about ImageNet's typical size), saved as JPEG
quality 90. Both contenders decode every file on one thread (the folder loader runs a thread per core: the
ratio is the same). Prints images/s per contender and size, and ours / full.

Usage: ``python benchmarks/decode.py [--images 200] [--sizes 32 64 96 224]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's byol, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_name  # noqa: E402  (the machine's name, as every benchmark prints it)

from byol.core.image_folder import _decode  # noqa: E402


def make_files(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        a = np.cumsum(np.cumsum(rng.normal(size=(375, 500, 3)), 0), 1)
        a = ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
        files.append(folder / f"{i}.jpg")
        Image.fromarray(a).save(files[-1], quality=90)
    return files


def full_decode(path: Path, size: int) -> np.ndarray:
    """The previous decoder: every pixel decoded, the short side resized to ``size``, the centre cropped."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def rate(decode, files: list[Path], size: int) -> float:
    start = time.perf_counter()
    for f in files:
        decode(f, size)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 224])
    args = parser.parse_args()
    print(f"machine: {cpu_name()}; {args.images} JPEGs of 500x375, one thread", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.images)
        for size in args.sizes:
            ours = rate(lambda f, s: _decode(f, s, skip_bad=False), files, size)
            full = rate(full_decode, files, size)
            print(f"size {size:>3}: ours {ours:7.0f} images/s, full decode {full:7.0f} images/s, "
                  f"ours / full {ours / full:.2f}x", flush=True)


if __name__ == "__main__":
    main()
