"""Evaluation: representations, kNN, the linear probes, fine-tuning, model rebuilding and the job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import ROOT, compose_config, plain_config
from in_process import run_here
from omegaconf import OmegaConf

from byol.core.backbone import Encoder
from byol.core.checkpoint import save_encoder
from byol.core.data import IndexBatches, make_synthetic
from byol.core.errors import ByolError, CheckpointError, ConfigError
from byol.core.features import extract_features, feature_dim, representation_taps
from byol.core.knn import knn_accuracy, knn_predict
from byol.core.linear_probe import standardize, train_linear_probe
from byol.jobs.build import build_byol
from byol.jobs.evaluate import evaluate
from byol.jobs.pretrained import random_model, read_pretrained, resolve_pretrained
from byol.jobs.protocols import optimizer_maker
from byol.jobs.run_folder import find_runs, weights_file
from byol.lightning.classifier import ClassifierModule

GRIDS = {"layer2.0": 4, "layer3.0": 2}
COMBINED = ["avgpool", "layer2.0", "layer3.0"]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
# the optimizer the job builds from an eval config without optimizer / scheduler: SGD-Nesterov, cosine
CLASSIFIER = {"make_optimizer": optimizer_maker({}), "lr": 0.5, "encoder_lr": 0.5}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter AND buffer (BatchNorm running statistics, batch counters), copied."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


def tiny_encoder(taps=COMBINED, name="resnet18", stem="imagenet") -> Encoder:
    torch.manual_seed(0)
    return Encoder(name, stem, taps, GRIDS)


# --------------------------------------------------------------------------- representations


def test_representation_taps():
    assert representation_taps("avgpool", ["layer2.0"]) == ["avgpool"]
    assert representation_taps("combined", ["layer2.0", "layer3.0"]) == COMBINED
    assert representation_taps("combined", ["avgpool", "layer3.0", "layer3.0"]) == ["avgpool", "layer3.0"]
    with pytest.raises(ConfigError, match="repr.taps"):
        representation_taps("combined", [])
    with pytest.raises(ConfigError, match="avgpool or combined"):
        representation_taps("concat", [])



def test_features_are_the_eval_mode_encoder_on_normalised_images_taps_in_order():
    """extract_features against the encoder called by hand: uint8 / 255, minus each channel's mean, over
    its std, eval mode, taps concatenated in the order asked for (batches of 3 across 7 images)."""
    encoder = tiny_encoder()
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    taps = ["layer3.0", "avgpool", "layer2.0"]
    got = extract_features(encoder, images, taps, mean, std, batch_size=3)
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        by_tap = encoder.eval()(x, taps=taps)
    expected = torch.cat([by_tap[t] for t in taps], dim=1)
    assert got.shape == (7, 1024 + 512 + 2048)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,expected", [("resnet18", (512, 2048, 1024)), ("resnet50", (2048, 8192, 4096))])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_combined_dimension_is_sum_of_taps_and_classifier_follows(name, expected, stem):
    encoder = Encoder(name, stem, COMBINED, GRIDS)
    assert [encoder.dims[t] for t in COMBINED] == list(expected)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for repr_name, dim in (("avgpool", expected[0]), ("combined", sum(expected))):
        taps = representation_taps(repr_name, ["layer2.0", "layer3.0"])
        assert feature_dim(encoder, taps) == dim
        assert extract_features(encoder, images, taps, MEAN, STD).shape == (2, dim)
        module = ClassifierModule(encoder, taps, 10, MEAN, STD, finetune=False, **CLASSIFIER)
        assert module.head[0].num_features == dim and module.head[1].in_features == dim
        assert module.head[1].out_features == 10


# --------------------------------------------------------------------------- kNN


def _unit(degrees):
    rad = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_knn_on_toy_data_with_known_neighbours():
    # train points on the unit circle (angle, class)
    train = _unit([0.0, 30.0, -30.0, 90.0, 170.0])
    train_labels = torch.tensor([1, 0, 0, 2, 2])
    scale = torch.tensor([[1.0], [3.0], [0.5], [2.0]])  # cosine similarity ignores it
    queries = _unit([0.0, 0.0, 90.0, -60.0]) * scale
    query_labels = torch.tensor([1, 0, 2, 0])
    # By hand, k=3, T=0.1, vote exp(cos / T):
    #  q0 (0 deg): 0 deg (class 1, cos 1) vs 30 and -30 deg (class 0, cos .866):
    #      e^10 = 22026 > 2 e^8.66 = 11536 -> 1 (a majority vote would say 0)
    #  q1: the same point, labelled 0 -> predicted 1, wrong
    #  q2 (90 deg): 90 (class 2, 1.0), 30 (class 0, .5), 170 (class 2, .174): e^10 + e^1.74 > e^5 -> 2
    #  q3 (-60 deg): -30 (class 0, .866), 0 (class 1, .5), 30 (class 0, 0): e^8.66 + 1 > e^5 -> 0
    pred = knn_predict(train, train_labels, queries, num_classes=3, k=3, temperature=0.1)
    assert pred.tolist() == [1, 1, 2, 0]
    assert knn_accuracy(train, train_labels, queries, query_labels, 3, k=3, temperature=0.1) == 0.75
    # At T=1 the weights flatten: q0 gets e^1 = 2.72 for class 1 vs 2 e^.866 = 4.75 for class 0.
    pred_t1 = knn_predict(train, train_labels, queries, num_classes=3, k=3, temperature=1.0)
    assert pred_t1.tolist() == [0, 0, 2, 0]
    # chunking changes nothing; k larger than the bank uses the whole bank
    chunked = knn_predict(train, train_labels, queries, 3, k=3, temperature=0.1, chunk_size=1)
    assert chunked.tolist() == [1, 1, 2, 0]
    assert knn_predict(train, train_labels, queries, 3, k=50, temperature=0.1).shape == (4,)


# --------------------------------------------------------------------------- linear probe on cached features


def test_standardize_uses_train_statistics_and_permutes_rows():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(1000, 6, generator=g) * torch.tensor([1.0, 10, 0.1, 5, 2, 3]) + 7
    other = train[:10].clone()
    order = torch.randperm(1000, generator=g)
    (t, o), (mean, std) = standardize(train, other, order=order, chunk=128)
    torch.testing.assert_close(mean, train.mean(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(std, train.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(t.mean(0), torch.zeros(6), rtol=0, atol=1e-4)
    torch.testing.assert_close(t.std(0, unbiased=False), torch.ones(6), rtol=0, atol=1e-3)
    torch.testing.assert_close(t, (train[order] - mean) / std)  # rows permuted by `order`
    torch.testing.assert_close(o, (other - mean) / std)  # other splits: train statistics, order kept


def test_linear_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 3

    def split(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return centres[y] + torch.randn(n, 20, generator=g), y

    result = train_linear_probe(split(600), split(200), split(200), 3, epochs=10, batch_size=64, lr=0.1)
    assert result.val_acc > 0.95 and result.test_acc > 0.95
    assert len(result.history) == 10 and result.history[-1]["train/acc"] > 0.95
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]


def test_cached_linear_probe_decays_the_weights_but_not_the_bias():
    """As the classifier of the augmented and fine-tuning protocols (byol.core.optim.param_groups)."""
    from byol.core.linear_probe import nesterov_cosine

    seen = []

    def recording(groups, total_steps, steps_per_epoch):
        seen.extend(groups)
        return nesterov_cosine(groups, total_steps, steps_per_epoch)

    split = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    result = train_linear_probe(split, split, split, 3, epochs=1, batch_size=16, lr=0.1, weight_decay=0.5,
                                make_optimizer=recording)
    decay = {id(p): g["weight_decay"] for g in seen for p in g["params"]}
    assert decay == {id(result.head.weight): 0.5, id(result.head.bias): 0.0}


def test_cached_linear_probe_leaves_encoder_bit_identical():
    encoder = tiny_encoder()
    data = make_synthetic(64, num_classes=4)
    before = snapshot(encoder)
    encoder.train()  # extraction must switch to eval mode itself (BatchNorm statistics frozen)...
    feats = extract_features(encoder, data.images, COMBINED, MEAN, STD, batch_size=16, dtype=torch.bfloat16)
    assert encoder.training  # ... and restore the caller's mode
    assert feats.shape == (64, 3584) and feats.dtype == torch.bfloat16
    split = (feats, data.labels)
    untrained = train_linear_probe(split, split, split, 4, epochs=0, batch_size=16, seed=3)
    trained = train_linear_probe(split, split, split, 4, epochs=1, batch_size=16, seed=3)
    assert changed(before, encoder) == []
    assert not torch.equal(untrained.head.weight, trained.head.weight)  # only the classifier moved


# --------------------------------------------------------------------------- Lightning classifier


def _fit_one_epoch(module: ClassifierModule, n: int = 48):
    data = make_synthetic(n, num_classes=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    batches = IndexBatches(data, 16, seed=0)
    trainer.fit(module, train_dataloaders=batches, val_dataloaders=IndexBatches(data, 16, shuffle=False))
    return trainer


def test_augmented_linear_protocol_changes_only_the_classifier():
    encoder = tiny_encoder()
    module = ClassifierModule(encoder, COMBINED, 4, MEAN, STD, finetune=False, **CLASSIFIER)
    encoder_before, linear_before = snapshot(encoder), snapshot(module.head[1])
    trainer = _fit_one_epoch(module)
    assert trainer.global_step == 3
    assert changed(encoder_before, encoder) == []  # weights AND BatchNorm running statistics
    assert not encoder.training
    assert set(changed(linear_before, module.head[1])) == {"weight", "bias"}
    assert not any(p.requires_grad for p in encoder.parameters())


def test_finetune_changes_the_encoder():
    encoder = tiny_encoder()
    module = ClassifierModule(encoder, ["avgpool"], 4, MEAN, STD, finetune=True, **CLASSIFIER)
    before = snapshot(encoder)
    _fit_one_epoch(module)
    moved = changed(before, encoder)
    assert "body.conv1.weight" in moved and "body.layer4.1.conv2.weight" in moved
    assert "body.bn1.running_mean" in moved  # BatchNorm trains too


# --------------------------------------------------------------------------- rebuilding pretrained encoders


def _byol_checkpoint(smoke_config, tmp_path: Path, *overrides) -> tuple[Path, dict, torch.nn.Module]:
    """A Lightning-style checkpoint of a BYOL model whose target differs from its online encoder."""
    cfg = smoke_config("loss=multi", *overrides)
    torch.manual_seed(1)
    model = build_byol(cfg)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(1.0)
    ckpt = {"byol_config": cfg, "epoch": 3, "global_step": 12,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 3}}}},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    path = tmp_path / "run" / "checkpoints" / "final.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path, cfg, model


def test_checkpoint_rebuilds_the_online_encoder_of_the_runs_architecture(smoke_config, tmp_path):
    path, cfg, model = _byol_checkpoint(smoke_config, tmp_path, "backbone.stem=cifar")
    pre = read_pretrained(path)
    assert (pre.loss, pre.seed, pre.epochs) == ("multi", cfg["seed"], 3)
    encoder = pre.build(["avgpool"])  # another tap set than the run's: same weights
    assert encoder.config["stem"] == "cifar" and encoder.taps == ["avgpool"]
    online, target = model.online_encoder.state_dict(), model.target_encoder.state_dict()
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, online[k]), k
    assert not torch.equal(encoder.state_dict()["body.conv1.weight"], target["body.conv1.weight"])
    assert pre.build(COMBINED).dims == {"avgpool": 256, "layer2.0": 1024, "layer3.0": 512}  # smoke: half width
    assert encoder.config["width"] == 0.5


def test_encoder_export_is_rebuilt_with_its_meta(tmp_path):
    encoder = tiny_encoder(["layer2.0"], stem="cifar")
    save_encoder(encoder, tmp_path / "encoder.pt", meta={"loss": "multi", "epochs": 7, "seed": 4})
    pre = read_pretrained(tmp_path / "encoder.pt")
    assert (pre.loss, pre.epochs, pre.seed, pre.backbone["stem"]) == ("multi", 7, 4, "cifar")
    rebuilt = pre.build(COMBINED)
    for k, v in encoder.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_unusable_files_fail_with_clear_errors(smoke_config, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a byol checkpoint"):
        read_pretrained(tmp_path / "other.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_pretrained(tmp_path / "corrupt.pt")
    no_encoder = {"byol_config": smoke_config(), "state_dict": {"model.x": torch.zeros(1)}}
    torch.save(no_encoder, tmp_path / "nohead.ckpt")
    with pytest.raises(CheckpointError, match="no online encoder"):
        read_pretrained(tmp_path / "nohead.ckpt")
    # an export whose weights are not of the architecture it names (ImageNet stem weights, CIFAR stem claimed)
    blob = torch.load(_export(tmp_path / "a"), weights_only=True)
    blob["backbone"]["stem"] = "cifar"
    torch.save(blob, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="another architecture"):
        read_pretrained(tmp_path / "mismatch.pt").build(["avgpool"])


def _export(run_dir: Path, loss="classic", seed=0) -> Path:
    """A minimal run folder: encoder.pt + config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_encoder(tiny_encoder([]), run_dir / "encoder.pt", meta={"loss": loss, "epochs": 1, "seed": seed})
    (run_dir / "config.yaml").write_text(f"seed: {seed}\nloss:\n  name: {loss}\nbackbone:\n  name: resnet18\n"
                                         f"  stem: imagenet\n")
    return run_dir / "encoder.pt"


