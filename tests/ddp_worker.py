"""Run by tests/test_ddp.py as two processes, ``LOCAL_RANK=r python tests/ddp_worker.py OUT_DIR`` (the ranks
started from outside, as torchrun or SLURM start them, so that Lightning starts none and one launch serves three
trainings): three optimizer steps of the smoke config with the online linear probes attached, after which each
rank writes what it holds to ``OUT_DIR/rank<r>.pt``; then the two runs of tests/syncbn_worker.py, with and
without synchronised BatchNorm. One launch instead of three: each process start imports torch and Lightning
(7-11 s on a 2-core AMD EPYC)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from conftest import compose_config, plain_config
from hydra.core.hydra_config import HydraConfig
from syncbn_worker import main as syncbn_run

from byol.jobs.pretrain_fit import build_datamodule, build_module
from byol.lightning.monitors import OnlineProbes, all_taps


class Record(pl.Callback):
    def __init__(self, probes: OnlineProbes):
        self.first_batch: torch.Tensor | None = None
        self.probes, self.probe_seen = probes, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = batch[0].flatten(1).float().sum(1).cpu()  # one fingerprint per image

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.probe_seen.append(self.probes._seen)  # images the probes counted so far this epoch


def main(out: Path) -> None:
    config = plain_config(compose_config("train", ["experiment=smoke"], out))
    HydraConfig.instance().cfg = None  # else Lightning would relaunch rank 1 as a Hydra app
    datamodule, module = build_datamodule(config), build_module(config)
    representations = {"avgpool": ["avgpool"], "layer3.0": ["layer3.0"]}
    module.model.feature_taps = all_taps(representations)
    probes = OnlineProbes(representations, module.model.online_encoder.dims, num_classes=10, seed=0)
    record = Record(probes)
    target_start = module.model.target_encoder.body.conv1.weight.detach().clone()
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=3, precision="32-true",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[probes, record])
    trainer.fit(module, datamodule=datamodule)
    model = module.model
    torch.save({"rank": trainer.global_rank, "world": trainer.world_size, "steps": trainer.global_step,
                "batches": len(datamodule.batches), "first_batch": record.first_batch,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "target_start": target_start,
                "probes": {name: p.detach().clone() for name, p in probes.heads.state_dict().items()},
                "probe_seen": record.probe_seen},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    for mode in ("ddp", "ddp_local"):
        syncbn_run(Path(sys.argv[1]), mode)
