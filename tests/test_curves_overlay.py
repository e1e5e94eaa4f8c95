"""The learning-curve figures as a reader sees them: a run's curves.png, the report's overlay of a sweep's
runs (what tells the runs apart, what it draws of failed runs, which it leaves out) and which sweep the
report picks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")


def training_job(folder: Path, overrides: dict, seed: int = 0, taps: str = "[]", epochs: int = 2,
                 weights: bool = True, failed: str | None = None) -> Path:
    """A sweep's training job as train.py -m leaves it: Hydra's overrides, config.yaml, metrics.csv; weights,
    or a FAILED file."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    lr = float(overrides.get("optim.base_lr", 1.0))
    (folder / "config.yaml").write_text(f"seed: {seed}\nloss:\n  taps: {taps}\nbackbone:\n  name: resnet18\n"
                                        f"optim:\n  base_lr: {lr}\n")
    rows = ["epoch,step,monitor/knn/avgpool,train/loss_epoch,train/tau", ",0,0.3,,"]
    rows += [f"{e},{4 * e + 3},{0.3 + lr * e / 100},{2.0 - e / 2},0.99" for e in range(epochs)]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    if weights:
        (folder / "encoder.pt").write_bytes(b"weights")
    if failed:
        (folder / "FAILED").write_text(failed + "\n")
    return folder


def overlay_of(sweep: Path, out: Path, monkeypatch):
    """The overlay figure the report draws for ``sweep`` (kept open, not written)."""
    import byol.jobs.curves as curves
    from byol.jobs.report import report

    figures = []
    monkeypatch.setattr(curves, "_save", lambda fig, path: figures.append(fig))
    assert report([sweep], out) == []
    (fig,) = figures
    return fig


def key_texts(fig) -> list[str]:
    (key,) = fig.legends
    return [t.get_text() for t in key.get_texts()]


def test_the_overlay_tells_apart_runs_that_differ_in_a_swept_setting(tmp_path, monkeypatch):
    """train.py -m optim.base_lr=0.5,5.0 drew both runs in one colour under one entry, "loss=classic": each value
    of a setting the sweep varies has its colour and names it; where only loss and seed vary, colour stays loss."""
    sweep = tmp_path / "lr"
    for i, lr in enumerate(("0.5", "5.0")):
        training_job(sweep / f"{i}_lr", {"experiment": "smoke", "optim.base_lr": lr})
    fig = overlay_of(sweep, tmp_path / "out", monkeypatch)
    assert key_texts(fig)[:3] == ["loss=classic, optim.base_lr=0.5", "loss=classic, optim.base_lr=5.0", "seed 0"]
    knn = fig.axes[1]
    assert len({line.get_color() for line in knn.get_lines()}) == 2
    assert "(colour: loss, optim.base_lr, line style: seed" in fig._suptitle.get_text()

    grid = tmp_path / "grid"
    for i, (loss, seed) in enumerate((("classic", 0), ("multi", 0), ("classic", 1), ("multi", 1))):
        taps = "[layer2.0]" if loss == "multi" else "[]"
        training_job(grid / f"{i}_job", {"experiment": "smoke", "loss": loss, "seed": seed}, seed=seed, taps=taps)
    texts = key_texts(overlay_of(grid, tmp_path / "out2", monkeypatch))
    assert texts[:4] == ["loss=classic", "loss=multi", "seed 0", "seed 1"]


def test_runs_alike_in_every_override_are_told_apart_by_folder(tmp_path, monkeypatch):
    """Two sweeps' runs of one command, reported together: same loss, seed and overrides; their folders name them."""
    from byol.jobs.curves_overlay import OverlayRun, varying_settings

    runs = [OverlayRun("classic", "seed 0", tmp_path / name, {"experiment": "smoke"}) for name in ("a", "b")]
    assert varying_settings(runs) == ["run"]
    runs[1].settings["optim.base_lr"] = "5.0"
    assert varying_settings(runs) == ["optim.base_lr"]