def test_resolve_pretrained(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    with pytest.raises(CheckpointError, match="no pretraining runs found.*pretrained=random"):
        resolve_pretrained("latest", outputs)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_pretrained(str(tmp_path / "nowhere"), outputs)
    for empty in ("", " "):  # pretrained=$RUN with RUN unset evaluated every run below the current folder
        with pytest.raises(CheckpointError, match="pretrained= is empty"):
            resolve_pretrained(empty, outputs)
    old = _export(outputs / "train" / "old")
    sweep = outputs / "multirun" / "train" / "2026"
    a, b = _export(sweep / "0_loss=classic"), _export(sweep / "1_loss=multi", "multi")
    newest = _export(outputs / "train" / "new")
    for i, p in enumerate((old, a, b, newest)):
        os.utime(p, (1000 + i, 1000 + i))
    assert resolve_pretrained("latest", outputs) == ([newest], None)
    assert "outputs/train/new" in capsys.readouterr().out  # says which run it chose
    assert resolve_pretrained("latest_sweep", outputs) == ([a, b], sweep)
    assert resolve_pretrained(str(sweep), outputs) == ([a, b], sweep)
    assert resolve_pretrained(str(old.parent), outputs) == ([old], None)
    assert resolve_pretrained("random", outputs) == ("random", None)
    assert find_runs(outputs) == sorted([old.parent, a.parent, b.parent, newest.parent])
    # encoder.pt > final.ckpt > last.ckpt
    run = tmp_path / "ckpts"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert weights_file(run) == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "final.ckpt").write_bytes(b"")
    assert weights_file(run) == run / "checkpoints" / "final.ckpt"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no pretraining run in"):
        resolve_pretrained(str(empty), outputs)


