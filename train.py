"""BYOL pretraining entry point: ``python train.py [group=option ...] [key=value ...]``.

Examples: ``python train.py loss=multi``, ``python train.py -m loss=classic,multi seed=0,1,2``,
``python train.py data=imagefolder data.root=DIR``. See README.md and conf/train.yaml.
"""

import hydra
from omegaconf import DictConfig

from byol.cli import run_job


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from byol.pretrain import pretrain

    run_job(pretrain, cfg)


if __name__ == "__main__":
    main()
