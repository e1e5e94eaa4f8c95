"""Files and folders handed to us stay data, whatever is planted in them: an image in a format whose
decoder runs a program, links where a job writes (under predictable names, deep in a folder), a config
that repeats itself into 2**64 values, text that a spreadsheet runs or a markdown viewer renders, and
machine settings (cache folder, download) named by a run made elsewhere."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
import torch
from conftest import class_folders, compose_config, plain_config

from byol.core.checkpoint import save_encoder
from byol.core.errors import ByolError, ConfigError, DataError
from byol.core.image_folder import load_image_folder
from byol.jobs.config_check import check_file_config, check_plain
from byol.jobs.evaluate import evaluate
from byol.jobs.evaluation_data import EvaluationData, data_group_defaults
from byol.jobs.replaced import keep_earlier_evaluation
from byol.jobs.report_cells import csv_row, md_cell
from byol.jobs.run_folder import FolderTakenError, check_job_folder, links_in

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
       b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill showpage\n")




# --------------------------------------------------------------------------- images


def test_an_image_whose_content_is_postscript_never_reaches_ghostscript(tmp_path, monkeypatch):
    import PIL.EpsImagePlugin as eps

    marker = tmp_path / "ghostscript_ran"
    fake_gs = tmp_path / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    fake_gs.chmod(fake_gs.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(eps, "gs_binary", str(fake_gs))  # as if Ghostscript were installed
    data = class_folders(tmp_path / "train", 3)
    (data / "cat" / "zz_evil.png").write_bytes(EPS)  # named .png; Pillow picks a decoder by content
    with pytest.raises(DataError, match=r"cannot read image '.*zz_evil.png'.*data.skip_bad_files"):
        load_image_folder(data, 8, workers=1)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        kept = load_image_folder(data, 8, workers=1, skip_bad_files=True)
    assert len(kept.images) == 6 and not marker.exists()


def test_the_memory_mapped_cache_is_never_written_through_a_planted_link(tmp_path):
    data, cache, victim = class_folders(tmp_path / "train", 3), tmp_path / "cache", tmp_path / "victim.txt"
    victim.write_text("precious")
    cache.mkdir()
    first = load_image_folder(data, 8, cache_dir=cache, workers=1, storage="mmap")
    npy = next(cache.glob("*.u8.npy"))
    for p in cache.iterdir():
        p.unlink()
    # links under every name a writer of this cache used or might use: the temporary names, the file itself
    for name in (f"{npy.name}.tmp{os.getpid()}", f"{npy.name}.tmp{os.getpid()}b", npy.name):
        (cache / name).symlink_to(victim)
    again = load_image_folder(data, 8, cache_dir=cache, workers=1, storage="mmap")
    assert victim.read_text() == "precious"
    assert torch.equal(again.images, first.images) and not npy.is_symlink()
    assert oct(npy.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the usual permissions, not mkstemp's


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- links in folders


def test_a_link_deep_in_a_run_folder_that_leads_out_is_refused(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "tb").mkdir(parents=True)
    (run / "0_job" / "deeper").mkdir(parents=True)
    (run / "tb" / "hparams.yaml").symlink_to(outside / "created.yaml")  # dangling: writing would create it
    (run / "0_job" / "deeper" / "metrics.csv").symlink_to(outside / "metrics.csv")
    (run / "wandb").mkdir()
    (run / "wandb" / "run-1").mkdir()
    (run / "wandb" / "latest-run").symlink_to("run-1")  # wandb's own link, inside the folder
    assert links_in(run) == [run / "0_job" / "deeper" / "metrics.csv", run / "tb" / "hparams.yaml"]
    with pytest.raises(FolderTakenError, match="symbolic links where jobs write.*hparams.yaml"):
        check_job_folder(run, "train")
    for link in links_in(run):
        link.unlink()
    check_job_folder(run, "train")  # the link that stays inside is fine
    assert not outside.exists()


def test_a_loop_of_links_in_a_subfolder_is_refused_not_followed(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "a").symlink_to(run / "logs" / "b")
    (run / "logs" / "b").symlink_to(run / "logs" / "a")
    assert links_in(run) == [run / "logs" / "a", run / "logs" / "b"]


def test_metrics_csv_as_a_link_is_replaced_not_written_through(tmp_path):
    from byol.lightning.csv_logger import ContinuingCSVLogger

    target = tmp_path / "elsewhere.csv"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").symlink_to(target)  # dangling: Lightning would create it
    logger = ContinuingCSVLogger(tmp_path / "run")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    assert not target.exists() and not (tmp_path / "run" / "metrics.csv").is_symlink()
    assert "train/loss" in (tmp_path / "run" / "metrics.csv").read_text()


def test_an_earlier_result_that_is_a_link_is_not_copied(tmp_path):
    secret, folder = tmp_path / "secret.txt", tmp_path / "ev"
    secret.write_text("not for the report")
    folder.mkdir()
    (folder / "results.json").symlink_to(secret)
    assert keep_earlier_evaluation(folder) == []
    assert not any("not for the report" in p.read_text() for p in folder.iterdir() if not p.is_symlink())


# --------------------------------------------------------------------------- configs in files


def bomb(levels: int = 64) -> list:
    """A few hundred bytes pickled, 2**levels values when walked: every level holds the one below twice."""
    x: list = []
    for _ in range(levels):
        x = [x, x]
    return x


@pytest.mark.parametrize("check", [lambda v: check_file_config({"seed": 0, "zz": v}, "f"),
                                   lambda v: check_plain({"epochs": 1, "meta": v}, "m")])
def test_a_config_that_repeats_itself_is_refused_at_once(check):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="holds more than 100000 values or nests deeper than 32"):
        check(bomb())
    assert time.perf_counter() - start < 5  # not 2**64 steps (a hang); generous for a loaded machine


def test_a_config_nested_without_end_is_refused_and_a_real_one_passes(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ConfigError, match="nests deeper"):
        check_plain(deep, "deep")
    real = plain_config(compose_config("train", ["experiment=smoke", "loss=multi"], tmp_path))
    assert check_file_config(real, "run")["loss"]["taps"] == real["loss"]["taps"]


def test_a_refusal_shows_a_bounded_piece_of_a_huge_value():
    with pytest.raises(ConfigError) as raised:
        check_plain({"_target_": bomb()}, "file")
    assert len(str(raised.value)) < 400 and "names code to run" in str(raised.value)


def test_an_export_whose_meta_repeats_itself_is_refused(tmp_path):
    from test_evaluation import tiny_encoder

    from byol.jobs.pretrained import read_pretrained

    path = tmp_path / "run" / "encoder.pt"
    path.parent.mkdir()
    save_encoder(tiny_encoder([]), path, meta={"loss": "classic", "epochs": 1, "seed": 0, "zz": bomb()})
    start = time.perf_counter()
    with pytest.raises(ByolError, match="holds more than"):
        read_pretrained(path)
    assert time.perf_counter() - start < 30


def test_a_sweep_job_whose_config_is_refused_does_not_stop_the_others(tmp_path):
    from test_evaluation import _export, _job_config

    sweep = tmp_path / "sweep"
    _export(sweep / "0_bad", "classic", seed=1)
    (sweep / "0_bad" / "config.yaml").write_text("seed: 1\noptim:\n  _target_: os.system\n")
    _export(sweep / "1_good", "multi", seed=2)
    with pytest.raises(ByolError, match="evaluations failed"):
        evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn", "baseline=false"), tmp_path / "ev")
    bad = json.loads((tmp_path / "ev" / "0_bad" / "results.json").read_text())
    good = json.loads((tmp_path / "ev" / "1_good" / "results.json").read_text())
    assert good["status"] == "ok" and bad["status"] == "failed"


def test_a_baseline_is_built_only_for_an_architecture_whose_weights_were_read(tmp_path):
    from test_evaluation import _export, _job_config

    sweep = tmp_path / "sweep"
    _export(sweep / "0_good", "classic", seed=1)
    _export(sweep / "1_corrupt", "multi", seed=2)
    (sweep / "1_corrupt" / "encoder.pt").write_bytes(b"truncated")
    with open(sweep / "1_corrupt" / "config.yaml", "a") as f:
        f.write("  width: 6.0\n")  # a 36 times larger network, named by a config.yaml alone
    with pytest.raises(ByolError, match="evaluations failed"):
        evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn"), tmp_path / "ev")
    baselines = [json.loads(p.read_text()) for p in (tmp_path / "ev").glob("random-init*/results.json")]
    assert [(b["width"], b["seed"]) for b in baselines] == [(1.0, 1)]


def test_a_baseline_is_not_built_for_an_architecture_whose_weights_do_not_fit(tmp_path):
    """An export whose description names a network 36 times larger than its weights: refused, and no baseline of
    that network is built (it was, at the named size: gigabytes for a width of 8, a traceback for 1e6)."""
    from test_evaluation import _export, _job_config

    sweep = tmp_path / "sweep"
    _export(sweep / "0_good", "classic", seed=1)
    export = _export(sweep / "1_foreign", "multi", seed=2)
    blob = torch.load(export, weights_only=True)
    blob["backbone"]["width"] = 6.0
    torch.save(blob, export)
    with pytest.raises(ByolError, match="evaluations failed"):
        evaluate(_job_config(tmp_path, f"pretrained={sweep}", "eval=knn"), tmp_path / "ev")
    foreign = json.loads((tmp_path / "ev" / "1_foreign" / "results.json").read_text())
    assert foreign["status"] == "failed" and "holds weights of another architecture" in foreign["error"]
    baselines = [json.loads(p.read_text()) for p in (tmp_path / "ev").glob("random-init*/results.json")]
    assert [(b["width"], b["seed"]) for b in baselines] == [(1.0, 1)]


UNREADABLE_CONFIGS = {
    "aliases": b"data: &d {name: cifar10}\nextra: *d\n",
    "python tag": b"data: !!python/object/apply:os.system [echo]\n",
    "duplicate key": b"seed: 1\nseed: 2\n",
    "not utf-8": b"seed: 1\nname: \xff\xfe\n",
}


@pytest.mark.parametrize("case", [*UNREADABLE_CONFIGS, "a device"])
def test_a_run_config_that_cannot_be_read_is_refused_not_ignored(tmp_path, case):
    """Evaluation read an unreadable config.yaml as none, and evaluated the weights beside it on its own default
    data (CIFAR-10, downloaded) with status ok: another experiment's score under the run's name."""
    from test_evaluation import _export, _job_config

    export = _export(tmp_path / "run", "classic", seed=1)
    config = tmp_path / "run" / "config.yaml"
    config.unlink()
    if case == "a device":
        config.symlink_to("/dev/zero")
    else:
        config.write_bytes(UNREADABLE_CONFIGS[case])
    with pytest.raises(ConfigError, match=rf"'{config}' is not a readable config \(.*\); repair it, or move it "
                                          rf"away to evaluate the weights beside it on this evaluation's data"):
        evaluate(_job_config(tmp_path, f"pretrained={export}", "eval=knn", "baseline=false"), tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(("data", "refusal"), [
    ("image_size: -3", "data.image_size must be a positive whole number, not -3"),
    ("image_size: 32.5", "data.image_size must be a positive whole number, not 32.5"),
    ("subset: -5", "data.subset must be a positive whole number, not -5"),  # evaluated on 98 of 103 images, ok
    ("num_classes: 10000000", "data.num_classes=10000000 is more than data.num_train=256"),  # ran out of memory
    ("num_train: 1000000000", "data.num_train=1000000000 is more than synthetic data offers"),
])
def test_data_settings_from_a_run_config_are_range_checked(tmp_path, data, refusal):
    """The ranges the command line's settings are held to hold for a run's own (they had their types checked
    only: tracebacks, a silently smaller training split, memory exhausted)."""
    from test_evaluation import _export, _job_config

    export = _export(tmp_path / "run", "classic", seed=1)
    sizes = "" if data.startswith("num_train") else "  num_train: 256\n"
    (tmp_path / "run" / "config.yaml").write_text(f"seed: 1\nloss: {{taps: [], weights: {{}}}}\nbackbone: {{name: "
                                                  f"resnet18, stem: imagenet}}\ndata:\n  name: synthetic\n{sizes}"
                                                  f"  {data}\n")
    with pytest.raises(ConfigError, match=rf"{refusal}.* \(run: data from the run's own settings\)"):
        evaluate(_job_config(tmp_path, f"pretrained={export}", "eval=knn", "baseline=false"), tmp_path / "ev")


# --------------------------------------------------------------------------- the report's files


def test_text_a_spreadsheet_would_run_is_quoted_and_numbers_are_kept():
    row = ["=HYPERLINK(\"http://x\")", "@SUM(A1)", "+1+2", "-cmd|' /C calc'!A0", "\tx", "-0.5000", "-1.2 0.4",
           "classic", 3, None, -2.5]
    assert csv_row(row) == ["'=HYPERLINK(\"http://x\")", "'@SUM(A1)", "'+1+2", "'-cmd|' /C calc'!A0", "'\tx",
                            "-0.5000", "-1.2 0.4", "classic", 3, None, -2.5]


def test_markup_in_a_name_is_shown_as_text_in_the_markdown():
    assert md_cell("<script>alert(1)</script>") == "&lt;script>alert(1)&lt;/script>"
    assert md_cell("<img src=x onerror=y>") == "&lt;img src=x onerror=y>"
    assert md_cell("<0.001") == "<0.001" and md_cell("a < b") == "a < b"


# --------------------------------------------------------------------------- machine settings


def test_a_runs_cache_folder_and_download_setting_are_not_this_machines(tmp_path, capsys):
    composed = plain_config(compose_config("evaluate", ["preset=smoke"], tmp_path))
    run_data = {**data_group_defaults("imagefolder"), "root": "/data/imgs", "cache_dir": "/elsewhere/cache",
                "storage": "mmap", "mmap_above_gb": 0.001}
    data = EvaluationData(composed["data"], [], 0, composed["split"])
    chosen = data.settings({"data": run_data}, "run")
    defaults = data_group_defaults("imagefolder")
    assert (chosen["cache_dir"], chosen["storage"], chosen["mmap_above_gb"]) == (
        defaults["cache_dir"], defaults["storage"], defaults["mmap_above_gb"])
    assert chosen["root"] == "/data/imgs"  # where the data is: the run's
    out = capsys.readouterr().out
    assert "note: data.cache_dir=~/.cache/byol/images" in out and "/elsewhere/cache" in out
    data.settings({"data": run_data}, "another run of the sweep")
    assert "note:" not in capsys.readouterr().out  # said once
    given = compose_config("evaluate", ["preset=smoke", "++data.cache_dir=/mine", "data.root=/other"], tmp_path)
    mine = EvaluationData(plain_config(given)["data"], ["data.cache_dir", "data.root"], 0, composed["split"])
    chosen = mine.settings({"data": run_data}, "run")
    assert (chosen["cache_dir"], chosen["root"], chosen["storage"]) == ("/mine", "/other", defaults["storage"])
    cifar = {**data_group_defaults("cifar10"), "root": "/x", "download": False}
    assert EvaluationData(composed["data"], [], 0, composed["split"]).settings({"data": cifar}, "c")["download"] \
        is data_group_defaults("cifar10")["download"]


def test_a_runs_data_root_is_recorded_absolute_and_an_earlier_relative_one_is_said(tmp_path, monkeypatch, capsys):
    """A run kept data.root as typed (`cifar10`); evaluated or resumed from another folder, that read another
    folder's images, or none, without a word. A run now records the folder it read; a relative root in an
    earlier run's config is read from this folder with a note that says so and how to name another."""
    from byol.jobs.pretrain import run_start

    monkeypatch.chdir(tmp_path)
    class_folders(tmp_path / "imgs" / "train", 2, size=8)
    config = plain_config(compose_config("train", ["experiment=smoke", "data=imagefolder", "data.root=imgs"],
                                         tmp_path / "run"))
    (tmp_path / "run").mkdir()
    start = run_start(config, tmp_path / "run", requested=None)
    assert start.config["data"]["root"] == str(tmp_path / "imgs")
    composed = plain_config(compose_config("evaluate", ["preset=smoke"], tmp_path))
    run_data = {**data_group_defaults("imagefolder"), "root": "imgs"}
    chosen = EvaluationData(composed["data"], [], 0, composed["split"]).settings({"data": run_data}, "run")
    assert chosen["root"] == str(tmp_path / "imgs") and run_data["root"] == "imgs"  # the run's config untouched
    assert (f"[data] note: run's run config names data.root 'imgs', relative to the folder the run was started "
            f"from: read as '{tmp_path / 'imgs'}'; if it was started elsewhere, give data.root=ABSOLUTE_PATH"
            ) in capsys.readouterr().out
    given = plain_config(compose_config("evaluate", ["preset=smoke", "data.root=other"], tmp_path))["data"]
    chosen = EvaluationData(given, ["data.root"], 0, composed["split"]).settings({"data": run_data}, "run")
    assert chosen["root"] == str(tmp_path / "other") and "note: run's run config" not in capsys.readouterr().out