# --------------------------------------------------------------------------- configs and the job


@pytest.mark.parametrize("repr_name", ["avgpool", "combined"])
@pytest.mark.parametrize("protocol", ["linear", "finetune", "knn"])
def test_evaluate_configs_compose(repr_name, protocol, tmp_path):
    cfg = compose_config("evaluate", [f"repr={repr_name}", f"eval={protocol}"], tmp_path)
    assert (cfg.repr.name, cfg.eval.name, cfg.pretrained) == (repr_name, protocol, "latest")
    smoke = compose_config("evaluate", [f"repr={repr_name}", f"eval={protocol}", "preset=smoke"], tmp_path)
    assert smoke.split.val_size == 25 and smoke.feature_batch_size == 64
    if protocol != "knn":
        assert cfg.eval.epochs > 1 and smoke.eval.epochs == 1


def test_smoke_experiment_still_composes_for_training(tmp_path):
    train = plain_config(compose_config("train", ["experiment=smoke"], tmp_path))
    assert "eval" not in train and train["trainer"]["max_epochs"] == 2


def _job_config(tmp_path, *overrides):
    return compose_config("evaluate", ["preset=smoke", "data=synthetic", f"outputs_dir={tmp_path / 'outputs'}",
                                       *overrides], tmp_path)


def test_evaluate_random_knn_writes_results(tmp_path, capsys):
    cfg = _job_config(tmp_path, "pretrained=random", "eval=knn", "repr=combined")
    (result,) = evaluate(cfg, tmp_path / "run")
    assert "[eval] note: eval.k" not in capsys.readouterr().out  # k=200 against a larger training split
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and result["test_acc"] == saved["test_acc"]
    assert (saved["pretrained"], saved["loss"], saved["repr"], saved["eval"]) == ("random", "random-init",
                                                                                    "combined", "knn")
    # preset=smoke: the smoke run's half-width architecture, 256 + 1024 + 512 features
    assert (saved["backbone"], saved["stem"], saved["width"], saved["feature_dim"], saved["eval_epochs"]) == (
        "resnet18", "imagenet", 0.5, 1792, 0)
    assert 0.0 <= saved["val_acc"] <= 1.0 and 0.0 <= saved["test_acc"] <= 1.0
    # the test accuracy is a count of correct images over the synthetic data's num_test
    num_test = saved["eval_data"]["num_test"]  # 128
    assert saved["test_acc"] * num_test == pytest.approx(round(saved["test_acc"] * num_test))
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "config.yaml").is_file()


