"""A second, independent BYOL training loop, to check that our pipeline learns as well as a plain one.

Why: the GPU recipe's 100-epoch run scored well below published figures, and the CPU grid cannot say
whether our training code (device-side augmentation, Lightning module, optimizer and EMA wiring)
loses accuracy against a textbook loop at the same settings. This script is that textbook loop:
torchvision's PIL transforms per image in DataLoader workers, heads, loss, EMA, SGD and schedule
written here from the paper, and a bare ``for`` loop. Only the network is shared (the same
``Encoder``, so the architecture is not a difference) and the settings, read from our config
(``experiment=cpu`` by default). It writes ``encoder.pt`` in our export format, so that
``evaluate.py`` scores it exactly as it scores our runs:

    python benchmarks/reference_byol.py --data /tmp/cifar10 --out outputs/reference/seed0 --seed 0
    python evaluate.py -m pretrained=outputs/reference/seed0/encoder.pt data=imagefolder \\
        data.root=/tmp/cifar10 repr=avgpool eval=knn,linear

Settings: ``--set key=value`` overrides for train.yaml (as on train.py's command line). Supported
optimizer: sgd (the CPU recipe's); blur is not applied (the recipe's 'auto' has none at 32 px).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets
from torchvision import transforms as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from byol.core.backbone import Encoder  # noqa: E402
from byol.core.checkpoint import save_encoder  # noqa: E402


def settings(overrides: list[str]) -> dict:
    """train.yaml composed with ``experiment=cpu`` and the overrides, as plain data."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cpu", "data=imagefolder", "data.root=unused", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def view_transform(aug: dict, view: dict, size: int, mean, std) -> T.Compose:
    """torchvision's per-image pipeline with the recipe's values (the usual BYOL view)."""
    a = {**aug, **view}
    steps = [
        T.RandomResizedCrop(size, scale=tuple(a["crop_scale"]), ratio=tuple(a["crop_ratio"])),
        T.RandomHorizontalFlip(a["flip_p"]),
        T.RandomApply([T.ColorJitter(a["brightness"], a["contrast"], a["saturation"], a["hue"])], p=a["jitter_p"]),
        T.RandomGrayscale(a["grayscale_p"]),
    ]
    if a["solarize_p"] > 0:
        steps.append(T.RandomSolarize(threshold=round(255 * a["solarize_threshold"]), p=a["solarize_p"]))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class TwoViews:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image):
        return self.first(image), self.second(image)


def head(in_dim: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


class Online(nn.Module):
    def __init__(self, encoder: Encoder, hidden: int, out: int):
        super().__init__()
        self.encoder = encoder
        self.projector = head(encoder.dims["avgpool"], hidden, out)

    def forward(self, x):
        return self.projector(self.encoder(x)["avgpool"])


def pair_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), batch mean; the target side carries no gradient."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder with train/<class>/*.jpg")
    parser.add_argument("--out", required=True, help="folder for encoder.pt and log.csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the training loop")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a smoke test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = settings([f"seed={args.seed}", *args.overrides])
    if cfg["optim"]["name"] != "sgd":
        parser.error(f"optim {cfg['optim']['name']!r}: this loop implements sgd only")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data, aug = cfg["data"], cfg["augment"]
    size = data["image_size"]
    views = [view_transform(aug, aug.get(f"view{i}") or {}, size, data["mean"], data["std"]) for i in (1, 2)]
    dataset = datasets.ImageFolder(str(Path(args.data) / "train"), transform=TwoViews(*views))
    batch = data["batch_size"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))

    bb = cfg["backbone"]
    # the grids only pool the blocks that repr=combined reads; evaluate.py takes them from the export, as from our runs
    encoder = Encoder(bb["name"], bb["stem"], grids=bb["grids"], width=bb["width"])
    online = Online(encoder, cfg["head"]["proj_hidden_dim"], cfg["head"]["proj_dim"])
    predictor = head(cfg["head"]["proj_dim"], cfg["head"]["pred_hidden_dim"], cfg["head"]["proj_dim"])
    target = copy.deepcopy(online).requires_grad_(False)
    for m in (online, predictor, target):
        m.to(memory_format=torch.channels_last)

    params = [p for m in (online, predictor) for p in m.parameters()]
    opt_cfg = cfg["optim"]
    peak = opt_cfg["base_lr"] * (batch / 256 if opt_cfg["scale_lr_with_batch"] else 1)
    optimizer = torch.optim.SGD([
        {"params": [p for p in params if p.ndim > 1], "weight_decay": opt_cfg["weight_decay"]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ], lr=peak, momentum=opt_cfg["optimizer"]["momentum"])
    per_epoch = len(loader)
    epochs = cfg["trainer"]["max_epochs"]
    total = per_epoch * (cfg["schedule_epochs"] or epochs)
    warmup = round(opt_cfg["scheduler"]["warmup_epochs"] * per_epoch)
    tau = cfg["ema"]["tau_base"]
    if cfg["ema"]["tau_schedule"] != "constant":
        parser.error("this loop implements ema.tau_schedule=constant only (the CPU recipe's)")
    bf16 = cfg["trainer"]["precision"] == "bf16-mixed"
    print(f"[reference] {len(dataset)} images, batch {batch}, {per_epoch} steps an epoch, {epochs} epochs "
          f"of a {total}-step schedule, lr {peak}, tau {tau}, bf16 {bf16}, torch threads {torch.get_num_threads()}, "
          f"{args.workers} workers", flush=True)

    log = (out / "log.csv").open("w")
    log.write("epoch,step,loss,seconds\n")
    step, start = 0, time.time()
    for epoch in range(epochs):
        online.train(), predictor.train(), target.train()
        epoch_start, losses = time.time(), []
        for (v1, v2), _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, peak, warmup, total)
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                z1, z2 = online(v1), online(v2)
                p1, p2 = predictor(z1), predictor(z2)
                with torch.no_grad():
                    t1, t2 = target(v1), target(v2)
            loss = pair_loss(p1, t2) + pair_loss(p2, t1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for t, o in zip(target.parameters(), online.parameters(), strict=True):
                    t.lerp_(o, 1 - tau)
                for t, o in zip(target.buffers(), online.buffers(), strict=True):
                    t.copy_(o)
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                print(f"[reference] epoch {epoch + 1} step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}",
                      flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        seconds = time.time() - epoch_start
        mean = sum(losses) / len(losses)
        log.write(f"{epoch + 1},{step},{mean:.5f},{seconds:.1f}\n")
        log.flush()
        print(f"[reference] epoch {epoch + 1}/{epochs}: loss {mean:.4f}, {seconds:.0f} s", flush=True)
        if args.max_steps and step >= args.max_steps:
            break
    save_encoder(online.encoder, out / "encoder.pt",
                 meta={"loss": "classic", "epochs": epoch + 1, "global_step": step, "seed": args.seed,
                       "reference": "benchmarks/reference_byol.py"})
    print(f"[reference] wrote {out / 'encoder.pt'} after {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