def test_a_failed_run_is_drawn_as_far_as_logged_and_each_run_left_out_is_named(tmp_path, monkeypatch, capsys):
    """A failed or weightless job with a metrics.csv was left out without a word while the title counted runs
    not drawn; a metrics.csv cut short drew only its epoch-0 dots, unremarked. The failed run is drawn, marked in
    its key entry; each run left out is named with why, under the title and on stderr; the title counts what
    is drawn."""
    sweep = tmp_path / "sweep"
    training_job(sweep / "0_ok", {"seed": 0}, seed=0)
    training_job(sweep / "1_failed", {"seed": 1}, seed=1, epochs=1, weights=False,
                 failed="RuntimeError: the loss is nan")
    training_job(sweep / "2_garbage", {"seed": 2}, seed=2)
    (sweep / "2_garbage" / "metrics.csv").write_bytes(b"\xff\xfe not a csv")
    cut = training_job(sweep / "3_cut", {"seed": 3}, seed=3)
    text = (cut / "metrics.csv").read_text()
    (cut / "metrics.csv").write_text(text[:text.index("\n0,") + 5])  # the header, epoch 0's kNN, a piece of a row
    fig = overlay_of(sweep, tmp_path / "out", monkeypatch)
    title = fig._suptitle.get_text()
    assert title.startswith("learning curves of 3 pretraining runs")
    assert "1 run left out: 2_garbage (not UTF-8 text" in title
    assert "2 runs drawn as far as logged: 1_failed (training failed: RuntimeError: the loss is nan; drawn to " \
           "epoch 1); 3_cut (metrics.csv cut short" in title
    assert key_texts(fig)[0] == ("loss=classic [seed 1: failed, ends at epoch 1; seed 3: metrics.csv cut short, "
                                 "nothing after epoch 0]")
    assert "end of a partial curve" in key_texts(fig)
    knn = fig.axes[1]
    assert sorted(len(line.get_xdata()) for line in knn.get_lines() if line.get_linestyle() != "None") == [1, 2, 3]
    err = capsys.readouterr().err
    assert "[report] note: 1_failed in curves.png: training failed: RuntimeError: the loss is nan" in err
    assert "3_cut in curves.png: metrics.csv cut short mid-row: its last row left out; nothing logged after " \
           "epoch 0" in err
    assert f"{sweep / '2_garbage' / 'metrics.csv'} left out of curves.png (not UTF-8 text" in err


def test_a_runs_panels_share_epochs_whole_epoch_ticks_one_colour_per_representation_and_named_rates():
    """loss=multi: layer2.0 was green in the loss panel and orange in the kNN panel (each panel cycled its own
    colours); the kNN panel spanned 0-1 beside the probe's 0-1.5; a 1-epoch run was ticked 0.48 ... 1.02; the
    learning rate's legend read "LARS/pg1"."""
    from byol.jobs.curves import PANELS, _draw
    from byol.jobs.figures import pyplot

    plt = pyplot()
    series = {"train/loss/avgpool": [(0.5, 3.5), (1.0, 3.0)], "train/loss/layer2.0": [(0.5, 3.7), (1.0, 3.2)],
              "monitor/knn/avgpool": [(0.0, 0.7), (1.0, 0.9)], "monitor/knn/combined": [(0.0, 0.7), (1.0, 0.95)],
              "monitor/knn/layer2.0": [(0.0, 0.75), (1.0, 1.0)], "monitor/probe/layer2.0": [(1.0, 0.6)],
              "lr-LARS/pg1": [(0.5, 0.1), (1.0, 0.02)], "lr-LARS/pg2": [(0.5, 0.1), (1.0, 0.02)]}
    fig, axes = plt.subplots(2, 3)
    try:
        _draw(axes, [("", series, {})])
        panels = {title: ax for ax, (title, *_) in zip(axes.flat, PANELS, strict=True)}
        drawn = [ax for ax in axes.flat if ax.get_lines()]
        assert len(drawn) == 4 and len({ax.get_xlim() for ax in drawn}) == 1
        assert all(list(ax.get_xticks()) == [0, 1] for ax in drawn)
        colours = {}
        for ax in drawn[:3]:
            for line in ax.get_lines():
                colours.setdefault(line.get_label(), set()).add(line.get_color())
        assert all(len(c) == 1 for c in colours.values()) and len({c.pop() for c in colours.values()}) == 3
        rates = panels["learning rate"].get_lines()
        assert [line.get_label() for line in rates] == ["LARS: weights and biases & BN"]
    finally:
        plt.close(fig)


