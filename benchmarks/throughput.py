"""Side-by-side BYOL pretraining throughput on one machine, in one run.

Times, on the same CIFAR-10 JPEGs, the same torchvision ResNet-18 (same stem), the same batch
size and the same precision (bf16 autocast + channels_last; ``--peer-precision fp32`` runs the peers as
their examples do), in images per second:

* ``ours``: this project's real training step end to end, driven by a Lightning ``Trainer``
  (``byol.lightning.pretrain_module.BYOLModule.training_step`` + LARS + EMA in ``optimizer_step``), with the data as a
  uint8 tensor on the device (``byol.core.data``), batches by index and both views augmented on the
  device (``byol.core.augment``). Lightning's own per-step overhead is included.
* ``lightly``: lightly 1.6's BYOL set up as its example does: ``BYOLTransform`` (PIL transforms)
  on a torchvision ``ImageFolder``, a ``DataLoader`` with one worker per CPU core, its BYOL heads,
  ``NegativeCosineSimilarity``, ``update_momentum`` with a ``cosine_schedule`` momentum.
* ``byol_pytorch``: lucidrains' byol-pytorch 0.9.1 (augmentation on the batch tensor inside its
  module), images from an ``ImageFolder`` through a ``DataLoader`` as in its README.
* ``floor``: the same BYOL network as ``ours`` on random tensors already on the device: no data,
  no augmentation; forward + backward + LARS step + EMA only.

Peers use SGD with momentum (cheaper than our LARS, so the comparison does not favour us), the
paper's head sizes (4096 hidden, 256 out) and ``ImageFolder`` decoding inside the timed loop.
Peers are optional (``pip install -e ".[bench]"``); a missing one is reported and skipped.

Usage: ``python benchmarks/throughput.py [--stem cifar|imagenet|both] [--batch-size 128]
[--steps 20] [--warmup 5] [--repeats 1] [--threads N] [--json FILE]``. With ``--repeats N`` every
contender is measured N times, interleaved (ours, then each peer, then ours again...), and the best
figure kept: on a shared machine the others' load otherwise swings single figures by several times.
``--threads 1`` is steadier on a shared CPU (a second thread waits on cores other jobs hold); the
default leaves torch's own thread count. Without ``--data`` the shared archive
``../shared/data/cifar10-jpeg.tar.gz`` is extracted once into ``~/.cache/byol/cifar10-jpeg``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
# The archive sits beside the checkout on development machines and inside it on the GPU machine.
ARCHIVE_CANDIDATES = (REPO.parent / "shared" / "data" / ARCHIVE_NAME, REPO / "shared" / "data" / ARCHIVE_NAME)
DEFAULT_CACHE = "~/.cache/byol/cifar10-jpeg"
PEERS = ("ours", "lightly", "byol_pytorch", "floor", "floor_fp32", "ours_ddp")
DEFAULT_PEERS = PEERS[:4]  # floor_fp32 only on request: it costs 3x a bf16 measurement
STEMS = ("cifar", "imagenet")
PEER_LR = 0.06  # lightly's example learning rate; the value does not change the speed


# --------------------------------------------------------------------------- data


def find_archive(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else list(ARCHIVE_CANDIDATES)
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(f"error: CIFAR-10 archive not found (looked at {', '.join(map(str, candidates))}); "
                     f"pass --data DIR (DIR/train/<class>/*.jpg) or --archive FILE")


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract once into ``dest``; a partial extraction (interrupted run) is redone, never used."""
    done = dest / ".complete"
    if done.exists():
        return dest
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"[bench] extracting {archive} -> {dest} (once)", flush=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(partial, filter="data")
        else:  # Python < 3.11.4: no extraction filters
            tar.extractall(partial)  # noqa: S202 - our own archive
    (partial / ".complete").write_text(f"{archive}\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def resolve_data(args) -> Path:
    """The dataset root (holding ``train/<class>/*``)."""
    if args.data:
        root = Path(args.data).expanduser()
    else:
        root = extract_archive(find_archive(args.archive), Path(args.cache).expanduser())
    if not (root / "train").is_dir():
        raise SystemExit(f"error: {root}/train does not exist; --data must hold train/<class>/*.jpg")
    return root


def count_images(folder: Path) -> int:
    from byol.core.folder_scan import IMAGE_EXTENSIONS

    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def infinite(loader) -> Iterator:
    """Batches of a DataLoader, starting a new pass (new shuffle, workers) when one ends."""
    while True:
        yield from loader


# --------------------------------------------------------------------------- timing


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], warmup: int, steps: int, batch: int, device) -> float:
    """images/s over ``steps`` whole steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def memory_format(bf16: bool) -> torch.memory_format:
    return torch.channels_last if bf16 else torch.contiguous_format


def to_device(x: torch.Tensor, device, bf16: bool = True) -> torch.Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=memory_format(bf16))


# --------------------------------------------------------------------------- our configuration


def compose_config(data_root: Path, stem: str, batch_size: int, compile_model: bool, overrides) -> dict:
    """The default training config (conf/train.yaml) for this stem and batch, as a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=imagefolder", f"data.root={data_root}", f"data.batch_size={batch_size}",
            f"backbone.stem={stem}", f"compile={str(compile_model).lower()}", *overrides])
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("logger", None)  # its save_dir needs a Hydra run; the benchmark logs nothing
    if raw["trainer"]["precision"] == "auto":  # ours runs in the floor's precision (--set trainer.precision=...)
        raw["trainer"]["precision"] = "bf16-mixed"
    return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)


