"""What per-image augmentation costs: our device augmentation (``byol.core.augment``, every image its own
crop, colour order and factors) against torchvision's functional ops on the same batch tensor with one set
of parameters for the whole batch (what applying torchvision's transforms to a batch does), in one run.

Prints milliseconds per batch for each part and for a whole view, and ours / torchvision. The colour
jitter's four ops run in each image's own order; torchvision's are timed in one fixed order.

Equal work: torchvision's ops below jitter every image, so ours is timed with the colour jitter drawn for
every image too (``--jitter-p 1``, the default here). At training's 0.8 our hue rotation runs, on a CPU,
only on the ~80% of images drawn for jitter, which would favour ours in the "colour jitter" and "whole
view" rows; ``--jitter-p 0.8`` times that (the printed note then says the rows are not equal work).

Usage: ``python benchmarks/augment.py [--batch-size 256] [--size 32] [--repeats 20] [--jitter-p 1]
[--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's byol, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_name  # noqa: E402  (the machine's name, as every benchmark prints it)

from byol.core import augment as A  # noqa: E402


def best_ms(fn, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` calls, in ms (after one warm-up call): the figure least disturbed by load."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--jitter-p", type=float, default=1.0,
                        help="our colour jitter's probability; 1 (default): every image, as torchvision's ops here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    n, size = args.batch_size, args.size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=gen, device=device)
    view = A.ViewConfig(crop_scale=(0.08, 1.0), jitter_p=args.jitter_p, grayscale_p=0.2, solarize_p=0.2)
    params = A.sample_view_params(n, view, gen, device)
    ours = {
        "draw the parameters": lambda: A.sample_view_params(n, view, gen, device),
        "crop + flip": lambda: A.crop_and_flip(x, params["crop"], params["flip"], size),
        "hue": lambda: A.adjust_hue(x, params["hue"]),
        "colour jitter (4 ops)": lambda: A.color_jitter(x, params),
        "whole view": lambda: A.apply_view(x, params, view, size),
    }

    def torchvision_crop_flip(images):
        return TF.horizontal_flip(TF.resized_crop(images, 4, 4, size - 8, size - 8, [size, size], antialias=False))

    def torchvision_jitter(images):
        images = TF.adjust_brightness(images, 1.2)
        images = TF.adjust_contrast(images, 0.8)
        images = TF.adjust_saturation(images, 1.1)
        return TF.adjust_hue(images, 0.05)

    def torchvision_view():
        images = torchvision_jitter(torchvision_crop_flip(x))
        return TF.solarize(TF.rgb_to_grayscale(images, num_output_channels=3), 0.5)

    theirs = {
        "draw the parameters": None,
        "crop + flip": lambda: torchvision_crop_flip(x),
        "hue": lambda: TF.adjust_hue(x, 0.05),
        "colour jitter (4 ops)": lambda: torchvision_jitter(x),
        "whole view": torchvision_view,
    }
    threads = torch.get_num_threads()
    print(f"[augment] {n} images of {size}x{size} on {device} ({cpu_name()}, "
          f"{threads} threads, torch {torch.__version__}); best of {args.repeats}, ms per batch")
    if args.jitter_p == 1:
        print("[augment] equal work: colour jitter on every image for both (ours: --jitter-p 1)")
    else:
        print(f"[augment] NOT equal work: our colour jitter on ~{args.jitter_p:.0%} of the images (--jitter-p), "
              "torchvision's on all; the 'colour jitter' and 'whole view' rows favour ours")
    print(f"{'part':24s} {'ours, per image':>16s} {'torchvision, per batch':>24s} {'ours / torchvision':>20s}")
    for part, fn in ours.items():
        mine = best_ms(fn, args.repeats, device)
        other = best_ms(theirs[part], args.repeats, device) if theirs[part] else None
        ratio = f"{mine / other:.2f}x" if other else "-"
        print(f"{part:24s} {mine:16.2f} {other if other is not None else float('nan'):24.2f} {ratio:>20s}")


if __name__ == "__main__":
    main()
