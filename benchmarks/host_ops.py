"""Operators our training step issues per optimizer step, against the floor (the network alone), by part.

Why count them: on an H100/H200 a BYOL step on 32x32 images is bound by the host, not the GPU. Each
operator the step dispatches costs the CPU some microseconds (Python, the dispatcher, a kernel launch)
whether it moves 4 KB or 4 MB, and at batch 256 those microseconds add up to more than the GPU's
arithmetic: on the H200 of benchmarks/RESULTS.md the floor's 893 operators a step took 24.4 ms at
batch 256 and 29 ms at batch 512, ours (about twice as many) 50 and 43 ms. Operator counts do not
depend on the device or on the load, so they can be measured here, on a CPU, for a GPU.

Counted: top-level ATen operators (those not called from inside another operator: the ones the
Python code dispatches) over ``--steps`` optimizer steps of the real Lightning loop (as
``benchmarks/throughput.py``'s ``ours``), and of the floor (same network, LARS, EMA on ready
tensors), attributed to the innermost project or Lightning source file on the Python stack; the
backward pass's own operators are counted apart. Host synchronisations (``item``, ``nonzero``,
``torch.tensor`` of a Python value: operators that make the CPU wait for the GPU) are counted too.

Contenders: ``run`` (the training step in train.py's trainer: online probes, checkpoint and signal
hooks, learning-rate monitor, metrics.csv), ``ours`` (the step alone in a bare trainer, as
throughput.py's ``ours``), ``ours_per_view`` (that, one augmentation pass per view: the CPU's path, and
every device's before 2026-11-29), ``floor``. The accelerators' code paths are counted: the views
joined in one pass, the hue rotation as a ``where`` over the batch (``--hue-path subset``: the CPU's,
only the chosen images, found with ``nonzero``).

Usage: ``python benchmarks/host_ops.py [--stem imagenet] [--batch-size 16] [--steps 4] [--set KEY=VALUE]``.
The batch size does not change the counts; a small one keeps the run short (about a minute here).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as T  # noqa: E402  (the same configuration, data and Lightning loop)

PARTS = {  # source file on the stack -> part of the step
    "augment.py": "augmentation", "backbone.py": "network forward", "model.py": "network forward",
    "heads.py": "network forward", "losses.py": "network forward", "optim.py": "optimizer (LARS)",
    "ema.py": "EMA update", "pretrain_module.py": "training step bookkeeping", "data.py": "batches",
    "monitors.py": "online monitors", "linear_probe.py": "online monitors",
    "callbacks.py": "checkpoint and signal hooks",
}
BACKWARD = "network backward"
# the host waits for the device after these: item / bool of a tensor, nonzero, and torch.tensor(<Python
# value>) (lift_fresh), a blocking host-to-device copy on a GPU
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::lift_fresh")


def part_of(event) -> str:
    """The part of the step a top-level operator belongs to, from its Python stack."""
    node = event.cpu_parent
    while node is not None:
        if node.name.startswith("autograd::engine"):
            return BACKWARD
        name = node.name.split("(")[0]
        file = name.rsplit("/", 1)[-1]
        if file in PARTS and "byol/" in name:
            return PARTS[file]
        if "pytorch_lightning/" in name or "lightning/pytorch/" in name:
            return "Lightning"
        node = node.cpu_parent
    return "other"


def count(events, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """(top-level operators per step by part, host synchronisations per step by part and operator)."""
    parts: collections.Counter = collections.Counter()
    syncs: collections.Counter = collections.Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        if e.name in SYNCS:
            syncs[f"{part_of(e)}: {e.name[6:]}"] += 1
        parent = e.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            parts[part_of(e)] += 1
    return {k: v / steps for k, v in parts.items()}, {k: v / steps for k, v in syncs.items()}


def stack_profiler():
    """A CPU profiler that records the Python stack of each operator (for :func:`part_of`)."""
    return profile(activities=[ProfilerActivity.CPU], with_stack=True)


def ops_ours(cfg: dict, args, variant: str) -> tuple[dict, dict]:
    """``run``: train.py's trainer (monitors, checkpoint and signal hooks, learning-rate monitor);
    ``module``: the training step alone in a bare trainer (throughput.py's ``ours``); ``per_view``: that,
    one augmentation pass per view."""
    import pytorch_lightning as pl

    from byol.jobs.build import make_loggers
    from byol.jobs.monitoring import build_monitors, monitor_samples, monitor_taps, representations
    from byol.jobs.pretrain_fit import build_datamodule, build_module, build_run_trainer
    from byol.lightning.monitors import all_taps

    prof = stack_profiler()

    class Window(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == args.warmup:
                prof.start()
            elif trainer.global_step == args.warmup + args.steps:
                prof.stop()

    datamodule, module = build_datamodule(cfg), build_module(cfg)
    module.augment.join_views = variant != "per_view"  # as on an accelerator, or one pass per view (the CPU's)
    with tempfile.TemporaryDirectory() as run_dir:
        if variant == "run":
            monitors = build_monitors(cfg, module.model.online_encoder.dims, monitor_samples(cfg))
            module.model.feature_taps = all_taps(representations(monitor_taps(cfg))) if monitors else []
            trainer = build_run_trainer({**cfg, "trainer": {**cfg["trainer"], "max_steps": args.warmup + args.steps,
                                                            "max_epochs": -1, "enable_progress_bar": False}},
                                        Path(run_dir), make_loggers(None, Path(run_dir)), monitors,
                                        len(datamodule.batches))
            trainer.callbacks.append(Window())
        else:
            trainer = T.bare_trainer(cfg, torch.device("cpu"), args.warmup + args.steps, [Window()])
        trainer.fit(module, datamodule=datamodule)
    return count(prof.events(), args.steps)


def ops_floor(cfg: dict, args) -> tuple[dict, dict]:
    step = T.floor_step(cfg, torch.device("cpu"))
    for _ in range(args.warmup):
        step()
    prof = stack_profiler()
    prof.start()
    for _ in range(args.steps):
        step()
    prof.stop()
    return count(prof.events(), args.steps)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stem", choices=T.STEMS, default="imagenet")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", default=None, help="dataset root with train/<class>/*.jpg (default: the shared archive)")
    p.add_argument("--archive", default=None)
    p.add_argument("--cache", default=T.DEFAULT_CACHE)
    p.add_argument("--hue-path", choices=("where", "subset"), default="where",
                   help="where: the accelerators' code path (counted by default); subset: the CPU's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    sys.path.insert(0, str(T.REPO))
    T.quiet_libraries()
    from byol.core import augment

    data_root = T.resolve_data(args)
    cfg = T.compose_config(data_root, args.stem, args.batch_size, False,
                           [f"data.subset={args.batch_size * (args.warmup + args.steps + 1)}", *args.overrides])
    print(f"[host_ops] {args.stem} stem, batch {args.batch_size}, {args.steps} steps after {args.warmup}; "
          f"hue path: {args.hue_path}; overrides: {args.overrides or 'none'}; torch {torch.__version__}", flush=True)
    defaults = augment._hue_where.__defaults__
    augment._hue_where.__defaults__ = (args.hue_path == "subset",)  # `subset`: the CPU path, else the GPU's
    try:
        results = {"run": ops_ours(cfg, args, "run"), "ours": ops_ours(cfg, args, "module"),
                   "ours_per_view": ops_ours(cfg, args, "per_view"), "floor": ops_floor(cfg, args)}
    finally:
        augment._hue_where.__defaults__ = defaults
    names = list(results)
    parts = sorted({k for r, _ in results.values() for k in r}, key=lambda k: -results["ours_per_view"][0].get(k, 0))
    print(f"\ntop-level operators per optimizer step\n{'part':28s}" + "".join(f"{n:>15s}" for n in names))
    for part in parts:
        print(f"{part:28s}" + "".join(f"{results[n][0].get(part, 0):15.1f}" for n in names))
    totals = {n: sum(results[n][0].values()) for n in names}
    print(f"{'total':28s}" + "".join(f"{totals[n]:15.1f}" for n in names))
    print(f"{'host syncs':28s}" + "".join(f"{sum(results[n][1].values()):15.1f}" for n in names))
    for n in names:
        for where, k in results[n][1].items():
            print(f"  {n}: {k:.1f} a step from {where}")
    print(f"\nours / ours_per_view: {totals['ours'] / totals['ours_per_view']:.2f}x the operators; "
          f"ours / floor: {totals['ours'] / totals['floor']:.2f}x, ours_per_view / floor: "
          f"{totals['ours_per_view'] / totals['floor']:.2f}x")
    return {"totals": totals, "parts": {n: r[0] for n, r in results.items()},
            "syncs": {n: r[1] for n, r in results.items()}}


if __name__ == "__main__":
    main()