def our_optimizer(cfg: dict, model):
    """The configured optimizer exactly as ``BYOLModule.configure_optimizers`` builds it."""
    from byol.core.optim import build_optimizer, param_groups

    o = cfg["optim"]
    lr = o["base_lr"] * (cfg["data"]["batch_size"] / 256 if o.get("scale_lr_with_batch", True) else 1.0)
    modules = [model.online_encoder, model.online_projectors, model.predictors]
    return build_optimizer(o["name"], param_groups(modules, o["weight_decay"]), lr, o.get("optimizer"))


def peer_backbone(cfg: dict) -> torch.nn.Module:
    """The same torchvision ResNet (name, stem, width) as ours, returning pooled features (N, D)."""
    from byol.core.backbone import build_resnet

    backbone = cfg["backbone"]
    return build_resnet(backbone["name"], backbone["stem"], backbone.get("width", 1.0))


def feature_dim(backbone: torch.nn.Module, image_size: int) -> int:
    """D of a backbone's (N, D) features, read from one forward pass (as byol-pytorch finds its own).

    Why not a constant: D is 512 x width for ResNet-18/34 but 2048 x width for ResNet-50, so a
    projection head sized 512 fails at width 0.25 (128) or on ResNet-50."""
    was_training = backbone.training
    backbone.eval()  # no BatchNorm statistics touched by the probe
    try:
        with torch.no_grad():
            param = next(backbone.parameters())
            x = torch.zeros(1, 3, image_size, image_size, device=param.device)
            return backbone(x).flatten(start_dim=1).shape[1]
    finally:
        backbone.train(was_training)


# --------------------------------------------------------------------------- (a) ours


def bare_trainer(cfg: dict, device, max_steps: int, callbacks: list, ddp: bool = False):
    """A Lightning ``Trainer`` that runs ``max_steps`` training steps on ``device`` and nothing else (no
    logger, checkpoints, progress bar or sanity check): the loop around our step that ``ours`` times."""
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        **({"strategy": "ddp", "sync_batchnorm": device.type == "cuda"} if ddp else {}),  # torch's SyncBN: GPU only
        precision=cfg["trainer"]["precision"], max_steps=max_steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=cfg["trainer"]["log_every_n_steps"], num_sanity_val_steps=0, callbacks=callbacks,
    )


