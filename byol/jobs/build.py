"""Objects built from the config by name: the encoder and BYOL model, the Lightning Trainer, the loggers.

Classes come from fixed tables, never from a ``_target_`` in the config: a config may come from
a checkpoint someone else wrote (:mod:`byol.jobs.config_check`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from byol.core.backbone import AVGPOOL, Encoder
from byol.core.errors import ConfigError
from byol.core.model import BYOL
from byol.core.state_check import whole
from byol.jobs.config_check import LOGGER_NAMES, TRAINER_RESERVED, trainer_parameters


def architecture(backbone: Mapping) -> dict:
    """``name``, ``stem``, ``width`` and ``grids`` of a ``backbone`` config: what rebuilds the same
    network with other taps (a run's weights fit any tap set of its architecture). Configs written
    before ``backbone.width`` existed are width 1.0."""
    return {"name": backbone["name"], "stem": backbone["stem"], "width": float(backbone.get("width", 1.0)),
            "grids": dict(backbone.get("grids") or {})}


def encoder_from_backbone(backbone: Mapping, taps) -> Encoder:
    """The encoder a ``backbone`` config describes, exposing ``taps``: the one place that reads that node."""
    arch = architecture(backbone)
    return Encoder(arch["name"], arch["stem"], list(taps), arch["grids"], arch["width"])


def build_encoder(cfg: dict, taps=None) -> Encoder:
    """The encoder described by a run's ``backbone`` config, exposing ``taps`` (default: the loss's)."""
    return encoder_from_backbone(cfg["backbone"], taps if taps is not None else cfg["loss"]["taps"])


def loss_mode(loss: Mapping) -> str:
    """``classic`` (one head on avgpool) or ``multi`` (extra heads on ``loss.taps``): the taps say it."""
    return "multi" if [t for t in loss.get("taps") or [] if t != AVGPOOL] else "classic"


def build_byol(cfg: dict, extra_taps=()) -> BYOL:
    """The BYOL networks of a run; ``extra_taps``: encoder taps read besides the heads' (monitors)."""
    heads = [AVGPOOL] + [t for t in cfg["loss"]["taps"] if t != AVGPOOL]
    sizes = cfg["head"]
    encoder = build_encoder(cfg, taps=list(dict.fromkeys([*cfg["loss"]["taps"], *extra_taps])))
    return BYOL(encoder, heads, cfg["loss"].get("weights") or {}, sizes["proj_hidden_dim"],
                sizes["proj_dim"], sizes["pred_hidden_dim"])


# logger name -> (module, class, pyproject extra); metrics.csv is always written besides.
LOGGERS = {
    "tensorboard": ("pytorch_lightning.loggers", "TensorBoardLogger", "tensorboard"),
    "wandb": ("pytorch_lightning.loggers", "WandbLogger", "wandb"),
}


def _logger_kwargs(name: str, options: Mapping, run_dir: Path) -> dict:
    if name == "tensorboard":
        return {"save_dir": str(run_dir), "name": "tb", "version": ""}
    return {"project": options.get("project", "byol"), "save_dir": str(run_dir),
            "offline": bool(options.get("offline", True))}


# the packages each logger needs, any one of them (Lightning's TensorBoardLogger also takes tensorboardX)
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _chosen_logger(logger_cfg: Mapping | None) -> str:
    """The logger ``logger_cfg`` names besides metrics.csv (``csv``: none), refused when unknown."""
    name = (logger_cfg or {}).get("name", "csv")
    if name != "csv" and name not in LOGGERS:
        raise ConfigError(f"unknown logger '{name}'; choose one of: {', '.join(LOGGER_NAMES)}")
    return name


def check_logger_package(logger_cfg: Mapping | None) -> None:
    """The logger's package, looked for (not imported) before the data is decoded; :func:`make_loggers`, with
    Lightning loaded, also checks its version."""
    name = _chosen_logger(logger_cfg)
    if name == "csv":
        return
    packages = LOGGER_PACKAGES[name]
    if all(importlib.util.find_spec(package) is None for package in packages):
        raise _logger_missing(name, f"No module named '{packages[0]}'")


