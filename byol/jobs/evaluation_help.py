"""``python evaluate.py --help``: the config it shows leaves out the settings it shares with train.py that an
evaluation refuses (they were listed as if they applied), and says which key does their job.

Kept apart from :mod:`byol.jobs.evaluation_checks`, which loads torch: ``--help`` answers in a second."""

from __future__ import annotations

from omegaconf import OmegaConf

# Settings of training that do nothing in an evaluation, and what does there.
NOT_FOR_EVALUATION = {"trainer.max_epochs": "eval.epochs", "data.batch_size": "eval.batch_size or feature_batch_size",
                      "trainer.accumulate_grad_batches": "eval.batch_size"}
BACKBONE_NOTE = "  # pretrained=random only: a trained encoder is rebuilt as it was trained"


def evaluation_config(*, _root_) -> str:
    """The composed config (``_root_``, Hydra's node left out) as YAML without :data:`NOT_FOR_EVALUATION`,
    followed by a line naming them: the ``hydra.help.template`` resolver of ``conf/evaluate.yaml``."""
    config = OmegaConf.to_container(_root_, resolve=False)
    config.pop("hydra", None)
    for key in NOT_FOR_EVALUATION:
        parent, _, leaf = key.rpartition(".")
        (config.get(parent) or {}).pop(leaf, None)
    text = OmegaConf.to_yaml(config).replace("backbone:\n", f"backbone:{BACKBONE_NOTE}\n", 1)
    refused = "; ".join(f"{key} (use {instead})" for key, instead in NOT_FOR_EVALUATION.items())
    # string.Template reads the text after this: a $ of a value stays one
    return (text + f"# train.py's settings an evaluation refuses: {refused}").replace("$", "$$")