def bench_ours(cfg: dict, args, device, ddp: bool = False) -> float:
    """The real Lightning loop: TensorDataModule + BYOLModule, timed from a callback.

    ``ddp``: the same under Lightning's DDP strategy on one device (world size 1, SyncBatchNorm as
    ``trainer=ddp`` sets it), so the strategy's own cost (its wrapper and gradient all-reduce hooks)
    shows against the plain run. At world size 1 SyncBatchNorm (GPU only in torch) falls back to plain
    BatchNorm and the per-step stop agreement is skipped, as under ``trainer=ddp trainer.devices=1``.
    """
    import pytorch_lightning as pl

    from byol.jobs.pretrain_fit import build_datamodule, build_module

    class StepClock(pl.Callback):
        """Clock read (after a device sync) at the end of optimizer step ``warmup`` and the last one."""

        def __init__(self):
            self.t0 = self.t1 = None

        def _now(self):
            sync(device)
            return time.perf_counter()

        def on_train_start(self, trainer, module):
            if args.warmup == 0:
                self.t0 = self._now()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == args.warmup and self.t0 is None:
                self.t0 = self._now()
            elif trainer.global_step == args.warmup + args.steps:
                self.t1 = self._now()

    start = time.perf_counter()
    datamodule = build_datamodule(cfg)
    n = len(datamodule.batches.data)
    print(f"[bench] ours: {n} images as a uint8 tensor in {time.perf_counter() - start:.1f} s "
          f"(decoded once, then cached; not timed)", flush=True)
    clock = StepClock()
    trainer = bare_trainer(cfg, device, args.warmup + args.steps, [clock], ddp)
    trainer.fit(build_module(cfg), datamodule=datamodule)
    if clock.t0 is None or clock.t1 is None:
        raise RuntimeError("the Lightning run stopped before the timed steps ended (dataset too small?)")
    return args.steps * cfg["data"]["batch_size"] / (clock.t1 - clock.t0)


# --------------------------------------------------------------------------- (d) the floor