def _logger_missing(name: str, reason: str) -> ConfigError:
    _, cls, extra = LOGGERS[name]
    return ConfigError(f"{cls} cannot start ({reason}); pip install -e \".[{extra}]\", or log to metrics.csv only "
                       f"with logger=csv")


def make_loggers(logger_cfg: Mapping | None, run_dir: Path, keep_before_step: int | None = None) -> list:
    """Always metrics.csv in the run folder, plus the logger ``logger_cfg['name']`` names."""
    from byol.lightning.csv_logger import ContinuingCSVLogger

    loggers = [ContinuingCSVLogger(str(run_dir), keep_before_step)]
    name = _chosen_logger(logger_cfg)
    if name == "csv":
        return loggers
    module, cls, _ = LOGGERS[name]
    try:
        logger_class = getattr(importlib.import_module(module), cls)
        loggers.append(logger_class(**_logger_kwargs(name, logger_cfg, run_dir)))
    except (ImportError, ModuleNotFoundError) as e:
        raise _logger_missing(name, str(e).splitlines()[0]) from None
    return loggers


def requested_processes(trainer_cfg: Mapping) -> int:
    """Devices x nodes a trainer config asks for, whatever the strategy, read as Lightning reads ``devices``:
    a count, a list of ids, a string of either ("4", "0,1"); -1 or "auto" is every GPU of this machine on a
    GPU run (one device otherwise). Counted as 1 there, a DDP sweep on all GPUs lost its shared folder."""
    devices, count = _read_devices(trainer_cfg.get("devices")), 1
    if isinstance(devices, list):
        count = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        count = devices
    elif devices in (-1, "auto", None) and on_gpu(trainer_cfg):
        import torch

        count = max(1, torch.cuda.device_count())
    return count * max(1, int(trainer_cfg.get("num_nodes") or 1))


def _read_devices(devices):
    """``trainer.devices`` as Lightning reads a string: "4" a count, "0,1" (or "0,") a list of ids; else as given."""
    if isinstance(devices, str) and "," in devices:
        return [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, str) and re.fullmatch(r"-?[0-9]+", devices.strip()):  # str.isdigit: "²", and "--1"
        return int(devices)
    return devices


def planned_world(trainer_cfg: Mapping) -> int:
    """The number of processes a DDP config asks for (devices x nodes; 1 when ``devices`` is not a count
    or a list), known before the trainer starts them: for the steps of an epoch."""
    return requested_processes(trainer_cfg) if "ddp" in str(trainer_cfg.get("strategy") or "") else 1


def on_gpu(trainer_cfg: Mapping) -> bool:
    """Whether the trainer will run on CUDA devices (``accelerator`` gpu/cuda, or auto with CUDA present)."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def precision_here(trainer_cfg: Mapping) -> str:
    """``trainer.precision`` with ``auto`` made this machine's choice (:func:`byol.core.features.machine_precision`)."""
    import torch

    from byol.core.features import machine_precision

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return machine_precision(trainer_cfg.get("precision"), on_gpu(trainer_cfg), gpu_bf16)


def resolve_precision(config: dict, tag: str) -> None:
    """``trainer.precision=auto`` made this machine's setting in ``config`` (recorded so in the run's files: a
    resume keeps it, and results name what ran); a one-line note when a CPU without bf16 instructions takes
    float32."""
    from byol.jobs.cli import launched_rank

    trainer = config["trainer"]
    if trainer.get("precision") != "auto":
        return
    trainer["precision"] = precision_here(trainer)
    if trainer["precision"] == "32-true" and not on_gpu(trainer) and launched_rank() == 0:
        print(f"{tag} note: trainer.precision=auto is 32-true on this CPU (no AMX or AVX512-BF16 instructions, "
              f"where bf16 runs several times slower)", flush=True)


