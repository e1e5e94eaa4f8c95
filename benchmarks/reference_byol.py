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

Settings: ``--experiment`` (default cpu) and ``--set key=value`` overrides for train.yaml (as on
train.py's command line), e.g. the GPU recipe's parts one at a time on the CPU recipe: ``--set optim=lars
--set optim.base_lr=...``, ``--set ema.tau_schedule=cosine``; or the GPU recipe itself on a GPU:
``--experiment cifar10 --device cuda --workers 14``. Optimizers: sgd, and lars written here from You et
al. (2017) with solo-learn's ``clip_lr`` (biases and normalisation parameters excluded); EMA: constant
or cosine tau. Blur is not applied (the recipe's 'auto' has none at 32 px).
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


def settings(overrides: list[str], experiment: str = "cpu") -> dict:
    """train.yaml composed with ``experiment`` and the overrides, as plain data."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "data=imagefolder", "data.root=unused",
                                          *overrides])
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


class Lars(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor, gradient plus weight decay, is scaled by its
    trust ratio eta ||w|| / (||g|| + wd ||w||); with ``clip``, by min(ratio / lr, 1), so the tensor moves
    at min(ratio, lr). Groups marked ``plain`` (biases, normalisation) get SGD without decay or ratio."""

    def __init__(self, groups, lr, momentum, eta, clip):
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "eta": eta, "clip": clip,
                                  "plain": False})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                update = w.grad.clone()
                if not group["plain"]:
                    w_norm, g_norm = w.norm(), w.grad.norm()
                    if w_norm > 0 and g_norm > 0:
                        ratio = group["eta"] * w_norm / (g_norm + group["weight_decay"] * w_norm)
                        if group["clip"]:
                            ratio = torch.clamp(ratio / group["lr"], max=1.0)
                        update = (update + group["weight_decay"] * w) * ratio  # a zero norm: the plain gradient
                velocity = self.state[w].get("velocity")
                velocity = update if velocity is None else velocity.mul_(group["momentum"]).add_(update)
                self.state[w]["velocity"] = velocity
                w.sub_(group["lr"] * velocity)


def optimizer_for(cfg: dict, params: list, peak: float) -> torch.optim.Optimizer:
    """The recipe's optimizer; weight decay (and for lars the trust ratio) only on weights of 2+ dimensions."""
    opt = cfg["optim"]
    weights, plain = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    kwargs = opt["optimizer"]
    if opt["name"] == "sgd":
        return torch.optim.SGD([{"params": weights, "weight_decay": opt["weight_decay"]},
                                {"params": plain, "weight_decay": 0.0}], lr=peak, momentum=kwargs["momentum"])
    return Lars([{"params": weights, "weight_decay": opt["weight_decay"]}, {"params": plain, "plain": True}],
                lr=peak, momentum=kwargs["momentum"], eta=kwargs["eta"], clip=bool(kwargs.get("clip_lr")))