def test_results_name_the_weights_file_by_its_absolute_path(tmp_path, monkeypatch):
    save_encoder(tiny_encoder([]), tmp_path / "encoder.pt", meta={"loss": "classic", "epochs": 1, "seed": 0})
    monkeypatch.chdir(tmp_path)
    cfg = _job_config(tmp_path, "pretrained=encoder.pt", "eval=knn")
    (result,) = evaluate(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["pretrained"] == result["pretrained"] == str((tmp_path / "encoder.pt").resolve())


def test_a_k_larger_than_the_training_split_is_said(tmp_path, capsys):
    cfg = _job_config(tmp_path, "pretrained=random", "eval=knn", "eval.k=100000")
    (result,) = evaluate(cfg, tmp_path / "run")
    bank = result["split_sizes"]["train"]
    assert f"[eval] note: eval.k=100000 is more than the {bank} training images; kNN votes with all {bank}" \
        in capsys.readouterr().out


@pytest.mark.parametrize("protocol", [["eval=knn"], ["eval=linear"], ["eval=linear", "eval.cached_features=false"],
                                      ["eval=finetune"]], ids=["knn", "linear-cached", "linear-augmented", "finetune"])
def test_val_size_0_trains_on_all_training_images_and_reports_no_val_accuracy(tmp_path, capsys, recwarn,
                                                                                protocol):
    """The published protocols fit on the whole training set: split.val_size=0 does so, and the validation
    accuracy is null (not 0 from an empty split) in results.json, the log and metrics.csv."""
    cfg = _job_config(tmp_path, "pretrained=random", "split.val_size=0", *protocol)
    (result,) = evaluate(cfg, tmp_path / "run")
    # an epoch of fewer batches than Lightning's logging interval: still a row per epoch, and no warning
    assert not [w for w in recwarn if "logging interval" in str(w.message)]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["split_sizes"] == {"train": 256, "val": 0, "test": 128}  # data=synthetic: 256 / 128 images
    assert saved["status"] == "ok" and saved["val_acc"] is None and 0 < saved["test_acc"] <= 1
    assert "-> no val split, test " in capsys.readouterr().out
    assert "val/acc" not in (tmp_path / "run" / "metrics.csv").read_text()
    held_out = evaluate(_job_config(tmp_path, "pretrained=random", "split.val_size=16", *protocol), tmp_path / "r2")
    assert held_out[0]["split_sizes"]["train"] == 240 and held_out[0]["val_acc"] is not None


def test_an_evaluation_run_again_into_its_folder_keeps_the_earlier_result(tmp_path, capsys):
    """A finished result is never lost: the same hydra.run.dir evaluated again (twice within a second
    here) keeps the earlier results.json and metrics.csv under names the report does not read."""
    run = tmp_path / "run"
    first = evaluate(_job_config(tmp_path, "pretrained=random", "eval=knn"), run)[0]
    first_json = (run / "results.json").read_text()
    for _ in range(2):
        evaluate(_job_config(tmp_path, "pretrained=random", "eval=knn", "repr=combined"), run)
    kept = sorted(p.name for p in run.glob("results.replaced-*.json"))
    assert len(kept) == 2 and len(list(run.glob("metrics.replaced-*.csv"))) == 2
    assert first_json in [(run / name).read_text() for name in kept]
    assert json.loads((run / "results.json").read_text())["repr"] == "combined"
    assert json.loads(first_json)["test_acc"] == first["test_acc"]
    out = capsys.readouterr().out
    assert out.count(f"[eval] note: {run} already held an evaluation; kept as results.replaced-") == 2
    assert [p.name for p in run.rglob("results.json")] == ["results.json"]  # the report reads one
    assert not (run / ".replacing.json").exists()  # the record of what was kept goes with the new result
    configs = [yaml.safe_load((run / n.replace("results.", "config.").replace(".json", ".yaml")).read_text())
               for n in kept]  # each kept result beside the config that made it
    assert sorted(c["repr"]["name"] for c in configs) == ["avgpool", "combined"]


def test_keeping_an_earlier_evaluation_keeps_its_files_and_leaves_its_result_until_replaced(tmp_path):
    """Every output of the earlier evaluation is kept under a replaced- name (the kept results.json naming the
    kept maps and embeddings); its results.json stays readable where it was until the new one replaces it,
    so an evaluation stopped half-way loses nothing."""
    from byol.jobs.replaced import keep_earlier_evaluation

    folder = tmp_path / "ev"
    folder.mkdir()
    earlier = {"status": "ok", "test_acc": None, "embeddings": "embeddings.pt",
               "maps": {"avgpool": "tsne_avgpool.png", "layer2.0": "tsne_layer2.0.png"}}
    (folder / "results.json").write_text(json.dumps(earlier))
    for name in ("metrics.csv", "config.yaml", "embeddings.pt", "tsne_avgpool.png", "tsne_layer2.0.png", "eval.log"):
        (folder / name).write_text(name)
    kept = keep_earlier_evaluation(folder)
    assert json.loads((folder / "results.json").read_text()) == earlier  # still there, as it was
    assert sorted(p.name for p in folder.iterdir() if ".replaced-" not in p.name) == [
        ".replacing.json", "eval.log", "results.json"]  # the record of what was kept, until the new result
    (results,) = [n for n in kept if n.startswith("results.replaced-")]
    saved = json.loads((folder / results).read_text())
    for name in [saved["embeddings"], *saved["maps"].values()]:
        assert ".replaced-" in name and (folder / name).read_text().startswith(name.split(".replaced-")[0])
    assert len(kept) == 6 and all((folder / n).is_file() for n in kept)
    assert keep_earlier_evaluation(tmp_path / "empty_or_absent") == []


def test_failing_model_in_a_sweep_is_recorded_and_the_others_run(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _export(sweep / "0_good", "multi", seed=2)
    _export(sweep / "1_corrupt", "classic", seed=5)
    (sweep / "1_corrupt" / "encoder.pt").write_bytes(b"truncated")
    with pytest.raises(ByolError, match="1 of 4 evaluations failed"):
        evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn"), tmp_path / "run")
    good = json.loads((tmp_path / "run" / "0_good" / "results.json").read_text())
    bad = json.loads((tmp_path / "run" / "1_corrupt" / "results.json").read_text())
    bases = [json.loads((tmp_path / "run" / f"random-init_seed{seed}" / "results.json").read_text())
             for seed in (2, 5)]
    assert (good["status"], good["loss"], good["seed"]) == ("ok", "multi", 2)
    assert (bad["status"], bad["loss"], bad["seed"]) == ("failed", "classic", 5)  # its cell, from config.yaml
    assert "corrupt" in bad["error"] and bad["test_acc"] is None
    # one baseline per pretraining seed (the failed run's seed too: it is known from its config.yaml)
    for base, seed in zip(bases, (2, 5), strict=True):
        assert (base["status"], base["loss"], base["backbone"], base["stem"], base["width"], base["seed"]) == (
            "ok", "random-init", "resnet18", "imagenet", 1.0, seed)  # the runs' width, not preset=smoke's
    out = capsys.readouterr().out  # a baseline has no run: its data are the runs' (it said "the run's own")
    assert "[eval] random-init_seed2: data synthetic (image_size=32), from the settings of the runs it stands " \
           "beside" in out and "random-init_seed2: data synthetic (image_size=32), from the run's own" not in out


def _killed_run(smoke_config, run_dir: Path, done: int, planned: int, name: str = "last.ckpt") -> Path:
    """A run folder of a training job stopped after ``done`` of its ``planned`` epochs: config.yaml and one
    checkpoint (Lightning counts the epochs finished in ``epoch_progress.current.processed``)."""
    from omegaconf import OmegaConf

    cfg = smoke_config("loss=multi", f"trainer.max_epochs={planned}", "seed=3")
    if "state" not in _KILLED:  # one model for all of them: building it is the slow part
        torch.manual_seed(0)
        _KILLED["state"] = {f"model.{k}": v for k, v in build_byol(cfg).state_dict().items()}
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    path = run_dir / "checkpoints" / name
    torch.save({"byol_config": cfg, "epoch": max(0, done - 1), "global_step": 1 + 4 * done,
                "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": done}}}},
                "state_dict": _KILLED["state"]}, path)
    return path