def note_crowded_cpu(trainer_cfg: Mapping, tag: str) -> None:
    """One line (rank 0) when DDP on CPU starts more processes on this machine than it has cores: each gets a
    fraction of one (a run trained on 8 GPUs resumed on a laptop started 8 processes on its cores)."""
    from byol.jobs.cli import launched_rank

    here = requested_processes({**trainer_cfg, "num_nodes": 1})  # the processes of one node
    cores = os.cpu_count() or 1
    if planned_world(trainer_cfg) > 1 and not on_gpu(trainer_cfg) and here > cores and launched_rank() == 0:
        print(f"{tag} note: trainer.devices={here} starts {here} processes on the {cores} cores of this machine, "
              f"each with a fraction of a core; trainer.devices={cores} (or fewer) runs faster", flush=True)


def trainer_for_this_machine(trainer_cfg: Mapping, tag: str) -> dict:
    """``trainer_cfg`` with ``sync_batchnorm`` off on CPU, where torch's DDP refuses SyncBatchNorm, and float16
    mixed precision as bf16 there (Lightning's own fallback); rank 0 says the first in one line under DDP (each
    process then keeps its own BatchNorm statistics), and notes more CPU processes than cores
    (:func:`note_crowded_cpu`)."""
    from byol.jobs.cli import launched_rank

    note_crowded_cpu(trainer_cfg, tag)
    trainer = dict(trainer_cfg)
    if str(trainer.get("precision")) in ("16-mixed", "16") and not on_gpu(trainer):
        # what Lightning falls back to, with a warning of several lines naming its source file; training's
        # announcement says so in one line
        trainer["precision"] = "bf16-mixed"
    if trainer.get("sync_batchnorm") and not on_gpu(trainer):
        trainer["sync_batchnorm"] = False
        if launched_rank() == 0 and planned_world(trainer) > 1:  # one process has no statistics to share
            print(f"{tag} note: trainer.sync_batchnorm needs GPUs; on CPU each process keeps its own BatchNorm "
                  "statistics (rank 0's buffers are broadcast every step)", flush=True)
    return trainer


# Strategies that start their processes themselves and hand them the job by pickling (ddp_spawn, ddp_fork,
# ddp_notebook): the jobs' closures do not pickle, and a job's data and results live in the process that
# started it. trainer=ddp re-runs the command in each process instead.
SPAWNING_STRATEGIES = ("spawn", "fork", "notebook")


MAX_DEVICES = 4096  # per node: more than any machine has


def check_devices(trainer_cfg: Mapping) -> None:
    """``trainer.devices`` in a form Lightning reads: a count from 1 (-1: every one), ``auto``, or device ids
    (a list, or a string "0,1"). An empty list counted 0 processes (a ZeroDivisionError when the epoch was
    planned), and 10**30 overflowed inside Lightning."""
    devices = trainer_cfg.get("devices")
    read = _read_devices(devices)
    if isinstance(read, list):
        ok = 0 < len(read) <= MAX_DEVICES and all(not isinstance(i, bool) and re.fullmatch(r"[0-9]+", str(i).strip())
                                                  for i in read)
    else:
        ok = read in (None, "auto") or (whole(read, -1) and read != 0 and read <= MAX_DEVICES)
    if not ok:
        raise ConfigError(f"trainer.devices={devices!r} is not a number of devices (1 to {MAX_DEVICES}, -1 for every "
                          f"one, auto) or a list of device ids (trainer.devices=[0,1]); on CPU, devices are processes")
    if str(trainer_cfg.get("accelerator")) == "cpu" and (isinstance(read, list) or read == -1):
        # Lightning's own refusal came once the data was loaded (minutes for a large folder)
        raise ConfigError(f"trainer.devices={devices!r} with trainer.accelerator=cpu: on CPU, devices are a number of "
                          f"processes (trainer.devices=2), not device ids or -1")