def test_a_runs_training_batch_size_does_not_stop_its_evaluation_data(tmp_path):
    """A sweep job that failed on data.batch_size=2.5 was listed under evaluate.py's default data (cifar10), not
    its own: the range check of a run's data skips pretraining's batch size, which evaluation does not use."""
    composed = plain_config(compose_config("evaluate", ["preset=smoke"], tmp_path))
    run_data = {**data_group_defaults("synthetic"), "batch_size": 2.5}
    chosen = EvaluationData(composed["data"], [], 0, composed["split"]).settings({"data": run_data}, "run")
    assert chosen["name"] == "synthetic"
    with pytest.raises(ConfigError, match="data.image_size must be a positive whole number"):
        EvaluationData(composed["data"], [], 0, composed["split"]).settings(
            {"data": {**run_data, "image_size": 0}}, "run")


def test_a_metrics_csv_with_thousands_of_heads_draws_a_bounded_number_of_lines():
    from byol.jobs.curves import MAX_LINES, PANELS, _draw
    from byol.jobs.figures import pyplot

    series = {f"train/loss/head{i}": [(1.0, 1.0), (2.0, 0.5)] for i in range(300)}
    series["monitor/knn/avgpool"] = [(1.0, 0.3)]
    plt = pyplot()
    fig, axes = plt.subplots(2, 3)
    try:
        _draw(axes, [("", series, {})])
        loss_panel, knn_panel = axes.flat[0], axes.flat[1]
        assert len(loss_panel.lines) == MAX_LINES and len(knn_panel.lines) == 1
        assert loss_panel.get_title() == f"{PANELS[0][0]} ({300 - MAX_LINES} more not drawn)"
        assert knn_panel.get_title() == PANELS[1][0]
    finally:
        plt.close(fig)