_KILLED: dict = {}


def test_unfinished_run_is_evaluated_and_marked_incomplete(smoke_config, tmp_path, capsys):
    from byol.jobs.report import main as report_main

    sweep = tmp_path / "sweep"
    _export(sweep / "0_done", "classic")
    killed = _killed_run(smoke_config, sweep / "1_killed", done=0, planned=2)  # killed at step 1
    stopped = _killed_run(smoke_config, sweep / "2_stopped", done=1, planned=2, name="epoch0000.ckpt")
    cfg = _job_config(tmp_path, f"pretrained={sweep}", "eval=knn", "baseline=false")
    results = evaluate(cfg, tmp_path / "ev")
    assert [r["status"] for r in results] == ["ok"] * 3  # evaluated, not failed
    out = capsys.readouterr().out
    for label, path, done in (("1_killed", killed, 0), ("2_stopped", stopped, 1)):
        saved = json.loads((tmp_path / "ev" / label / "results.json").read_text())
        assert (saved["pretrain_status"], saved["pretrain_epochs"], saved["pretrain_epochs_planned"],
                saved["allow_incomplete"], saved["pretrained"]) == ("incomplete", done, 2, False, str(path))
        line = (f"[eval] note: {label} did not finish pretraining ({done} of 2 epochs, {path}): results.json "
                f"says pretrain_status: incomplete; the report leaves it out of the means "
                f"(allow_incomplete=true counts it)")
        assert out.count(line) == 1, out
    done = json.loads((tmp_path / "ev" / "0_done" / "results.json").read_text())
    assert (done["pretrain_status"], done["pretrain_epochs"]) == ("complete", 1)
    assert "0_done did not finish" not in out
    # the settings the report keeps apart are recorded
    assert saved["pretrain_data"] == {"name": "synthetic", "root": None, "subset": None, "image_size": 32,
                                      "num_train": 128, "num_test": 64}
    assert saved["eval_data"] == {**saved["pretrain_data"], "split": "holdout", "val_size": 25}
    assert (saved["backbone"], saved["stem"], saved["eval_epochs"]) == ("resnet18", "imagenet", 0)

    report_main([str(tmp_path / "ev")])
    md = (tmp_path / "ev" / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| multi | avgpool | knn |")]
    assert len(rows) == 2 and all(" | incomplete | incomplete | 0 | 0 | " in row for row in rows)  # in no mean
    assert " | 0 of 2 | 0 | **incomplete**: 1 run(s) not in any mean (1_killed) |" in rows[0]
    assert " | 1 of 2 | 0 | **incomplete**: 1 run(s) not in any mean (2_stopped) |" in rows[1]
    assert f"- 1_killed: 0 of 2 epochs ({killed})" in md and f"- 2_stopped: 1 of 2 epochs ({stopped})" in md

    # allow_incomplete=true: recorded, said, and the report counts it (in its own row)
    capsys.readouterr()
    (result,) = evaluate(_job_config(tmp_path, f"pretrained={killed}", "eval=knn", "allow_incomplete=true"),
                         tmp_path / "one")
    assert (result["pretrain_status"], result["allow_incomplete"]) == ("incomplete", True)
    assert ("results.json says pretrain_status: incomplete; allow_incomplete=true: the report counts it, in "
            "a row of its own") in capsys.readouterr().out
    report_main([str(tmp_path / "one")])
    (row,) = [line for line in (tmp_path / "one" / "results.md").read_text().splitlines()
              if line.startswith("| multi | avgpool | knn |")]
    assert f"| {100 * result['test_acc']:.2f} | {100 * result['val_acc']:.2f} | 1 | 0 |" in row


def test_a_sweep_still_running_is_evaluated_as_far_as_it_has_come_and_said_so(tmp_path, capsys):
    """A job still training without a checkpoint read as 'no weights', and nothing said that the sweep had jobs
    still to start: its live lock names it (its PID), results.json says pretrain_status: running, and one
    note says to evaluate again once the sweep has finished."""
    sweep = tmp_path / "sweep"
    _export(sweep / "0_good", "classic")
    (sweep / "0_good" / ".hydra").mkdir()
    running = sweep / "1_running"
    (running / ".hydra").mkdir(parents=True)
    hold = "import sys, time; from byol.jobs.run_folder import FolderLock\n" \
           "with FolderLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(running)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        results = evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn", "baseline=false"), tmp_path / "ev")
    finally:
        holder.kill()
        holder.wait()
    assert [r["label"] for r in results] == ["0_good"]
    out = capsys.readouterr().out
    reason = f"still training (PID {holder.pid}), no checkpoint yet"
    assert f"[eval] missing: 1_running: {reason} ({running}); listed as missing in the report" in out
    assert "[eval] note: the sweep is still running; the jobs it has not started yet have no folder" in out
    saved = json.loads((tmp_path / "ev" / "1_running" / "results.json").read_text())
    assert (saved["status"], saved["pretrain_status"], saved["error"]) == ("missing", "running", reason)