def check_strategy(trainer_cfg: Mapping) -> None:
    """Several processes only through the DDP strategy that re-runs the command (``trainer=ddp``): a spawning
    strategy fails to pickle the job, and Lightning's ``auto`` would pick DDP for several devices without the
    SyncBatchNorm and the steps per epoch that ``trainer=ddp`` plans (:func:`planned_world`)."""
    check_devices(trainer_cfg)
    strategy = str(trainer_cfg.get("strategy") or "")
    if any(word in strategy for word in SPAWNING_STRATEGIES):
        raise ConfigError(f"trainer.strategy={strategy} hands the job to processes it starts itself, which this "
                          f"project does not support: run several processes with trainer=ddp "
                          f"(trainer.strategy=ddp), not trainer.strategy={strategy}")
    if requested_processes(trainer_cfg) > 1 and "ddp" not in strategy:
        raise ConfigError("several devices (trainer.devices / trainer.num_nodes) need the DDP strategy: add "
                          "trainer=ddp")


# Variables a person sets by hand to join nodes without a launcher (Lightning's LightningEnvironment reads them)
HAND_SET_NODE_VARIABLES = ("NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
LSF_VARIABLES = ("LSB_JOBID", "LSB_DJOB_RANKFILE", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_SIZE")


def started_by_launcher() -> bool:
    """Whether a launcher started this process as one of the run's, so that Lightning takes the ranks from the
    environment rather than starting its node's other processes itself: what Lightning's cluster environments
    detect (srun outside an interactive allocation, torchrun, jsrun, mpirun with mpi4py, LOCAL_RANK set),
    read here without loading Lightning."""
    env = os.environ
    slurm = "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")) and importlib.util.find_spec("mpi4py")
    return bool(slurm or mpi or all(k in env for k in LSF_VARIABLES) or "TORCHELASTIC_RUN_ID" in env
                or "LOCAL_RANK" in env)


def check_launcher(trainer_cfg: Mapping) -> None:
    """Processes that could never meet are refused in one line: inside a submitit job, devices whose tasks
    submitit did not start (Lightning would re-run submitit's own command: a traceback), and several nodes
    with none of a launcher's variables (rank 0 would wait 30 minutes for nodes that never come)."""
    world = planned_world(trainer_cfg)
    if world == 1:
        return
    here, nodes = requested_processes({**trainer_cfg, "num_nodes": 1}), max(1, int(trainer_cfg.get("num_nodes") or 1))
    executor, tasks = os.environ.get("SUBMITIT_EXECUTOR"), os.environ.get("SLURM_NTASKS_PER_NODE")
    if executor and not (started_by_launcher() and tasks in (None, str(here))):
        asked = f"trainer.devices={here}" + (f" x trainer.num_nodes={nodes}" if nodes > 1 else "")
        on_nodes = f" hydra.launcher.nodes={nodes}" if nodes > 1 else ""
        raise ConfigError(f"{asked} in a submitit_{executor} job: Lightning cannot start the other processes "
                          f"inside it, submitit must start one task per device (on SLURM: "
                          f"hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node={here}{on_nodes}); or run "
                          f"the sweep with Hydra's basic launcher (leave out hydra/launcher=)")
    if nodes > 1 and not started_by_launcher() and not any(k in os.environ for k in HAND_SET_NODE_VARIABLES):
        raise ConfigError(f"trainer.num_nodes={nodes} needs the same command on every node, started by srun or "
                          f"torchrun (or with NODE_RANK, MASTER_ADDR and MASTER_PORT set on each); none is set "
                          f"here, so this process would wait 30 minutes for nodes that never come (README: "
                          f"Scaling out)")


def progress_bar_on(setting) -> bool:
    """``trainer.enable_progress_bar``; null (the default): on when the console is a terminal, off when the
    output goes to a file (a sweep's log, SLURM's output, a pipe), which a redrawn bar would fill."""
    return bool(setting) if setting is not None else sys.stderr.isatty()


