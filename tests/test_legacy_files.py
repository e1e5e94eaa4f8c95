"""Checkpoints and encoder exports written before the three-layer restructuring still load.

``tests/data/legacy_v1_checkpoint_layout.json`` records, from a real ``python train.py experiment=smoke``
run of that version, the top-level keys of its checkpoints and the config embedded in them (with the
project's own ``_target_`` entries, ``loss.name``, and full ``augment.view1`` / ``view2``).
"""

from __future__ import annotations

import json

import torch
from conftest import ROOT, compose_config, epochs_reported
from omegaconf import OmegaConf

from byol.core.checkpoint import load_encoder, safe_load
from byol.jobs.pretrain import pretrain
from byol.jobs.pretrained import read_pretrained

LEGACY = json.loads((ROOT / "tests" / "data" / "legacy_v1_checkpoint_layout.json").read_text())


def legacy_run(tmp_path):
    """A run folder whose last.ckpt and config.yaml have the old layout, stopped after epoch 1 of 2."""
    run = tmp_path / "run"
    # width 1.0: the old config below has no backbone.width, and its weights must be of that architecture
    pretrain(compose_config("train", ["experiment=smoke", "trainer.max_epochs=1", "backbone.width=1.0"], run), run)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["byol_config"] = json.loads(json.dumps(LEGACY["byol_config"]))
    checkpoint["augment_rng"] = {"seed": 0, "rule": "reseeded every step"}  # written, never read, then
    assert set(LEGACY["top_level_keys"]) - set(checkpoint) <= {"hyper_parameters", "hparams_name"}
    torch.save(checkpoint, last)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(LEGACY["byol_config"])))
    for name in ("final.ckpt", "epoch0000.ckpt", "epoch0001.ckpt"):
        (run / "checkpoints" / name).unlink(missing_ok=True)
    (run / "encoder.pt").unlink()
    return run


def test_an_old_checkpoint_resumes_and_evaluates(tmp_path, capsys):
    run = legacy_run(tmp_path)
    capsys.readouterr()
    old = read_pretrained(run / "checkpoints" / "last.ckpt")
    assert (old.loss, old.backbone["stem"], old.epochs, old.planned_epochs) == ("classic", "imagenet", 1, 2)
    # the old config runs in bf16-mixed: 8x slower than float32 on a CPU without bf16 instructions
    export = pretrain(compose_config("train", [f"resume={run}", "trainer.precision=32-true"], run), run,
                      requested=["trainer.precision"])
    done = safe_load(run / "checkpoints" / "last.ckpt")
    assert done["global_step"] == 8  # 2 epochs of 4 steps: the second one was trained ...
    assert epochs_reported(capsys.readouterr().out) == [2]  # ... and only the second
    saved = done["byol_config"]
    assert "_target_" not in json.dumps(saved) and saved["optim"]["scheduler"]["name"] == "warmup_cosine"
    assert saved["augment"]["view2"]["solarize_p"] == 0.2 and len(saved["augment"]["view1"]) == 14
    encoder, meta = load_encoder(export)
    assert meta["loss"] == "classic" and meta["epochs"] == 2
    assert encoder.config["width"] == 1.0 and encoder.dims["avgpool"] == 512  # the old config has no width


def test_an_old_encoder_export_loads(tmp_path):
    """The export format did not change (``byol-encoder`` version 1): one written by hand in that layout."""
    from byol.core.backbone import Encoder

    encoder = Encoder("resnet18", "imagenet", [], {"layer2.0": 4, "layer3.0": 2})
    blob = {"format": "byol-encoder", "version": 1,
            "backbone": {"name": "resnet18", "stem": "imagenet", "taps": [],
                         "grids": {"layer2.0": 4, "layer3.0": 2}},
            "state_dict": encoder.state_dict(),
            "meta": {"loss": "classic", "epochs": 2, "global_step": 8, "seed": 0}}
    torch.save(blob, tmp_path / "encoder.pt")
    loaded, meta = load_encoder(tmp_path / "encoder.pt", taps=["layer2.0"])
    assert meta["epochs"] == 2 and loaded.taps == ["avgpool", "layer2.0"]
    assert loaded.config["width"] == 1.0  # written before the width multiplier: torchvision's widths
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in encoder.state_dict().items())
    assert read_pretrained(tmp_path / "encoder.pt").loss == "classic"