def test_failed_training_jobs_are_recorded_as_missing(tmp_path, capsys):
    from byol.jobs.report import main as report_main

    sweep = tmp_path / "sweep"
    good = _export(sweep / "0_good", "classic")
    (sweep / "0_good" / ".hydra").mkdir()
    failed = sweep / "1_failed"  # its FAILED file wins over the checkpoint it left (unreadable here)
    (failed / ".hydra").mkdir(parents=True)
    (failed / "checkpoints").mkdir()
    (failed / "checkpoints" / "last.ckpt").write_bytes(b"half a checkpoint")
    (failed / "config.yaml").write_text("seed: 1\nloss:\n  taps: [layer2.0]\nbackbone:\n  name: resnet18\n"
                                        "  stem: imagenet\n")
    (failed / "FAILED").write_text("non-finite loss at step 3 (epoch 0, batch 3 of 4)\nmore detail\n")
    empty = sweep / "2_empty"  # killed before its first checkpoint: .hydra/ and nothing else
    (empty / ".hydra").mkdir(parents=True)
    # the same model as 1_failed at another seed (other taps would be another model: a row of its own)
    (empty / ".hydra" / "config.yaml").write_text("seed: 2\nloss:\n  taps: [layer2.0]\nbackbone:\n  name: resnet18\n"
                                                  "  stem: imagenet\n")
    (sweep / "notes").mkdir()  # not a job folder
    assert resolve_pretrained(str(sweep)) == ([good], sweep)

    cfg = _job_config(tmp_path, f"pretrained={sweep}", "eval=knn", "baseline=false")
    results = evaluate(cfg, tmp_path / "ev")
    assert [r["label"] for r in results] == ["0_good"]  # the job does not fail for the training's failures
    out = capsys.readouterr().out
    reason = "training failed: non-finite loss at step 3 (epoch 0, batch 3 of 4)"
    no_weights = "no weights: no encoder.pt and no checkpoints/*.ckpt"
    assert (f"[eval] missing: 1_failed: {reason} ({failed}); listed as missing in the report") in out
    assert (f"[eval] missing: 2_empty: {no_weights} ({empty}); listed as missing in the report") in out
    for job, why, seed, status in ((failed, reason, 1, "failed"), (empty, no_weights, 2, "no weights")):
        saved = json.loads((tmp_path / "ev" / job.name / "results.json").read_text())
        assert (saved["status"], saved["pretrain_status"], saved["error"], saved["loss"], saved["seed"],
                saved["pretrained"], saved["test_acc"]) == ("missing", status, why, "multi", seed, str(job),
                                                            None)
    assert not (tmp_path / "ev" / "notes").exists()
    # a job that failed after an earlier training of it was evaluated: the earlier result is kept, not lost
    finished = {"status": "ok", "test_acc": 0.5}
    (tmp_path / "ev2" / failed.name).mkdir(parents=True)
    (tmp_path / "ev2" / failed.name / "results.json").write_text(json.dumps(finished))
    evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn", "baseline=false"), tmp_path / "ev2")
    (kept,) = (tmp_path / "ev2" / failed.name).glob("results.replaced-*.json")
    assert json.loads(kept.read_text()) == finished

    report_main([str(tmp_path / "ev")])
    md = (tmp_path / "ev" / "results.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| multi | avgpool | knn |")]
    # 0_good's config.yaml names no data: its pretraining data reads as unknown
    assert row == ("| multi | avgpool | knn | missing | missing | 0 | 0 | resnet18/imagenet | ? → synthetic | ? | 0 | "
                   "**missing**: no model (1_failed, 2_empty) |  |")
    assert (f"Missing pretraining runs (2, not evaluated):\n- {failed}: {reason}\n- {empty}: {no_weights}"
            in md)

    # a sweep in which every job failed: an error that names them, never an older sweep instead
    newest = tmp_path / "outputs" / "multirun" / "train" / "new"
    older = tmp_path / "outputs" / "multirun" / "train" / "old"
    _export(older / "0_ok")
    os.utime(older / "0_ok" / "encoder.pt", (1000, 1000))
    (newest / "0_loss=multi" / ".hydra").mkdir(parents=True)
    (newest / "0_loss=multi" / "FAILED").write_text("out of memory\n")
    with pytest.raises(CheckpointError, match=r"no run of the sweep .*new' can be evaluated: its 1 job\(s\) "
                       r"have no model \(0_loss=multi: training failed: out of memory\)"):
        resolve_pretrained("latest_sweep", tmp_path / "outputs")


