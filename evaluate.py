"""Evaluation entry point: ``python evaluate.py [pretrained=...] [repr=...] [eval=...] [key=value ...]``.

Examples: ``python evaluate.py`` (newest run, linear probe), ``python evaluate.py repr=combined
eval=finetune pretrained=RUN_DIR``, ``python evaluate.py -m pretrained=latest_sweep
repr=avgpool,combined eval=linear,finetune``. See README.md and conf/evaluate.yaml.
"""

import hydra
from omegaconf import DictConfig

from byol.jobs.cli import command_line_keys, job_named, run_job
from byol.jobs.command_line import run_script


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # The run's own data settings are used except the data keys given on this command line.
    run_job(job_named("byol.jobs.evaluate", "evaluate"), cfg, requested=command_line_keys())


if __name__ == "__main__":
    run_script(main, "evaluate")
