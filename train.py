"""BYOL pretraining entry point: ``python train.py [group=option ...] [key=value ...]``.

Examples: ``python train.py loss=multi``, ``python train.py -m loss=classic,multi seed=0,1,2``,
``python train.py data=imagefolder data.root=DIR``, ``python train.py resume=outputs/train/<time>``.
See README.md and conf/train.yaml.
"""

import hydra
from omegaconf import DictConfig

from byol.jobs.cli import command_line_keys, job_named, run_job
from byol.jobs.command_line import run_script


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    # On resume the run keeps its own saved settings except those given on this command line.
    run_job(job_named("byol.jobs.pretrain", "pretrain"), cfg, requested=command_line_keys())


if __name__ == "__main__":
    run_script(main, "train")