@pytest.mark.parametrize("value", [1, -2.5, True, None, "a'b", b"x", [], (), (1,), [1, (2, "x")], {"a": [None, 1.5]},
                                   {"k": {}}, "x" * 100, list(range(30))])
def test_repr_prefix_is_repr_or_its_beginning(value):
    from byol.core.state_check import repr_prefix

    for limit in (5, 40, 500):
        assert repr_prefix(value, limit) == repr(value)[: limit + 1]


def test_a_checkpoint_part_that_repeats_itself_is_named_at_once():
    from byol.core.state_check import repr_prefix, shown
    from byol.lightning.checkpoint_io import lightning_fields_problem

    start = time.perf_counter()
    assert shown(bomb()) == "a list" and len(repr_prefix(bomb(), 80)) == 81
    cycle: list = []
    cycle.append(cycle)  # a list holding itself: repr prints [[...]], a walk without a bound never ends
    assert len(repr_prefix(cycle, 30)) == 31
    problem = lightning_fields_problem({"pytorch-lightning_version": "2.5.0", "callbacks": bomb(), "epoch": 0,
                                        "global_step": 0, "optimizer_states": [], "lr_schedulers": []})
    assert problem == "callbacks is a list, not a mapping of callback names to their states"
    assert time.perf_counter() - start < 5


