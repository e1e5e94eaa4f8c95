"""End to end: ``python train.py -m experiment=smoke loss=classic,multi`` (one sweep trains both losses) and
single runs of other settings.

Each command is a real subprocess through Hydra, one epoch on the tiny synthetic dataset
(128 images, batch 32: 4 optimizer steps).
"""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from in_process import run_here

from byol.core.checkpoint import load_encoder, load_weights, safe_load
from byol.jobs.build import build_encoder, loss_mode
from byol.jobs.resume import epochs_trained

pytestmark = pytest.mark.slow

STEPS = 128 // 32  # smoke data: num_train 128, batch 32, one epoch
ONLINE = "model.online_encoder."


def train(*overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    # in this worker, on its one intra-op thread (tests/conftest.py)
    result = run_here("train.py", *(["-m"] if multirun else []), "experiment=smoke", "trainer.max_epochs=1",
                      *overrides)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Both losses trained by one sweep, ``python train.py -m loss=classic,multi``: its folder and output."""
    folder = tmp_path_factory.mktemp("smoke") / "sweep"
    return folder, train("loss=classic,multi", f"hydra.sweep.dir={folder}", multirun=True)


@pytest.fixture(scope="module")
def runs(sweep) -> dict[str, Path]:
    """The sweep's run folders by loss."""
    folders = {}
    for run_dir in (p for p in sweep[0].iterdir() if p.is_dir()):
        folders[loss_mode(yaml.safe_load((run_dir / "config.yaml").read_text())["loss"])] = run_dir
    return folders


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth")
SMOKE_FOLDER_LIMIT = 60 * 2**20  # bytes: the smoke run (half-width ResNet-18) writes less than this


@pytest.mark.parametrize("loss", ["classic", "multi"])
def test_run_folder_contents(runs, loss):
    """One full training state (last.ckpt, which is the final one) and the export; no final.ckpt copy,
    no periodic checkpoints unless asked for; the whole folder under 60 MB."""
    run_dir = runs[loss]
    for name in ("checkpoints/last.ckpt", "encoder.pt", "metrics.csv", "config.yaml"):
        assert (run_dir / name).is_file(), name
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    weights = sorted(str(p.relative_to(run_dir)) for p in files if p.suffix in WEIGHT_SUFFIXES)
    assert weights == ["checkpoints/last.ckpt", "encoder.pt"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    others = {str(p.relative_to(run_dir)): p.stat().st_size for p in files if p.suffix not in WEIGHT_SUFFIXES}
    assert all(size < 2**20 for size in others.values()), others  # config, metrics, logs, plots: small
    assert sum(p.stat().st_size for p in files) < SMOKE_FOLDER_LIMIT
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert loss_mode(cfg["loss"]) == loss and cfg["trainer"]["max_epochs"] == 1
    assert cfg["backbone"]["width"] == 0.5 and cfg["checkpoint"]["keep_last"] is None
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved
    from byol.core.features import cpu_has_bf16_instructions  # trainer.precision=auto, recorded as it ran
    assert cfg["trainer"]["precision"] == ("bf16-mixed" if cpu_has_bf16_instructions() else "32-true")
    ckpt = safe_load(run_dir / "checkpoints" / "last.ckpt")
    assert loss_mode(ckpt["byol_config"]["loss"]) == loss and ckpt["global_step"] == STEPS
    assert epochs_trained(run_dir / "checkpoints" / "last.ckpt") == 1  # the final state: the epoch is done


@pytest.mark.parametrize("loss", ["classic", "multi"])
def test_encoder_export_reloads_to_identical_outputs(runs, loss):
    run_dir = runs[loss]
    exported, meta = load_encoder(run_dir / "encoder.pt")
    assert meta["loss"] == loss and meta["global_step"] == STEPS
    assert exported.config["width"] == 0.5 and exported.dims["avgpool"] == 256  # the smoke run's half width

    ckpt = safe_load(run_dir / "checkpoints" / "last.ckpt")
    rebuilt = build_encoder(ckpt["byol_config"])
    online = {k[len(ONLINE):]: v for k, v in ckpt["state_dict"].items() if k.startswith(ONLINE)}
    load_weights(rebuilt, online, "last.ckpt")
    assert exported.taps == rebuilt.taps
    # trained weights: the online encoder has moved away from its EMA target
    target = {k[len("model.target_encoder."):]: v for k, v in ckpt["state_dict"].items()
              if k.startswith("model.target_encoder.")}
    assert target.keys() == online.keys()
    assert any(not torch.equal(online[k], target[k]) for k in online)

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exported.eval()
    rebuilt.eval()
    with torch.no_grad():
        a, b = exported(x), rebuilt(x)
    assert a.keys() == b.keys()
    for tap in a:
        assert torch.equal(a[tap], b[tap]), tap


@pytest.mark.parametrize(("loss", "heads"), [("classic", ["avgpool"]),
                                             ("multi", ["avgpool", "layer2.0", "layer3.0"])])
def test_metrics_have_one_column_per_head(runs, loss, heads):
    rows = read_metrics(runs[loss])
    columns = set(rows[0])
    logged_heads = sorted({c.split("/")[2].rsplit("_", 1)[0] for c in columns if c.startswith("train/loss/")})
    assert logged_heads == sorted(heads)
    # the total is the sum of the heads (weights 1) in every row that logged a step
    step_rows = [r for r in rows if r.get("train/loss_step")]
    assert step_rows
    for r in step_rows:
        parts = [float(r[f"train/loss/{h}_step"]) for h in heads]
        assert all(0.0 <= p <= 8.0 for p in parts)
        assert float(r["train/loss_step"]) == pytest.approx(sum(parts), rel=1e-5)


def test_logged_tau_is_the_one_the_logged_step_used(runs):
    """A row's tau is the EMA rate of the optimizer step in its ``step`` column (cosine 0.99 -> 1 over the
    run's steps: the last step's is 1), not the next step's."""
    from byol.core.ema import tau_at

    logged = [(int(r["step"]), float(r["train/tau"])) for r in read_metrics(runs["classic"]) if r.get("train/tau")]
    assert [s for s, _ in logged] == [1, 3]  # logged every 2 steps
    # exactly: logged in float64 (a float logged through Lightning would be float32: 0.99 -> 0.9900000095)
    assert [t for _, t in logged] == [tau_at(s, STEPS - 1, 0.99) for s, _ in logged]


def test_tau_and_the_learning_rate_are_logged_at_each_epochs_last_step(tmp_path):
    """Logged every 3 steps of 4-step epochs, the tau and learning-rate curves ended a step short of each
    epoch, and of the values the epoch line shows (tau 1 after the run's last step); each epoch's last step
    is logged too, with the values that step used."""
    from byol.core.ema import tau_at

    run_dir = tmp_path / "run"
    result = train("trainer.max_epochs=2", "trainer.log_every_n_steps=3", "monitor=off", f"hydra.run.dir={run_dir}")
    rows = read_metrics(run_dir)
    tau = {int(r["step"]): float(r["train/tau"]) for r in rows if r.get("train/tau")}
    assert sorted(tau) == [2, 3, 5, 7]  # every 3rd step, and the last of each epoch
    # exactly, the logged steps and the epochs' last steps alike (a constant tau once drew as two values)
    assert tau == {s: tau_at(s, 2 * STEPS - 1, 0.99) for s in tau} and tau[7] == 1.0
    rates = {int(r["step"]): float(r["lr-LARS/pg1"]) for r in rows if r.get("lr-LARS/pg1")}
    assert sorted(rates) == [2, 3, 5, 7]
    last_line = [line for line in result.stdout.splitlines() if line.startswith("[byol] epoch 2/2")][0]
    assert f"tau 1.0000, lr {rates[7]:.3g}," in last_line
    # a single run ends with the command that evaluates it (at the smoke scale for a smoke run)
    assert result.stdout.strip().splitlines()[-1].endswith(
        f"; evaluate it: python evaluate.py pretrained={run_dir} preset=smoke")


def test_keep_last_keeps_the_newest_epoch_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    train("trainer.max_epochs=3", "checkpoint.keep_last=2", f"hydra.run.dir={run_dir}")  # smoke: every epoch
    folder = run_dir / "checkpoints"
    # named by the epochs they hold: the 2 newest of epoch0001..epoch0003
    assert sorted(p.name for p in folder.iterdir()) == ["epoch0002.ckpt", "epoch0003.ckpt", "last.ckpt"]
    assert [safe_load(folder / f"epoch000{e}.ckpt")["global_step"] for e in (2, 3)] == [2 * STEPS, 3 * STEPS]
    newest, last = safe_load(folder / "epoch0003.ckpt"), safe_load(folder / "last.ckpt")
    assert all(torch.equal(v, last["state_dict"][k]) for k, v in newest["state_dict"].items())


def test_a_warm_up_longer_than_the_run_is_capped_and_said_once(tmp_path):
    """10 warm-up epochs in a 2-epoch run of 16 steps per epoch (batch 8): at most 10% of the 32
    steps warm up (3), then the cosine decays to 0 over the other 29, instead of stopping at a
    fraction of the peak rate."""
    run_dir = tmp_path / "run"
    result = train("trainer.max_epochs=2", "data.batch_size=8", "optim.scheduler.warmup_epochs=10",
                   "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}")
    line = ("[byol] optim.scheduler.warmup_epochs=10 (160 steps) is more than 10% of this run (2 epochs, 32 "
            "steps), so the schedule cannot run as written: using a warm-up of 3 steps instead, then "
            "warmup_cosine over the other 29 steps")
    lines = result.stdout.splitlines()
    assert lines.count(line) == 1, result.stdout[-3000:]
    assert lines.index(line) < next(i for i, text in enumerate(lines) if text.startswith("[byol] epoch 1/2"))
    peak, warmup, total = 8 / 256, 3, 32  # optim=lars: base_lr 1.0 x batch / 256
    logged = {int(r["step"]): float(r["lr-LARS/pg1"]) for r in read_metrics(run_dir) if r.get("lr-LARS/pg1")}
    expected = {k: peak * ((k + 1) / warmup if k < warmup else
                           0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))) for k in range(total)}
    assert len(logged) >= total - 1 and max(logged.values()) == pytest.approx(peak)
    assert logged == pytest.approx({k: expected[k] for k in logged})