# The Trainer arguments that pick hardware and numerics: named in the message when Lightning refuses them.
TRAINER_CHOICES = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def build_trainer(trainer_cfg: Mapping, **fixed):
    """``pytorch_lightning.Trainer`` from plain arguments; ``fixed`` (logger, callbacks...) from the job. How its
    processes start is checked first (:func:`check_strategy`, :func:`check_launcher`): Lightning would fail
    later, in a traceback or a 30-minute wait."""
    import pytorch_lightning as pl

    check_strategy(trainer_cfg)
    check_launcher(trainer_cfg)
    kwargs = {}
    for key, value in trainer_cfg.items():
        if key in TRAINER_RESERVED or key not in trainer_parameters():
            raise ConfigError(f"trainer.{key} is not a Trainer argument this project passes on")
        kwargs[key] = value
    if kwargs.get("precision") == "auto":
        kwargs["precision"] = precision_here(trainer_cfg)
    if "enable_progress_bar" in kwargs:
        kwargs["enable_progress_bar"] = progress_bar_on(kwargs["enable_progress_bar"])
    kwargs.update(fixed)
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:  # strategy=foo, accelerator=tpu without torch_xla; devices=-1 on CPU (lightning_fabric's TypeError);
        return pl.Trainer(**kwargs)  # benchmark=abc (torch's RuntimeError)
    except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as e:
        given = ", ".join(f"{k}={v}" for k, v in trainer_cfg.items() if k in TRAINER_CHOICES or k in str(e))
        raise ConfigError(f"Lightning refused the trainer settings ({given}): {e}") from None


# The warm-up takes at most this fraction of a run's optimizer steps: a run shorter than its
# configured warm-up (trainer.max_epochs=1 with LARS's 10 warm-up epochs) would otherwise end at a
# fraction of the peak learning rate and never decay. The default runs (10 of 200 epochs) are below it.
MAX_WARMUP_FRACTION = 0.1


def warmup_steps(warmup_epochs: float, total_steps: int, epochs: int, schedule: str) -> tuple[int, str | None]:
    """The warm-up in optimizer steps, at most :data:`MAX_WARMUP_FRACTION` of ``total_steps``, and the
    line that says so when the configured one is longer (None when it is used as written)."""
    per_epoch = max(1, total_steps // max(1, epochs))
    configured = int(warmup_epochs * per_epoch)
    cap = int(MAX_WARMUP_FRACTION * total_steps)
    if configured <= cap:
        return configured, None
    instead = f"a warm-up of {cap} step{'s' * (cap != 1)}" if cap else "no warm-up"
    return cap, (f"[byol] optim.scheduler.warmup_epochs={warmup_epochs:g} ({configured} steps) is more than "
                 f"{MAX_WARMUP_FRACTION:.0%} of this run ({epochs} epoch{'s' * (epochs != 1)}, {total_steps} "
                 f"steps), so the schedule cannot run as written: using {instead} instead, then {schedule} "
                 f"over the other {total_steps - cap} steps")


def scaled_lr(optim: Mapping, batch_size: int, accumulate: int = 1, world_size: int = 1) -> float:
    """base_lr x global batch / 256 when ``scale_lr_with_batch`` (else base_lr); the global batch is
    the per-device batch x accumulation x processes (devices x nodes)."""
    batch = batch_size * max(1, accumulate) * max(1, world_size)
    return optim["base_lr"] * (batch / 256 if optim.get("scale_lr_with_batch", True) else 1.0)


def optimizer_factory(optim: Mapping, batch_size: int, accumulate: int = 1):
    """``make(modules, total_steps, epochs, world_size=1) -> (optimizer, scheduler)`` for ``optim`` (the
    config group): lr from :func:`scaled_lr` (the trainer gives the world size); warm-up given in
    epochs, capped by :func:`warmup_steps` (one line says so)."""
    from byol.core.optim import build_optimizer, build_schedule, param_groups
    from byol.jobs.cli import launched_rank

    def make(modules, total_steps: int, epochs: int, world_size: int = 1):
        lr = scaled_lr(optim, batch_size, accumulate, world_size)
        optimizer = build_optimizer(optim["name"], param_groups(modules, optim["weight_decay"]), lr,
                                    optim.get("optimizer"))
        schedule = dict(optim["scheduler"])
        name = schedule.pop("name")
        warmup, capped = warmup_steps(schedule.pop("warmup_epochs", 0), total_steps, epochs, name)
        if capped and launched_rank() == 0:  # under DDP every process builds one; one line says it
            print(capped, flush=True)
        return optimizer, build_schedule(name, optimizer, total_steps, warmup, schedule)

    return make