def tau_for(step: int, total: int, base: float, schedule: str) -> float:
    """constant: base; cosine: from base at the first step to 1 at the last (the paper's schedule)."""
    if schedule == "constant":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * min(step / max(1, total - 1), 1.0)) + 1) / 2


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
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (a smoke test)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop at the end of the epoch after which another would pass this many seconds of "
                             "training (a lent machine's time limit); encoder.pt records the epochs done")
    parser.add_argument("--experiment", default="cpu", help="the recipe (conf/experiment): cpu (default), cifar10")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = settings([f"seed={args.seed}", *args.overrides], args.experiment)
    if cfg["optim"]["name"] not in ("sgd", "lars"):
        parser.error(f"optim {cfg['optim']['name']!r}: this loop implements sgd and lars only")
    if cfg["ema"]["tau_schedule"] not in ("constant", "cosine"):
        parser.error(f"ema.tau_schedule {cfg['ema']['tau_schedule']!r}: this loop implements constant and cosine")
    device = torch.device(args.device)
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
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(args.seed))

    bb = cfg["backbone"]
    # the grids only pool the blocks that repr=combined reads; evaluate.py takes them from the export, as from our runs
    encoder = Encoder(bb["name"], bb["stem"], grids=bb["grids"], width=bb["width"])
    online = Online(encoder, cfg["head"]["proj_hidden_dim"], cfg["head"]["proj_dim"])
    predictor = head(cfg["head"]["proj_dim"], cfg["head"]["pred_hidden_dim"], cfg["head"]["proj_dim"])
    target = copy.deepcopy(online).requires_grad_(False)
    for m in (online, predictor, target):
        m.to(device, memory_format=torch.channels_last)

    params = [p for m in (online, predictor) for p in m.parameters()]
    opt_cfg = cfg["optim"]
    peak = opt_cfg["base_lr"] * (batch / 256 if opt_cfg["scale_lr_with_batch"] else 1)
    optimizer = optimizer_for(cfg, params, peak)
    per_epoch = len(loader)
    epochs = cfg["trainer"]["max_epochs"]
    total = per_epoch * (cfg["schedule_epochs"] or epochs)
    warmup = round(opt_cfg["scheduler"]["warmup_epochs"] * per_epoch)
    tau_base, tau_schedule = cfg["ema"]["tau_base"], cfg["ema"]["tau_schedule"]
    from byol.jobs.build import precision_here  # auto: what train.py chooses on this machine

    bf16 = precision_here(cfg["trainer"]) == "bf16-mixed"
    print(f"[reference] {len(dataset)} images, batch {batch}, {per_epoch} steps an epoch, {epochs} epochs "
          f"of a {total}-step schedule, {opt_cfg['name']} lr {peak}, tau {tau_base} {tau_schedule}, bf16 {bf16}, "
          f"torch threads {torch.get_num_threads()}, "
          f"{args.workers} workers, {device}", flush=True)

    (out / "log.csv").write_text("epoch,step,loss,seconds\n")
    step, start = 0, time.time()
    for epoch in range(epochs):
        online.train(), predictor.train(), target.train()
        epoch_start, losses = time.time(), []
        for (v1, v2), _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, peak, warmup, total)
            v1 = v1.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            v2 = v2.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                z1, z2 = online(v1), online(v2)
                p1, p2 = predictor(z1), predictor(z2)
                with torch.no_grad():
                    t1, t2 = target(v1), target(v2)
            loss = pair_loss(p1, t2) + pair_loss(p2, t1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tau = tau_for(step, total, tau_base, tau_schedule)
            with torch.no_grad():
                for t, o in zip(target.parameters(), online.parameters(), strict=True):
                    t.lerp_(o, 1 - tau)
                for t, o in zip(target.buffers(), online.buffers(), strict=True):
                    t.copy_(o)
            losses.append(loss.detach())
            step += 1
            if step % 50 == 0:
                print(f"[reference] epoch {epoch + 1} step {step}: loss {torch.stack(losses[-50:]).mean():.3f}",
                      flush=True)
            if args.max_steps and step >= args.max_steps:
                break
        seconds = time.time() - epoch_start
        mean = torch.stack(losses).mean().item()
        with (out / "log.csv").open("a") as log:  # a line an epoch, readable while the run goes on
            log.write(f"{epoch + 1},{step},{mean:.5f},{seconds:.1f}\n")
        print(f"[reference] epoch {epoch + 1}/{epochs}: loss {mean:.4f}, {seconds:.0f} s", flush=True)
        if args.max_steps and step >= args.max_steps:
            break
        if args.max_seconds and epoch + 1 < epochs and time.time() - start + seconds > args.max_seconds:
            print(f"[reference] stopped after {epoch + 1} of {epochs} epochs: another would pass --max-seconds "
                  f"{args.max_seconds:g}", flush=True)
            break
    save_encoder(online.encoder, out / "encoder.pt",
                 meta={"loss": "classic", "epochs": epoch + 1, "global_step": step, "seed": args.seed,
                       "reference": "benchmarks/reference_byol.py"})
    print(f"[reference] wrote {out / 'encoder.pt'} after {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
