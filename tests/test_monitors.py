"""Online monitors during pretraining: kNN and linear probes per representation, and the curves."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_config
from PIL import Image

from byol.core.checkpoint import safe_load
from byol.jobs.curves import read_metrics
from byol.jobs.evaluate import evaluate
from byol.jobs.monitoring import representations
from byol.jobs.pretrain import pretrain
from byol.lightning.epoch_output import EpochHook

TINY = ["experiment=smoke", "trainer.precision=32-true", "data.num_train=64", "data.num_test=40",
        "data.batch_size=16", "trainer.max_epochs=2", "monitor.val_size=12"]


def last_row_values(metrics, prefix: str) -> dict[str, float]:
    with open(metrics, newline="") as f:
        rows = [r for r in csv.DictReader(f) if any(r[k] for k in r if k.startswith(prefix))]
    return {k[len(prefix):]: float(v) for k, v in rows[-1].items() if k.startswith(prefix) and v}


def test_representations_are_avgpool_each_tap_and_combined():
    assert representations(["layer2.0", "layer3.0"]) == {
        "avgpool": ["avgpool"], "layer2.0": ["layer2.0"], "layer3.0": ["layer3.0"],
        "combined": ["avgpool", "layer2.0", "layer3.0"]}
    assert representations([]) == {"avgpool": ["avgpool"]}


@pytest.mark.slow
def test_online_knn_is_the_offline_knn_of_the_same_weights(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(compose_config("train", TINY, run), run)
    online = last_row_values(run / "metrics.csv", "monitor/knn/")
    assert set(online) == {"avgpool", "layer2.0", "layer3.0", "combined"}
    out = capsys.readouterr().out
    assert "kNN before training (random init)" in out
    # k=200 against the 52 training images left after the 12 held out: the whole bank votes, and it says so
    assert "against 52 training images (monitor.k=200: all 52 vote)" in out
    for repr_name in ("avgpool", "combined"):
        cfg = compose_config("evaluate", ["preset=smoke", f"pretrained={run}", "eval=knn", f"repr={repr_name}",
                                          "split.val_size=12", "trainer.precision=32-true"], tmp_path)
        (result,) = evaluate(cfg, tmp_path / f"eval_{repr_name}", requested=[])
        assert result["test_acc"] == pytest.approx(online[repr_name], abs=1e-6), repr_name
    probes = last_row_values(run / "metrics.csv", "monitor/probe/")
    assert set(probes) == set(online) and all(0 <= v <= 1 for v in probes.values())
    curves = read_metrics(run / "metrics.csv")
    assert [x for x, _ in curves["monitor/knn/avgpool"]] == [0.0, 1.0, 2.0]  # random init, then each epoch
    assert Image.open(run / "curves.png").size[0] > 1000
    assert "OnlineProbes" in safe_load(run / "checkpoints" / "last.ckpt")["callbacks"]  # resumed with the run


def test_knn_runs_every_n_epochs_and_at_the_last_epoch(tmp_path):
    """monitor.every_n_epochs=2 over 3 epochs scores after epochs 2 and 3: without the last one a run
    whose epochs are not a multiple of n ended without a final score (none at all when n > epochs)."""
    run = tmp_path / "run"
    pretrain(compose_config("train", [*TINY, "trainer.max_epochs=3", "monitor.every_n_epochs=2"], run), run)
    curves = read_metrics(run / "metrics.csv")
    assert [x for x, _ in curves["monitor/knn/avgpool"]] == [0.0, 2.0, 3.0]


@pytest.mark.slow
def test_monitors_do_not_change_the_encoders_training(tmp_path):
    weights = {}
    for monitor in ("default", "off"):
        run = tmp_path / monitor
        pretrain(compose_config("train", [*TINY, f"monitor={monitor}", "trainer.deterministic=true"], run), run)
        weights[monitor] = safe_load(run / "encoder.pt")["state_dict"]
    assert weights["default"].keys() == weights["off"].keys()
    assert all(torch.equal(weights["default"][k], weights["off"][k]) for k in weights["off"])
    assert not any(k.startswith("monitor/") for k in next(csv.reader(open(tmp_path / "off" / "metrics.csv"))))


def test_unlabelled_training_data_runs_without_monitors(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(40):
        pixels = torch.randint(0, 255, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    run = tmp_path / "run"
    overrides = ["experiment=smoke", "data=imagefolder", f"data.root={folder}", "data.cache_dir=null",
                 "data.image_size=16", "data.batch_size=16", "trainer.max_epochs=1", "trainer.precision=32-true"]
    pretrain(compose_config("train", overrides, run), run)
    out = capsys.readouterr().out
    assert "[byol] no online monitors: they need labelled training and test images" in out
    assert not any(k.startswith("monitor/") for k in next(csv.reader(open(run / "metrics.csv"))))


def fake_training_run(folder, taps, seed, knn):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {seed}\nloss:\n  taps: {taps}\nbackbone:\n  name: resnet18\n")
    (folder / "encoder.pt").write_bytes(b"")  # what makes it a run folder
    rows = ["epoch,step,monitor/knn/avgpool,monitor/knn/combined,train/loss_epoch,train/tau",
            f",0,{knn[0]},{knn[0] + 0.05},,"]
    rows += [f"{e},{4 * e + 3},{k},{k + 0.05},{2.0 - e / 2},0.99" for e, k in enumerate(knn[1:])]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_curves_read_epochs_and_a_sweep_report_overlays_its_runs(tmp_path, capsys):
    from byol.jobs.report import report

    sweep = tmp_path / "sweep"
    fake_training_run(sweep / "0_classic", "[]", 0, [0.30, 0.35, 0.42])
    fake_training_run(sweep / "1_multi", "[layer2.0, layer3.0]", 0, [0.30, 0.38, 0.47])
    series = read_metrics(sweep / "1_multi" / "metrics.csv")
    assert series["monitor/knn/avgpool"] == [(0.0, 0.30), (1.0, 0.38), (2.0, 0.47)]
    assert series["train/loss"] == [(1.0, 2.0), (2.0, 1.5)]
    assert series["train/tau"] == [(1.0, 0.99), (2.0, 0.99)]  # step 3 and 7 of 4-step epochs: ends of 1 and 2
    assert report([sweep], tmp_path / "out") == []  # no evaluation yet: only the curves, and a line that says so
    assert f"[report] no results.json under {sweep} yet, so no results table: evaluate the runs first" in \
        capsys.readouterr().out
    assert Image.open(tmp_path / "out" / "curves.png").size[0] > 1000
    # a report written into a run folder (python -m byol.report RUN [RUN2]) keeps the run's own curves.png
    run = sweep / "0_classic"
    (run / "encoder.pt").write_bytes(b"weights")
    (run / "curves.png").write_bytes(b"the run's own figure")
    assert report([run, sweep / "1_multi"], run) == []
    assert (run / "curves.png").read_bytes() == b"the run's own figure"
    assert Image.open(run / "curves_overlay.png").size[0] > 1000


def test_an_overlay_has_one_key_below_its_panels_instead_of_a_legend_per_curve(tmp_path, monkeypatch):
    import byol.jobs.curves as curves
    from byol.jobs.curves_overlay import overlay_curves

    sweep = tmp_path / "sweep"
    for seed in range(5):
        for loss, taps in (("classic", "[]"), ("multi", "[layer2.0, layer3.0]")):
            fake_training_run(sweep / f"{loss}{seed}", taps, seed, [0.30, 0.35, 0.42])
    figures = []
    monkeypatch.setattr(curves, "_save", lambda fig, path: figures.append(fig))
    runs = [(loss, f"seed {seed}", sweep / f"{loss}{seed}") for seed in range(5) for loss in ("classic", "multi")]
    overlay_curves(runs, tmp_path / "curves.png", "ten runs")
    (fig,) = figures
    assert all(ax.get_legend() is None for ax in fig.axes)  # 20 entries a panel would hide the curves
    (key,) = fig.legends
    assert [t.get_text() for t in key.get_texts()] == [
        "loss=classic", "loss=multi", "seed 0", "seed 1", "seed 2", "seed 3", "seed 4", "avgpool", "combined"]


def test_a_one_epoch_run_draws_its_logged_steps_not_a_dot(tmp_path, monkeypatch):
    """The README's quick look (trainer.max_epochs=1) showed the loss as one dot on axes ticked 0.945 ... 1.050:
    a run of fewer than 3 epochs draws its per-step values where it logged them, and a lone point sits on 0-1."""
    import byol.jobs.curves as curves

    run = tmp_path / "run"
    run.mkdir()
    rows = ["epoch,step,train/loss/avgpool_step,train/loss/avgpool_epoch,monitor/probe/avgpool",
            ",0,3.9,,", ",1,3.7,,", ",2,3.5,,", "0,3,3.3,3.6,0.4"]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    figures = []
    monkeypatch.setattr(curves, "_save", lambda fig, path: figures.append(fig))
    curves.write_curves(run)
    loss, _, probe = figures[0].axes[:3]
    (line,) = loss.get_lines()
    assert list(line.get_xdata()) == [0.25, 0.5, 0.75, 1.0] and list(line.get_ydata()) == [3.9, 3.7, 3.5, 3.3]
    # one x-range in every panel (the probe's lone point sat on 0-1.5 beside the loss's 0.2-1.05), whole epochs
    assert probe.get_xlim() == loss.get_xlim() == pytest.approx((-0.05, 1.05))
    assert list(loss.get_xticks()) == list(probe.get_xticks()) == [0, 1]


def test_a_runs_own_curves_leave_out_values_too_large_to_draw_and_escape_its_folder_name(tmp_path, monkeypatch):
    """Training redraws curves.png from metrics.csv at every epoch: a loss that blew up to 1e308 beside
    -1e308 ("arange: cannot compute length"), an epoch of -1 (a division by 0) or a folder named with a
    byte that is not UTF-8 (matplotlib's font code refused it) stopped the figure for the rest of the run.
    The values it can draw are drawn, the others left out, the folder's name escaped."""
    import os

    import byol.jobs.curves as curves

    run = tmp_path / os.fsdecode(b"run\xff")
    run.mkdir()
    rows = ["epoch,step,train/loss/avgpool_epoch,monitor/knn/avgpool", ",0,,0.3", "0,3,2.0,0.35", "1,7,1e308,inf",
            "2,11,-1e308,0.5", "3,15,1.0,0.6", "-1,19,,"]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    figures, save = [], curves._save
    monkeypatch.setattr(curves, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    assert curves.write_curves(run) == run / "curves.png"
    assert Image.open(run / "curves.png").size[0] > 1000
    (fig,) = figures
    (loss,), (knn,) = fig.axes[0].get_lines(), fig.axes[1].get_lines()
    assert (list(loss.get_xdata()), list(loss.get_ydata())) == ([1.0, 4.0], [2.0, 1.0])
    assert list(knn.get_xdata()) == [0.0, 1.0, 3.0, 4.0]
    assert list(knn.get_ydata()) == pytest.approx([30.0, 35.0, 50.0, 60.0])
    assert fig._suptitle.get_text() == "run\\xff: learning curves (metrics.csv)"


def test_the_epoch_line_shows_knn_only_for_the_epoch_it_ran_in():
    from types import SimpleNamespace

    from byol.lightning.epoch_output import EpochSummary

    knn = SimpleNamespace(epoch=1, last={"avgpool": 0.412, "combined": 0.45}, seconds=3.0)
    summary = EpochSummary(knn)
    assert summary.knn_text(1) == (", kNN avgpool 41.2% combined 45.0% (3 s)", 3.0)
    assert summary.knn_text(2) == ("", 0.0)  # monitor.every_n_epochs > 1: no stale scores, no time taken off
    assert EpochSummary().knn_text(1) == ("", 0.0)


def test_curves_are_redrawn_in_at_most_a_twentieth_of_the_time(monkeypatch):
    """A 1 s redraw runs at most once per 20 s: every epoch of 40 s epochs, every 5th of 4 s epochs; not in
    a run's first 20 s (a 15 s run is drawn once, by the job, at its end); never on epoch 0 (nothing logged
    yet) nor on ranks other than 0; one failure stops the redraws, not the run."""
    import types

    import byol.lightning.epoch_output as callbacks

    clock = {"now": 0.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["now"])
    for epoch_seconds, expected in ((40.0, list(range(1, 15))), (4.0, [5, 10]), (1.0, [])):
        calls, at = [], {"epoch": 0}

        def draw(calls=calls, at=at):
            calls.append(at["epoch"])
            clock["now"] += 1.0  # the redraw's own second

        hook = EpochHook(draw)
        hook.on_train_start(None, None)
        for epoch in range(15):
            at["epoch"] = epoch
            hook.on_train_epoch_start(types.SimpleNamespace(global_rank=0, current_epoch=epoch), None)
            hook.on_train_epoch_start(types.SimpleNamespace(global_rank=1, current_epoch=epoch), None)
            clock["now"] += epoch_seconds
        assert calls == expected, epoch_seconds

    def broken():
        raise ValueError("no display")

    hook = EpochHook(broken)
    hook.on_train_epoch_start(types.SimpleNamespace(global_rank=0, current_epoch=1), None)
    assert hook.failed


def test_parameter_groups_on_one_schedule_draw_one_learning_rate_line():
    """LARS's two groups (weights; biases and norms) follow one schedule: one line, not two on top of each
    other; a group on another schedule keeps its line, and identical accuracies of two blocks keep theirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from byol.jobs.curves import PANELS, _draw

    rate = [(0.5, 0.1), (1.0, 0.05)]
    series = {"lr-LARS/pg1": rate, "lr-LARS/pg2": list(rate), "lr-LARS/pg3": [(0.5, 0.2), (1.0, 0.1)],
              "monitor/knn/layer2.0": [(1.0, 1.0)], "monitor/knn/layer3.0": [(1.0, 1.0)]}
    fig, axes = plt.subplots(2, 3)
    _draw(axes, [("", series, {})])
    panels = {title: ax for ax, (title, *_) in zip(axes.flat, PANELS, strict=True)}
    assert [line.get_label() for line in panels["learning rate"].get_lines()] == [
        "LARS: weights and biases & BN", "LARS: parameter group 3"]  # Lightning's pg1/pg2 in words
    knn = panels["online kNN accuracy (epoch 0: random init)"]
    assert [line.get_label() for line in knn.get_lines()] == ["layer2.0", "layer3.0"]
    plt.close(fig)


def test_a_panel_with_nothing_logged_says_so_and_the_monitor_panels_say_why():
    """A run with monitor=off (or unlabeled data) logs no monitor/ columns: its kNN and probe panels name that
    reason; another empty panel says only that nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from byol.jobs.curves import PANELS, _draw

    fig, axes = plt.subplots(2, 3)
    _draw(axes, [("", {"train/loss/avgpool": [(1.0, 0.9), (2.0, 0.8)]}, {})])
    said = {title: [t.get_text() for t in ax.texts] for ax, (title, *_) in zip(axes.flat, PANELS, strict=True)}
    assert said["BYOL loss per head (lower is not better if std collapses)"] == []
    for title in ("online kNN accuracy (epoch 0: random init)", "online linear probe (training batches)"):
        assert said[title] == ["not logged\n(monitor=off, or data without labels)"]
    assert said["EMA tau"] == ["not logged"]
    plt.close(fig)


def test_values_equal_but_for_rounding_draw_as_a_flat_line_not_an_axis_of_rounding_noise():
    """A constant tau of 0.96 read back as 0.9599999785 (float32) and 0.96 (earlier runs' metrics.csv):
    the panel shows 0.96 flat within a readable range, not '1e-8+9.6e-1' ticks; real changes keep their zoom
    (the loss's here; the collapse monitor is drawn from 0: test_the_collapse_monitor_is_drawn_from_zero...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from byol.jobs.curves import PANELS, _draw

    fig, axes = plt.subplots(2, 3)
    series = {"train/tau": [(0.5, 0.9599999785423279), (1.0, 0.96), (1.5, 0.9599999785423279)],
              "train/loss/avgpool": [(1.0, 0.8300), (2.0, 0.8305)]}
    _draw(axes, [("", series, {})])
    panels = {title: ax for ax, (title, *_) in zip(axes.flat, PANELS, strict=True)}
    low, high = panels["EMA tau"].get_ylim()
    assert low == pytest.approx(0.912) and high == pytest.approx(1.008)
    low, high = panels["BYOL loss per head (lower is not better if std collapses)"].get_ylim()
    assert high - low < 0.01  # a change of 5e-4 is drawn as a change
    plt.close(fig)


def test_the_collapse_monitor_is_drawn_from_zero_and_an_empty_panel_has_no_ticks():
    """Autoscaled, a healthy std of 0.830-0.834 filled the panel as a wild zig-zag, and collapse (toward 0) was
    off the axis; the empty kNN and probe panels of a run without monitors showed 0-1 ticks beside "accuracy, %"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from byol.jobs.curves import PANELS, _draw

    collapse = "collapse monitor: std of projections (0 = collapsed)"
    for stds, limits in (([0.830, 0.834, 0.831], (0.0, 1.0)), ([1.2, 1.5, 1.4], (0.0, 1.5))):
        fig, axes = plt.subplots(2, 3)
        _draw(axes, [("", {"train/std/avgpool": list(zip((1.0, 2.0, 3.0), stds, strict=True)),
                           "train/loss/avgpool": [(1.0, 3.0), (2.0, 2.5)]}, {})])
        panels = {title: ax for ax, (title, *_) in zip(axes.flat, PANELS, strict=True)}
        assert panels[collapse].get_ylim() == pytest.approx(limits)
        for title in ("online kNN accuracy (epoch 0: random init)", "online linear probe (training batches)"):
            assert list(panels[title].get_yticks()) == [] and list(panels[title].get_xticks()) == []
        assert list(panels["BYOL loss per head (lower is not better if std collapses)"].get_yticks())  # drawn: ticks
        plt.close(fig)


def test_a_flat_panel_is_centred_on_its_value_in_the_units_drawn_zero_and_negative_values_included():
    """The flat range is +-5% of the value as drawn (a percent panel in %), +-1 around an all-zero line, the
    right way up for a negative constant; a change of 1e-5 (more than rounding) keeps its zoom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from byol.jobs.curves import PANELS, _draw, _flat_if_constant

    fig, axes = plt.subplots(2, 3)
    series = {"monitor/knn/avgpool": [(1.0, 0.1), (2.0, 0.1), (3.0, 0.1)],  # a kNN at chance, 10%
              "train/tau": [(1.0, 0.9), (2.0, 0.9 + 9e-6)]}
    _draw(axes, [("", series, {})])
    panels = {title: ax for ax, (title, *_) in zip(axes.flat, PANELS, strict=True)}
    assert panels["online kNN accuracy (epoch 0: random init)"].get_ylim() == pytest.approx((9.5, 10.5))
    low, high = panels["EMA tau"].get_ylim()
    assert high - low < 1e-4
    plt.close(fig)
    fig, ax = plt.subplots()
    _flat_if_constant(ax, [0.0, 0.0])
    assert ax.get_ylim() == pytest.approx((-1.0, 1.0))
    _flat_if_constant(ax, [-0.5, -0.5 + 1e-8])
    assert ax.get_ylim() == pytest.approx((-0.525, -0.475))
    plt.close(fig)


def test_online_probes_count_each_representations_correct_predictions_and_keep_them_in_their_state():
    """The probes' accuracy: per representation, the predictions of its probe before the step that equal
    the labels, counted over the epoch's batches; a state saved mid-epoch carries the counts on."""
    from types import SimpleNamespace

    from byol.lightning.monitors import OnlineProbes

    dims = {"avgpool": 8, "layer2.0": 4}
    reps = {"avgpool": ["avgpool"], "layer2.0": ["layer2.0"], "combined": ["avgpool", "layer2.0"]}
    probes = OnlineProbes(reps, dims, num_classes=3, seed=0)
    module = SimpleNamespace(model=SimpleNamespace())
    trainer = SimpleNamespace(world_size=1)
    gen = torch.Generator().manual_seed(2)
    expected = dict.fromkeys(reps, 0)
    for step in range(4):
        features = {tap: torch.randn(16, d, generator=gen) for tap, d in dims.items()}
        labels = torch.randint(0, 3, (16,), generator=gen)
        for name, taps in reps.items():  # what each probe predicts before its step, on the same batch
            head = probes.heads[name.replace(".", "_")]
            before = head.training
            head.train()  # the probe's BatchNorm standardises with the batch's statistics, as in its step
            with torch.no_grad():
                running = [b.clone() for b in head.buffers()]
                predicted = head(torch.cat([features[t] for t in taps], dim=1)).argmax(1)
                for b, saved in zip(head.buffers(), running, strict=True):
                    b.copy_(saved)
            head.train(before)
            expected[name] += int((predicted == labels).sum())
        module.model.last_features = features
        probes.on_train_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, (None, labels), step)
    assert {name: int(count) for name, count in probes.correct_counts().items()} == expected
    assert len(set(expected.values())) == len(expected)  # distinct counts: none can stand in for another

    resumed = OnlineProbes(reps, dims, num_classes=3, seed=1)
    resumed.load_state_dict(probes.state_dict())
    assert {name: int(c) for name, c in resumed.correct_counts().items()} == expected and resumed._seen == 64


def test_probe_state_that_does_not_fit_the_probes_is_not_loaded_and_said(capsys):
    """The probes of other monitor settings (resume=RUN monitor.taps=[...]), or a damaged state: the probes
    start again from their initialisation with a note, instead of a traceback; they are not what the run trains."""
    from byol.lightning.monitors import OnlineProbes

    reps = {"avgpool": ["avgpool"]}
    probes = OnlineProbes(reps, {"avgpool": 8}, num_classes=3, seed=0)
    initial = {k: v.clone() for k, v in probes.heads.state_dict().items()}
    other = OnlineProbes(reps, {"avgpool": 16}, num_classes=3, seed=1).state_dict()
    damaged = dict(probes.state_dict(), seen="many")
    for state, problem in ((other, "3 tensors of another shape"), (damaged, "seen is 'many'"),
                           ({"heads": {"avgpool.1.weight": "x"}, "optimizer": {}}, "heads['avgpool.1.weight'] is 'x'"),
                           ([], "it is [], not a mapping")):
        probes.load_state_dict(state)
        out = capsys.readouterr().out
        assert out.startswith("[byol] note: the online probes' state does not fit these probes (") and problem in out
        assert all(torch.equal(v, initial[k]) for k, v in probes.heads.state_dict().items())
    probes.load_state_dict(OnlineProbes(reps, {"avgpool": 8}, num_classes=3, seed=1).state_dict())  # fits: loads
    assert capsys.readouterr().out == "" and not torch.equal(probes.heads.state_dict()["avgpool.1.weight"],
                                                             initial["avgpool.1.weight"])


def test_the_monitors_take_their_samples_from_the_loaded_training_images_without_copying_them(tmp_path, monkeypatch):
    """The bank and queries are the ones drawn from evaluation's own splits (load_eval_data, seeded samples), taken
    from the training images the job has loaded already: no second load, and the splits hold row numbers, so only
    the samples are copied (a folder that fills half the memory fit once, not three times)."""
    from conftest import class_folders, plain_config

    from byol.core.data import ImageTensors, seeded_subset
    from byol.jobs import datasets, monitoring
    from byol.jobs.datasets import load_eval_data, load_split
    from byol.jobs.monitoring import monitor_samples

    class_folders(tmp_path / "data" / "train", per_class=20, classes=("a", "b", "c"))
    class_folders(tmp_path / "data" / "test", per_class=6, classes=("a", "b", "c"))
    config = plain_config(compose_config("train", [
        "experiment=smoke", "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.cache_dir=null",
        "data.image_size=8", "data.subset=30", "monitor.bank_size=25", "monitor.query_size=10", "monitor.val_size=6"],
        tmp_path))
    splits, num_classes = load_eval_data(config["data"], {"name": "holdout", "val_size": 6}, config["seed"])
    expected = (seeded_subset(splits["train"], 25, config["seed"]),
                seeded_subset(splits["test"], 10, config["seed"] + 1))
    train = load_split(config["data"], "train")
    copies = []
    subset = ImageTensors.subset
    monkeypatch.setattr(ImageTensors, "subset", lambda self, index: (copies.append(len(index) * (not self.mapped)),
                                                                      subset(self, index))[1])
    loads = []
    monkeypatch.setattr(monitoring, "load_split", lambda *a, **k: (loads.append(a[1]), load_split(*a, **k))[1])
    monkeypatch.setattr(datasets, "load_split", lambda *a, **k: (loads.append(a[1]), load_split(*a, **k))[1])
    samples = monitor_samples(config, train)
    assert loads == ["test"]  # the training images are the job's own
    assert max([n for n in copies if n], default=0) <= 10  # the test split's queries; training rows: references
    assert samples.num_classes == num_classes == 3 and not samples.bank.mapped and not samples.queries.mapped
    for got, want in zip((samples.bank, samples.queries), expected, strict=True):
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    monkeypatch.undo()
    again = monitor_samples(config)  # loading the images itself: the same samples
    assert torch.equal(again.bank.images, samples.bank.images) and torch.equal(again.queries.images,
                                                                               samples.queries.images)