def test_a_run_whose_data_cannot_be_loaded_fails_alone_in_a_sweep(tmp_path, capsys):
    import yaml
    from test_evaluation import _export

    sweep = tmp_path / "sweep"
    for job, data in (("0_moved", {**data_group_defaults("imagefolder"), "root": str(tmp_path / "gone")}),
                      ("1_good", data_group_defaults("synthetic"))):
        _export(sweep / job, "classic", seed=int(job[0]))
        config = yaml.safe_load((sweep / job / "config.yaml").read_text())
        config.update(data=data, loss={"taps": [], "weights": {}})  # a training run's config: loss.taps
        (sweep / job / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = compose_config("evaluate", ["preset=smoke", f"pretrained={sweep}", "eval=knn", "baseline=false"], tmp_path)
    with pytest.raises(ByolError, match="1 of 2 evaluations failed"):
        evaluate(cfg, tmp_path / "ev")
    moved = json.loads((tmp_path / "ev" / "0_moved" / "results.json").read_text())
    good = json.loads((tmp_path / "ev" / "1_good" / "results.json").read_text())
    assert moved["status"] == "failed" and "gone' does not exist" in moved["error"]
    assert (moved["loss"], moved["seed"]) == ("classic", 0)  # its cell: the weights were read first
    assert good["status"] == "ok" and good["test_acc"] is not None


def test_edited_layouts_loop_counters_and_deep_configs_are_refused_in_one_line(tmp_path):
    """A checkpoint's byol_layout offset was used at any value (lr 0 and tau 1 for the rest of the run at -4, an
    overflow at 10**30), loop counters out of Lightning's order made a resume train nothing and say done, and a
    400 kB config.yaml of brackets kept every folder check busy for minutes. Each is one refusal now."""
    import time

    from byol.core.errors import ConfigError
    from byol.jobs.run_folder import raw_run_config
    from byol.lightning.checkpoint_io import _counters_problem, layout_problem

    def checkpoint(offset=0, world=1, ready=2, processed=2, batches=4):
        counters = {"ready": ready, "started": ready, "processed": processed, "completed": processed}
        return {"global_step": 8, "byol_layout": {"epoch_steps": 4, "world_size": world, "step_offset": offset},
                "loops": {"fit_loop": {"epoch_progress": {"current": counters, "total": counters},
                                       "epoch_loop.batch_progress": {"current": {"ready": batches, "started": batches,
                                                                                 "processed": batches,
                                                                                 "completed": batches}}}}}

    assert layout_problem(checkpoint()) is None and layout_problem(checkpoint(offset=8)) is None
    assert layout_problem(checkpoint(offset=-4, ready=3, batches=2)) is None  # inside epoch 3: step 12 of 12
    for bad in (checkpoint(offset=-4), checkpoint(offset=10**30), checkpoint(offset=9), checkpoint(world=10**30)):
        assert layout_problem(bad), bad["byol_layout"]
    fit_loop = checkpoint()["loops"]["fit_loop"]
    assert _counters_problem(fit_loop) is None
    for edited in (checkpoint(ready=10**30), checkpoint(processed=-1), checkpoint(ready=1, processed=2)):
        assert "not counters Lightning keeps" in _counters_problem(edited["loops"]["fit_loop"])
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.yaml").write_text("a: " + "[" * 200_000 + "]" * 200_000 + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        raw_run_config(deep)
    assert time.perf_counter() - start < 5
    # block sequences nest with neither brackets nor indentation ("- - - x"): 900 kB of them took 85 s and 1 GB
    (deep / "config.yaml").write_text("seed: 0\nbackbone:\n  name:\n  " + "- " * 450_000 + "x\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        raw_run_config(deep)
    assert time.perf_counter() - start < 5
    (deep / "config.yaml").write_text("seed: 0\nbackbone:\n  name:\n  " + "- " * 60 + "x\n")
    assert raw_run_config(deep)["backbone"]["name"]  # 62 levels in all: still read


@pytest.mark.parametrize("text", ["", "# only a comment\n", "model:\n  lr: 0.1\n", "root:x:0:0:root:/root:/bin/bash\n",
                                  "seed: 0\nbackbone:\n  name: resnet18\n"], ids=["empty", "comment", "foreign",
                                                                                 "passwd", "cut-short"])
def test_a_run_folder_whose_config_is_no_runs_config_is_refused_not_scored_on_other_data(tmp_path, text):
    """An empty, comment-only, cut short or other program's config.yaml read as {} and the weights beside it
    were scored on the evaluation's default data, status ok. It is refused, naming what it lacks."""
    from byol.jobs.pretrained import read_run_config

    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"config.yaml' is not a run's config: it lacks (backbone, )?loss"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 0\nbackbone:\n  name: resnet18\nloss:\n  taps: []\n")
    assert read_run_config(tmp_path)["loss"] == {"taps": []}  # the least a run's config holds


def test_a_file_name_that_is_not_utf8_is_cached_like_any_other(tmp_path):
    """Its name's bytes went into the cache key as text, a UnicodeEncodeError in any locale."""
    import os

    import numpy as np
    from PIL import Image

    from byol.core.image_folder import load_image_folder

    for k, cls in enumerate(("a", "b")):
        (tmp_path / "images" / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / "images" / cls / "0.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "images" / "a" / os.fsdecode(b"e\xff.png"))
    first = load_image_folder(tmp_path / "images", 8, tmp_path / "cache")
    again = load_image_folder(tmp_path / "images", 8, tmp_path / "cache")  # from the cache
    assert len(first) == 3 and torch.equal(first.images, again.images)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_pretrained_that_is_a_pipe_or_a_device_is_said_to_be_neither_file_nor_folder(tmp_path):
    """A FIFO or a link to /dev/zero given as pretrained= read "no pretraining run in ..." (as if a folder)."""
    from byol.core.errors import CheckpointError
    from byol.jobs.pretrained import resolve_pretrained

    fifo = tmp_path / "encoder.pt"
    os.mkfifo(fifo)
    device = tmp_path / "zero.pt"
    device.symlink_to("/dev/zero")
    for odd in (fifo, device):
        with pytest.raises(CheckpointError, match=r"is not a regular file or a folder \(a pipe, a device"):
            resolve_pretrained(str(odd), tmp_path / "outputs")


def test_the_data_line_of_a_run_whose_config_is_refused_says_so(tmp_path, capsys):
    """The line naming the data read "from this evaluation's config (no run data)" just above the refusal of that
    run's config.yaml, as if the run had none."""
    from test_evaluation import _export, _job_config

    export = _export(tmp_path / "run", "classic", seed=1)
    (tmp_path / "run" / "config.yaml").write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="is not a run's config: it lacks backbone, loss"):
        evaluate(_job_config(tmp_path, f"pretrained={export}", "eval=knn", "baseline=false"), tmp_path / "ev")
    out = capsys.readouterr().out
    assert "from this evaluation's config (its run's config.yaml is refused: see the error below)" in out
    assert "(no run data)" not in out