def test_random_encoder_is_a_function_of_its_seed_alone():
    arch = {"name": "resnet18", "stem": "imagenet", "grids": {}}

    def weights(seed, global_seed):
        torch.manual_seed(global_seed)  # whatever the evaluation's random stream is
        before = torch.random.get_rng_state()
        encoder = random_model(arch, seed).build(["layer2.0"])
        assert torch.equal(torch.random.get_rng_state(), before)  # and drawing it leaves that stream alone
        return encoder.state_dict()

    a, b, c = weights(0, 1), weights(0, 2), weights(1, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.conv1.weight"], c["body.conv1.weight"])


# --------------------------------------------------------------------------- end to end (subprocesses)


def _run(script: str, args, cwd: Path) -> subprocess.CompletedProcess:
    return run_here(str(ROOT / script), *args, cwd=cwd)


@pytest.mark.slow
def test_multi_resnet50_run_is_rebuilt_by_evaluate(tmp_path, monkeypatch):
    train = _run("train.py", ["experiment=smoke", "loss=multi", "backbone=resnet50", "trainer.max_epochs=1",
                              "data.num_train=32", "data.batch_size=16", "hydra.run.dir=outputs/train/r50"],
                 tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    run = tmp_path / "outputs" / "train" / "r50"
    built = []
    from byol.jobs.pretrained import EncoderSource

    original = EncoderSource.build

    def spy(self, taps):
        built.append(original(self, taps))
        return built[-1]

    monkeypatch.setattr(EncoderSource, "build", spy)
    cfg = _job_config(tmp_path, "pretrained=latest", "repr=combined", "eval=knn")
    (result,) = evaluate(cfg, tmp_path / "ev")
    (encoder,) = built
    # the run's architecture, not evaluate's default backbone (resnet18)
    assert encoder.config["name"] == "resnet50" and encoder.config["stem"] == "imagenet"
    assert encoder.config["width"] == 0.5  # experiment=smoke's half width, rebuilt from the run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, ckpt[f"model.online_encoder.{k}"]), k
    target = ckpt["model.target_encoder.body.conv1.weight"]
    assert not torch.equal(encoder.state_dict()["body.conv1.weight"], target)  # online, not the EMA target
    assert (result["backbone"], result["loss"], result["feature_dim"], result["pretrain_epochs"]) == (
        "resnet50", "multi", 1024 + 4096 + 2048, 1)


def test_an_export_claiming_another_architecture_is_refused_naming_the_missing_weights(tmp_path):
    """resnet18 weights under a resnet34 header (the command line's one error line: tests/test_errors.py)."""
    blob = torch.load(_export(tmp_path / "a"), weights_only=True)
    blob["backbone"]["name"] = "resnet34"
    torch.save(blob, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="another architecture") as err:
        read_pretrained(str(tmp_path / "mismatch.pt")).build(["avgpool"])
    assert "missing" in str(err.value) and "\n" not in str(err.value)


def test_feature_normalisation_matches_a_batchnorm_without_affine():
    """The cached probe's standardisation is the eval-mode BatchNorm of the augmented protocol."""
    x = torch.randn(500, 8) * 3 + 1
    (z,), (mean, std) = standardize(x)
    bn = torch.nn.BatchNorm1d(8, affine=False, momentum=None, eps=1e-5).train()
    bn(x)  # momentum=None: running statistics are the cumulative average, here of one batch
    bn.eval()
    # BatchNorm keeps the unbiased (n - 1) running variance: a factor sqrt(500 / 499) apart
    torch.testing.assert_close(z, bn(x) * math.sqrt(500 / 499), rtol=1e-4, atol=1e-4)


def test_evaluation_takes_the_runs_own_data_unless_given(tmp_path, capsys):
    """A run trained on synthetic data (96 training images) is evaluated on that data although
    evaluate.yaml's default is CIFAR-10; data.KEY on the command line replaces that key alone."""
    run = tmp_path / "run"
    export = _export(run)
    data = {"name": "synthetic", "root": None, "num_train": 96, "num_test": 40, "batch_size": 32, "subset": None,
            "num_classes": 4, "image_size": 32, "crop_size": None, "mean": [0.5] * 3, "std": [0.25] * 3,
            "on_device": True}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"seed": 0, "loss": {"taps": []}, "backbone": {"name": "resnet18", "stem": "imagenet"}, "data": data})))
    cfg = compose_config("evaluate", ["preset=smoke", f"pretrained={export}", "eval=knn"], tmp_path)
    (result,) = evaluate(cfg, tmp_path / "ev", requested=[])
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["status"] == "ok" and saved["eval_data"]["name"] == "synthetic"
    assert saved["eval_data"]["num_train"] == 96 and saved["eval_data"]["num_test"] == 40
    assert "data synthetic (image_size=32), from the run's own settings" in capsys.readouterr().out
    cfg = compose_config("evaluate", ["preset=smoke", f"pretrained={export}", "eval=knn", "data.subset=40"],
                         tmp_path)
    evaluate(cfg, tmp_path / "ev2", requested=["data.subset"])
    saved = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert (saved["eval_data"]["name"], saved["eval_data"]["num_train"], saved["eval_data"]["subset"]) == (
        "synthetic", 96, 40)
    assert "from the run's own settings; data.subset from the command line" in capsys.readouterr().out