def test_multirun_sweeps_both_losses(sweep, runs):
    folder, result = sweep
    assert sorted(runs) == ["classic", "multi"] and len([p for p in folder.iterdir() if p.is_dir()]) == 2
    for loss, run_dir in runs.items():
        assert f"loss={loss}" in run_dir.name and (run_dir / "encoder.pt").is_file()
        assert str(run_dir) in result.stdout  # the user is told where each run folder is
    assert (folder / "multirun.yaml").is_file()
    # one evaluate command for the whole sweep at its end, none per job
    assert result.stdout.count("evaluate it:") == 1 and f"pretrained={folder} " in result.stdout


def test_tensorboard_logger_records_the_same_losses_as_metrics_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train("loss=multi", "logger=tensorboard", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}")
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    for tag in ("train/loss_step", "train/loss/layer2.0_step", "train/tau"):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(int(r["step"]), float(r[tag])) for r in read_metrics(run_dir) if r.get(tag)]
        assert len(logged) == STEPS and [s for s, _ in logged] == [s for s, _ in expected], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag


def test_wandb_logger_writes_an_offline_run_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train("logger=wandb", f"hydra.run.dir={run_dir}")
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # the run's records, ready for `wandb sync`
    assert (run_dir / "metrics.csv").is_file()  # the CSV is written beside it