def floor_step(cfg: dict, device, bf16: bool = True) -> Callable[[], None]:
    """One step of the floor: our network, optimizer and EMA on random views already on the device."""
    from byol.jobs.build import build_byol

    fmt = memory_format(bf16)
    model = build_byol(cfg).to(device, memory_format=fmt)
    if cfg.get("compile"):
        model.compile()
    optimizer = our_optimizer(cfg, model)
    b, size = cfg["data"]["batch_size"], cfg["data"]["image_size"]
    views = [torch.randn(b, 3, size, size, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    tau = cfg["ema"]["tau_base"]

    def step():
        with autocast(device, bf16):
            loss = model(*views)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(tau)

    return step


def bench_floor(cfg: dict, args, device, bf16: bool = True) -> float:
    """Same network, optimizer and EMA as ours on random views already on the device."""
    return time_steps(floor_step(cfg, device, bf16), args.warmup, args.steps, cfg["data"]["batch_size"], device)


def bench_floor_fp32(cfg: dict, args, device) -> float:
    """The floor in fp32 with contiguous memory: what this machine gives without bf16.

    ``floor / floor_fp32`` bounds ``ours / lightly`` when lightly runs in fp32 as its examples do,
    since no data pipeline can make a step faster than the network alone.
    """
    return bench_floor(cfg, args, device, bf16=False)


# --------------------------------------------------------------------------- (b) lightly


def bench_lightly(cfg: dict, args, device, data_root: Path) -> float:
    """lightly's BYOL example, with our ResNet/stem, the paper's head sizes and bf16."""
    import torchvision
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    h, size, bf16 = cfg["head"], cfg["data"]["image_size"], args.peer_precision == "bf16"
    backbone = peer_backbone(cfg)
    projection_head = BYOLProjectionHead(feature_dim(backbone, size), h["proj_hidden_dim"], h["proj_dim"])
    prediction_head = BYOLPredictionHead(h["proj_dim"], h["pred_hidden_dim"], h["proj_dim"])
    backbone_momentum, projection_head_momentum = copy.deepcopy(backbone), copy.deepcopy(projection_head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(projection_head_momentum)
    modules = torch.nn.ModuleList([backbone, projection_head, prediction_head, backbone_momentum,
                                   projection_head_momentum]).to(device, memory_format=memory_format(bf16))
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD([p for m in modules[:3] for p in m.parameters()], lr=PEER_LR, momentum=0.9)

    # The views as lightly's BYOL example configures them for 32x32 CIFAR images (no blur).
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=0.0),
                              view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=0.0))
    dataset = torchvision.datasets.ImageFolder(str(data_root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["data"]["batch_size"], shuffle=True,
                                         drop_last=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    batches = infinite(loader)
    total = args.warmup + args.steps
    step_no = [0]

    def forward(x):
        return prediction_head(projection_head(backbone(x).flatten(start_dim=1)))

    def forward_momentum(x):
        return projection_head_momentum(backbone_momentum(x).flatten(start_dim=1)).detach()

    def step():
        (x0, x1), _ = next(batches)
        momentum = cosine_schedule(step_no[0], total, 0.996, 1)
        update_momentum(backbone, backbone_momentum, m=momentum)
        update_momentum(projection_head, projection_head_momentum, m=momentum)
        x0, x1 = to_device(x0, device, bf16), to_device(x1, device, bf16)
        with autocast(device, bf16):
            p0, p1 = forward(x0), forward(x1)
            z0, z1 = forward_momentum(x0), forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_no[0] += 1

    return time_steps(step, args.warmup, args.steps, cfg["data"]["batch_size"], device)


# --------------------------------------------------------------------------- (c) byol-pytorch


def bench_byol_pytorch(cfg: dict, args, device, data_root: Path) -> float:
    """lucidrains' BYOL wrapper around our ResNet; it augments the batch tensor itself."""
    import torchvision
    from byol_pytorch import BYOL as LucidrainsBYOL

    h, size, bf16 = cfg["head"], cfg["data"]["image_size"], args.peer_precision == "bf16"
    net = peer_backbone(cfg).to(device, memory_format=memory_format(bf16))
    # Simplicial embeddings (on by default in 0.9.1) would change the projector; the paper's
    # projector (Linear D -> 4096 -> 256, D found by its own forward pass) keeps the network the same as the others.
    learner = LucidrainsBYOL(net, image_size=size, hidden_layer="avgpool", projection_size=h["proj_dim"],
                             projection_hidden_size=h["proj_hidden_dim"], use_simplicial_embeddings=False)
    learner.to(memory_format=memory_format(bf16))
    trainable = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=PEER_LR, momentum=0.9)
    dataset = torchvision.datasets.ImageFolder(str(data_root / "train"),
                                               transform=torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["data"]["batch_size"], shuffle=True,
                                         drop_last=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    batches = infinite(loader)

    def step():
        images, _ = next(batches)
        with autocast(device, bf16):
            loss = learner(to_device(images, device, bf16))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        learner.update_moving_average()

    return time_steps(step, args.warmup, args.steps, cfg["data"]["batch_size"], device)


# --------------------------------------------------------------------------- driver


PEER_MODULES = {"lightly": "lightly", "byol_pytorch": "byol_pytorch"}


def peer_missing(peer: str) -> str | None:
    """Why a peer cannot run ("not installed", or the import error), None when it can."""
    module = PEER_MODULES.get(peer)
    if module is None:
        return None
    import importlib
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        importlib.import_module(module)
    except Exception as e:  # e.g. one of its own dependencies is missing
        return f"not importable ({type(e).__name__}: {e})"
    return None


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (the machine a figure was measured on), not just the architecture."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    cpu = cpu_name()
    import torchvision

    from byol.core.features import cpu_has_bf16_instructions

    return {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_bf16_instructions": cpu_has_bf16_instructions(),  # AMX / AVX512-BF16: bf16 on CPU is 5-9x slower without
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "pytorch_lightning": package_version("pytorch-lightning"),
        "lightly": package_version("lightly"), "byol_pytorch": package_version("byol-pytorch"),
        "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def release_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_ours_ddp(cfg: dict, args, device) -> float:
    return bench_ours(cfg, args, device, ddp=True)


BENCHES = {"ours": bench_ours, "ours_ddp": bench_ours_ddp, "floor": bench_floor, "floor_fp32": bench_floor_fp32,
           "lightly": bench_lightly,
           "byol_pytorch": bench_byol_pytorch}


def run_peer(peer: str, cfg: dict, args, device, data_root: Path) -> tuple[float | None, dict | None]:
    """(images/s, peak GPU memory in GiB or None); a failure is reported, not raised."""
    if device.type == "cuda":
        release_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    if args.threads:  # again before each measurement: nothing a contender set may carry over to the next
        torch.set_num_threads(args.threads)
    try:
        bench = BENCHES[peer]
        ips = bench(cfg, args, device, data_root) if peer in PEER_MODULES else bench(cfg, args, device)
    except Exception as e:  # one broken peer must not lose the others' figures
        print(f"[bench] {peer}: FAILED ({type(e).__name__}: {e})", flush=True)
        return None, None
    finally:
        gc.collect()
    if device.type != "cuda":
        return ips, None
    return ips, {"allocated": torch.cuda.max_memory_allocated(device) / 2**30,
                 "reserved": torch.cuda.max_memory_reserved(device) / 2**30}


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stem", choices=(*STEMS, "both"), default="both")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--data", default=None, help="dataset root with train/<class>/*.jpg "
                   "(default: the shared CIFAR-10 archive, extracted once into --cache)")
    p.add_argument("--archive", default=None,
                   help=f"CIFAR-10 JPEG archive (default: shared/data/{ARCHIVE_NAME} beside or in the repo)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help="where the archive is extracted")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the peers")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS), help="comma-separated subset of "
                   + ",".join(PEERS) + " (floor_fp32: the floor without bf16, the bound on any fp32 peer; "
                   "ours_ddp: ours under Lightning's DDP strategy on one device)")
    p.add_argument("--compile", action="store_true", help="torch.compile our network (ours and floor)")
    p.add_argument("--peer-precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: the peers with bf16 autocast + channels_last like ours (fair); fp32: as their "
                   "examples run them")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every contender this many times, interleaved, and keep the best (the figure "
                   "least disturbed by other processes on a shared machine)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every contender (default: torch's own, usually one per core); "
                   "1 is steadier on a shared machine, where another thread waits on a core others hold")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override of the training config, e.g. --set loss=multi (repeatable)")
    p.add_argument("--json", default=None, help="write the figures (images/s) to this file")
    p.add_argument("--markdown", default=None, help="append the results as a Markdown table to this file")
    p.add_argument("--markdown-from", action="append", default=[], metavar="JSON",
                   help="measure nothing: the Markdown table of a saved --json file (repeatable), appended to "
                   "--markdown or printed; for figures brought back from another machine")
    args = p.parse_args(argv)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        p.error(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2 or args.repeats < 1 \
            or (args.threads is not None and args.threads < 1):
        p.error("need --steps >= 1, --warmup >= 0, --batch-size >= 2, --repeats >= 1 and --threads >= 1")
    return args


def quiet_libraries() -> None:
    # what train.py silences, e.g. ours_ddp's world-size-1 sync_dist notes and Lightning's tips
    from byol.jobs.console import LIGHTNING_LOGGERS, QUIET_WARNINGS

    for name in ("pytorch_lightning", "lightning.pytorch", *LIGHTNING_LOGGERS):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*", *QUIET_WARNINGS):
        warnings.filterwarnings("ignore", pattern)


def set_threads(n: int | None) -> None:
    """Fix torch's CPU threads at ``n`` (None: leave torch's default). OMP_NUM_THREADS is set too, because
    Lightning's DDP launcher (``ours_ddp``) resets the thread count to the cores when that variable is unset."""
    if n:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


def threads_text(args, n: int | None = None) -> str:
    n = torch.get_num_threads() if n is None else n
    return f"{n} torch thread{'' if n == 1 else 's'}" + (" (--threads)" if args.threads else " (torch's default)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.markdown_from:
        lines = [line for path in args.markdown_from for line in markdown_from_json(path)]
        if args.markdown:
            write_markdown(args.markdown, lines)
        else:
            print("\n".join(lines))
        return {}
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
    set_threads(args.threads)
    quiet_libraries()
    device = pick_device(args.device)
    data_root = resolve_data(args)
    report = {"machine": machine_info(device), "n_images": count_images(data_root / "train"),
              "skipped": {p: why for p in args.peers if (why := peer_missing(p))}}
    stems = STEMS if args.stem == "both" else (args.stem,)
    info = report["machine"]
    bf16 = "with" if info["cpu_bf16_instructions"] else "no"
    print(f"[bench] machine: {info['cpu']} ({bf16} bf16 instructions), {info['cpu_cores']} cores "
          f"({threads_text(args)}), torch {info['torch']}, "
          f"torchvision {info['torchvision']}, device {info['device_name']}", flush=True)
    print(f"[bench] data: {data_root}/train ({report['n_images']} images); batch {args.batch_size}; "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats} (interleaved); "
          f"{precision_text(args)}; peer DataLoaders with {args.workers} workers", flush=True)
    print("[bench] ours = pytorch_lightning.Trainer running byol.lightning.pretrain_module.BYOLModule.training_step "
          "(Lightning overhead counted); floor = the same network, LARS and EMA on random device tensors", flush=True)
    for peer, why in report["skipped"].items():
        print(f"[bench] {peer}: {why}; skipped", flush=True)

    listed = [p for p in PEERS if p in DEFAULT_PEERS or p in args.peers]  # the JSON always has the four
    report["images_per_s"] = {stem: dict.fromkeys(listed) for stem in stems}
    report["samples"] = {stem: {p: [] for p in args.peers if p not in report["skipped"]} for stem in stems}
    report["peak_gpu_memory_gib"] = {stem: {} for stem in stems}
    for stem in stems:
        cfg = compose_config(data_root, stem, args.batch_size, args.compile, args.overrides)
        for repeat in range(args.repeats):  # interleaved, so a burst of load elsewhere hits one sample
            for peer, samples in report["samples"][stem].items():
                ips, mem = run_peer(peer, cfg, args, device, data_root)
                if not ips:
                    continue
                samples.append(ips)
                report["images_per_s"][stem][peer] = max(samples)
                if mem:
                    old = report["peak_gpu_memory_gib"][stem].get(peer, mem)
                    report["peak_gpu_memory_gib"][stem][peer] = {k: max(v, old[k]) for k, v in mem.items()}
                extra = f", peak GPU memory {mem['allocated']:.2f} GiB allocated" if mem else ""
                of = f" (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
                print(f"[bench] {stem} stem, {peer}: {ips:.1f} images/s{extra}{of}", flush=True)
        if args.json:  # after each stem, so a run cut short keeps what it measured
            write_json(args, report, data_root)

    print("\n" + "\n".join(text_table(args, report)), flush=True)
    if args.json:
        write_json(args, report, data_root)
        print(f"[bench] wrote {args.json}")
    if args.markdown:
        write_markdown(args.markdown, markdown_table(args, report))
    return report["images_per_s"]


def write_markdown(path: str, lines: list[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"[bench] appended a table to {path}")


def precision_text(args) -> str:
    """How the contenders ran; a ``--set trainer.precision=`` other than bf16 changes ours alone, so it is named."""
    if args.peer_precision == "bf16":
        text = "bf16 autocast + channels_last for all"
    else:
        text = "ours and floor: bf16 autocast + channels_last; peers: fp32, contiguous (as their examples)"
    ours = [o.split("=", 1)[1] for o in args.overrides if o.lstrip("+").startswith("trainer.precision=")]
    if ours and ours[-1] not in ("auto", "bf16-mixed"):
        text += f" (but ours: trainer.precision={ours[-1]})"
    return text


def write_json(args, report: dict, data_root: Path) -> None:
    """``{stem: {peer: images/s}}`` plus ratios, memory, machine and settings beside them."""
    ips = report["images_per_s"]
    out = dict(ips)
    out["ratios"] = {stem: {f"ours/{p}": (v["ours"] / v[p] if v["ours"] and v[p] else None)
                            for p in v if p != "ours"} for stem, v in ips.items()}
    out["seconds_per_epoch"] = {stem: {p: (report["n_images"] / x if x else None) for p, x in v.items()}
                                for stem, v in ips.items()}
    if any(report["peak_gpu_memory_gib"].values()):
        out["peak_gpu_memory_gib"] = report["peak_gpu_memory_gib"]
    out["samples"] = report["samples"]
    out["skipped"] = report["skipped"]
    out["machine"] = report["machine"]
    out["settings"] = {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                       "repeats": args.repeats, "statistic": "best of repeats", "workers": args.workers,
                       "threads": report["machine"]["torch_threads"], "threads_set": args.threads,
                       "precision": precision_text(args),
                       "compile": args.compile, "overrides": args.overrides, "data": str(data_root),
                       "epoch_images": report["n_images"],
                       "ours": "Lightning Trainer + BYOLModule.training_step",
                       "peer_optimizer": "SGD momentum 0.9", "command": " ".join(sys.argv)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def _cell(v: float | None) -> str:
    return f"{v:.1f}" if v else "-"


def text_table(args, report: dict) -> list[str]:
    ips, n = report["images_per_s"], report["n_images"]
    shown = [p for p in PEERS if p in args.peers]
    lines = [f"BYOL pretraining throughput, images/s (higher is better): ResNet-18, batch {args.batch_size}, "
             f"{precision_text(args)}, {report['machine']['device_name']}, {threads_text(args)}",
             f"{'stem':<9}" + "".join(f"{p:>14}" for p in shown)
             + "".join(f"{'ours/' + p:>20}" for p in shown if p != "ours")]
    for stem, v in ips.items():
        lines.append(f"{stem:<9}" + "".join(f"{_cell(v[p]):>14}" for p in shown)
                     + "".join(f"{ratio(v['ours'], v[p]):>20}" for p in shown if p != "ours"))
    for stem, v in ips.items():
        if v.get("floor") and v.get("floor_fp32"):
            lines.append(f"{stem} stem, the network alone in bf16 vs fp32 (floor/floor_fp32): "
                         f"{ratio(v['floor'], v['floor_fp32'])}; no pipeline can put ours further ahead "
                         "of a peer that runs in fp32")
    for stem, v in ips.items():
        epoch = ", ".join(f"{p} {n / x:.1f} s" for p, x in v.items() if x)
        if epoch:
            lines.append(f"{stem} stem, seconds per {n}-image epoch at this rate: {epoch}")
    for stem, mem in report["peak_gpu_memory_gib"].items():
        if mem:
            lines.append(f"{stem} stem, peak GPU memory allocated/reserved (GiB): " + ", ".join(
                f"{p} {m['allocated']:.2f}/{m['reserved']:.2f}" for p, m in mem.items()))
    lines += [f"{peer}: {why}" for peer, why in report["skipped"].items()]
    return lines


def markdown_from_json(path: str) -> list[str]:
    """The table that the run which wrote ``path`` (its --json) appended, or would have, with --markdown."""
    saved = json.loads(Path(path).read_text())
    settings, stems = saved["settings"], [stem for stem in STEMS if stem in saved]
    asked = {p for stem in stems for p in saved["samples"][stem]} | set(saved["skipped"])
    args = argparse.Namespace(
        batch_size=settings["batch_size"], steps=settings["steps"], warmup=settings["warmup"],
        repeats=settings["repeats"], threads=settings.get("threads_set"), peers=[p for p in PEERS if p in asked],
        peer_precision="bf16" if settings["precision"].startswith("bf16 autocast + channels_last for all") else "fp32",
        overrides=settings.get("overrides", []))
    report = {"images_per_s": {stem: saved[stem] for stem in stems}, "n_images": settings["epoch_images"],
              "machine": saved["machine"], "skipped": saved["skipped"],
              "peak_gpu_memory_gib": saved.get("peak_gpu_memory_gib", {})}
    # files written before --threads existed have neither threads setting: torch's default, as the machine says
    threads = settings.get("threads", saved["machine"]["torch_threads"])
    return markdown_table(args, report, settings["command"].split(" ")[1:], threads)


def markdown_table(args, report: dict, argv: list[str] | None = None, threads: int | None = None) -> list[str]:
    """The results as Markdown; ``argv`` (the command's arguments) and ``threads`` default to this process's."""
    ips, n, info = report["images_per_s"], report["n_images"], report["machine"]
    gpu = any(report["peak_gpu_memory_gib"].values())
    command = " ".join(["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["", f"Batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up (best of "
             f"{args.repeats}), {precision_text(args)}, {info['device_name']} ({info['cpu']}, "
             f"{info['cpu_cores']} cores, {threads_text(args, threads)}), torch {info['torch']}: `{command}`", "",
             "| stem | peer | images/s | s/epoch | ours/peer |"
             + (" peak GPU GiB (alloc/reserved) |" if gpu else ""),
             "|---|---|---:|---:|---:|" + ("---:|" if gpu else "")]
    for stem, v in ips.items():
        for p in (p for p in PEERS if p in args.peers):
            x = v[p]
            if p in report["skipped"]:
                row = f"| {stem} | {p} | {report['skipped'][p]} | | |"
            else:
                row = (f"| {stem} | {p} | {_cell(x)} | {f'{n / x:.1f}' if x else '-'} | "
                       f"{'' if p == 'ours' else ratio(v['ours'], x)} |")
            if gpu:
                m = report["peak_gpu_memory_gib"][stem].get(p)
                row += f" {m['allocated']:.2f}/{m['reserved']:.2f} |" if m else " |"
            lines.append(row)
    return lines


if __name__ == "__main__":
    main()