@pytest.mark.parametrize("override", ["backbone.name=resnet50", "backbone=resnet50", "backbone.width=0.5"])
def test_architecture_settings_are_refused_for_a_trained_encoder(tmp_path, override):
    """A trained encoder is rebuilt as it was trained: a backbone setting would be ignored without a word."""
    from byol.jobs.cli import command_line_keys

    save_encoder(Encoder("resnet18", "imagenet", width=0.25), tmp_path / "encoder.pt", meta={"loss": "classic"})
    cfg = compose_config("evaluate", ["preset=smoke", "data=synthetic", f"pretrained={tmp_path / 'encoder.pt'}",
                                      "eval=knn", override], tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]} on the command line does not apply to a "
                                          r"trained encoder.*pretrained=random only$"):
        evaluate(cfg, tmp_path / "run", requested=command_line_keys())
    assert not (tmp_path / "run" / "results.json").exists()


def test_architecture_settings_choose_the_random_init_network(tmp_path):
    from byol.jobs.cli import command_line_keys

    cfg = compose_config("evaluate", ["preset=smoke", "data=synthetic", "pretrained=random", "eval=knn",
                                      "backbone.width=0.25", "backbone.stem=imagenet"], tmp_path / "run")
    (result,) = evaluate(cfg, tmp_path / "run", requested=command_line_keys())
    assert (result["backbone"], result["stem"], result["width"]) == ("resnet18", "imagenet", 0.25)


@pytest.mark.parametrize("content", [b"PK\x03\x04 cut short", b"a: yaml file\n"])
def test_a_file_that_is_no_encoder_fails_before_any_data_is_read(tmp_path, content):
    """The weights are read first: a corrupt or foreign file is reported as what it is, without first
    loading (or, for CIFAR-10, downloading) a dataset; here the data could not even be found."""
    from byol.jobs.cli import command_line_keys

    (tmp_path / "model.ckpt").write_bytes(content)
    cfg = compose_config("evaluate", ["preset=smoke", "data=imagefolder", f"data.root={tmp_path / 'nowhere'}",
                                      f"pretrained={tmp_path / 'model.ckpt'}", "eval=knn"], tmp_path / "run")
    with pytest.raises(CheckpointError, match="model.ckpt"):
        evaluate(cfg, tmp_path / "run", requested=command_line_keys())
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["status"] == "failed" and "model.ckpt" in result["error"]


def test_an_earlier_evaluations_baselines_this_one_does_not_make_are_set_aside(tmp_path, capsys):
    """A sweep evaluated with one seed (baseline folder `random-init`), then again into the same folder after
    a second seed was trained (`random-init_seed0`, `_seed1`): the old `random-init` was read by the report as
    a repeated seed 0. It is kept aside under the .replaced- name, out of the report."""
    from byol.jobs.report_cells import build_cells
    from byol.jobs.report_files import load_results

    sweep, out = tmp_path / "sweep", tmp_path / "ev"
    _export(sweep / "0", seed=0)
    evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn"), out)
    assert (out / "random-init" / "results.json").is_file()
    _export(sweep / "1", seed=1)
    evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn"), out)
    assert "[eval] note: random-init, a baseline of an earlier evaluation here" in capsys.readouterr().out
    assert not (out / "random-init" / "results.json").exists()
    assert len(list((out / "random-init").glob("results.replaced-*.json"))) == 1
    assert not list(out.rglob(".replacing.json"))  # set aside for good: no record left to undo it by
    (baseline,) = [c for c in build_cells(load_results(sorted(out.rglob("results.json")))) if c.loss == "random-init"]
    assert baseline.runs == 2 and not baseline.repeated_seeds and sorted(baseline.seeds) == [0, 1]