def test_the_report_says_which_newer_evaluation_sweep_it_skipped_and_why(tmp_path, monkeypatch, capsys):
    """The report took the newest sweep with results without a word about a newer one still without any (just
    started, or all failed): one line names the sweep used, the newer one skipped and why."""
    from byol.jobs.report import main

    evals = tmp_path / "outputs" / "multirun" / "eval"
    used, skipped = evals / "2026-01-01_10-00-00", evals / "2026-01-02_10-00-00"
    (used / "0_repr=avgpool").mkdir(parents=True)
    (used / "0_repr=avgpool" / "results.json").write_text(
        '{"pretrained": "/r", "loss": "classic", "repr": "avgpool", "eval": "knn", "test_acc": 0.5, "status": "ok"}')
    os.utime(used / "0_repr=avgpool" / "results.json", (1000, 1000))
    (skipped / "0_repr=avgpool" / ".hydra").mkdir(parents=True)
    (skipped / "0_repr=avgpool" / "FAILED").write_text("ValueError: no such data\n")
    monkeypatch.chdir(tmp_path)
    main([])
    out = capsys.readouterr().out
    assert (f"[report] newest evaluation sweep: {Path('outputs/multirun/eval') / used.name}; skipped the newer "
            f"{Path('outputs/multirun/eval') / skipped.name}: no results.json yet, 1 of its 1 jobs failed") in out
    os.utime(skipped, (500, 500))  # older than the results: not "newer"
    main([])
    assert "skipped" not in capsys.readouterr().out


def test_a_runs_figure_marks_the_epochs_whose_non_finite_steps_were_skipped(tmp_path, monkeypatch):
    """With train.on_nonfinite=skip an epoch's point stood on fewer steps, and an epoch whose every step was
    skipped left a gap in the loss curve, with no word of either: each such epoch gets a red line in the loss
    panel, counted in its legend."""
    import byol.jobs.curves as curves

    run = tmp_path / "run"
    run.mkdir()
    rows = ["epoch,step,train/loss_epoch,train/loss/avgpool_epoch,train/skipped_steps_epoch",
            "0,3,2.0,2.0,0.0", "1,7,1.5,1.5,2.0", "2,11,,,4.0", "3,15,1.2,1.2,0.0"]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert curves.skipped_steps(curves.read_metrics(run / "metrics.csv")) == [(2.0, 2), (3.0, 4)]
    marked = []
    mark = curves.mark_skipped_steps

    def watch(ax, skipped):
        mark(ax, skipped)
        marked.append([(line.get_xdata()[0], line.get_label().startswith("_")) for line in ax.get_lines()
                       if line.get_color() == "red"])
        marked.append([text.get_text() for text in ax.get_legend().get_texts()])

    monkeypatch.setattr(curves, "mark_skipped_steps", watch)
    assert curves.write_curves(run) == run / "curves.png" and (run / "curves.png").stat().st_size > 0
    lines, legend = marked
    assert lines == [(2.0, False), (3.0, True)]  # a line at each epoch, one legend entry
    assert "non-finite steps skipped (6 in 2 epochs)" in legend and "avgpool" in legend
