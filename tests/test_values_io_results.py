"""An earlier evaluation kept whole when a folder is evaluated again (its results.json left in place until
replaced, named by its own time, never overwritten nor renamed twice), and the epochs a checkpoint's run
planned read from the run folder's config.yaml (a resume with more epochs rewrites it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import pytest
import torch
from omegaconf import OmegaConf

from byol.jobs.pretrained import read_pretrained
from byol.jobs.replaced import REPLACING, keep_earlier_evaluation, undo_unfinished_evaluation


def stamped(path, when: tuple) -> str:
    """Give ``path`` the local time ``when`` (year, month, day, hour, minute, second) as mtime; that time's stamp."""
    t = time.mktime((*when, 0, 0, -1))
    os.utime(path, (t, t))
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


def test_an_earlier_result_stays_in_place_and_is_kept_under_its_own_time(tmp_path):
    (tmp_path / "results.json").write_text('{"status": "ok", "test_acc": 0.5}\n')
    (tmp_path / "metrics.csv").write_text("step,val/acc\n0,0.5\n")
    stamp = stamped(tmp_path / "results.json", (2021, 3, 4, 5, 6, 7))
    kept = keep_earlier_evaluation(tmp_path)
    assert stamp == "20210304-050607"
    assert kept == ["results.replaced-20210304-050607.json", f"metrics.replaced-{stamp}.csv"]
    assert (tmp_path / "results.json").read_text() == '{"status": "ok", "test_acc": 0.5}\n'  # until replaced
    assert (tmp_path / kept[0]).read_text() == '{"status": "ok", "test_acc": 0.5}\n'
    assert not (tmp_path / "metrics.csv").exists() and (tmp_path / kept[1]).read_text() == "step,val/acc\n0,0.5\n"


def test_two_results_of_the_same_second_are_both_kept(tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"run": 1}')
    stamp = stamped(results, (2021, 3, 4, 5, 6, 7))
    first = keep_earlier_evaluation(tmp_path)
    results.write_text('{"run": 2}')
    stamped(results, (2021, 3, 4, 5, 6, 7))
    second = keep_earlier_evaluation(tmp_path)
    assert first == [f"results.replaced-{stamp}.json"] and second == [f"results.replaced-{stamp}-2.json"]
    assert json.loads((tmp_path / first[0]).read_text()) == {"run": 1}
    assert json.loads((tmp_path / second[0]).read_text()) == {"run": 2}


def test_maps_kept_before_are_not_renamed_again(tmp_path):
    old_map = tmp_path / "tsne_avgpool.replaced-20200101-000000.png"
    old_map.write_text("first map")
    (tmp_path / "tsne_avgpool.png").write_text("second map")
    (tmp_path / "results.json").write_text(json.dumps({"maps": {"avgpool": "tsne_avgpool.png"}}))
    stamp = stamped(tmp_path / "results.json", (2021, 3, 4, 5, 6, 7))
    kept = keep_earlier_evaluation(tmp_path)
    assert sorted(kept) == [f"results.replaced-{stamp}.json", f"tsne_avgpool.replaced-{stamp}.png"]
    assert old_map.read_text() == "first map"  # the earlier kept results still name it
    assert json.loads((tmp_path / kept[0]).read_text())["maps"] == {"avgpool": f"tsne_avgpool.replaced-{stamp}.png"}


def test_a_checkpoints_planned_epochs_come_from_its_run_folder(smoke_config, tmp_path):
    """A run resumed with more epochs rewrites its config.yaml, not its earlier checkpoints: a checkpoint in
    RUN/checkpoints of 3 epochs, whose run now plans 5, is incomplete; the same file elsewhere is complete."""
    blob = {"byol_config": smoke_config("trainer.max_epochs=3"), "epoch": 2, "global_step": 12,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 3}}}},
            "state_dict": {"model.online_encoder.body.conv1.weight": torch.zeros(1)}}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(blob, run / "checkpoints" / "epoch0003.ckpt")
    OmegaConf.save(OmegaConf.create(smoke_config("trainer.max_epochs=5")), run / "config.yaml")
    inside = read_pretrained(run / "checkpoints" / "epoch0003.ckpt")
    assert (inside.epochs, inside.planned_epochs, inside.pretrain_status) == (3, 5, "incomplete")
    (tmp_path / "elsewhere").mkdir()
    torch.save(blob, tmp_path / "elsewhere" / "epoch0003.ckpt")
    alone = read_pretrained(tmp_path / "elsewhere" / "epoch0003.ckpt")
    assert (alone.epochs, alone.planned_epochs, alone.pretrain_status) == (3, 3, "complete")


def _earlier_evaluation(folder) -> dict:
    """A finished evaluation's files in ``folder``: name -> text."""
    files = {"results.json": '{"status": "ok", "test_acc": 0.5}\n', "config.yaml": "repr: {name: avgpool}\n",
             "metrics.csv": "epoch,val/acc\n0,0.5\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


def _texts(folder) -> dict:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_an_evaluation_killed_before_its_result_is_undone_and_the_earlier_one_kept_once(tmp_path, capsys):
    """A re-evaluation killed (SIGKILL: no handler ran) after the earlier files were kept left the old
    results.json beside the new config.yaml and metrics.csv, and the next run kept the old result a second
    time. The next run now puts the earlier evaluation back first: one kept copy, beside its own config."""
    earlier = _earlier_evaluation(tmp_path)
    stamp = stamped(tmp_path / "results.json", (2021, 3, 4, 5, 6, 7))
    keep_earlier_evaluation(tmp_path)
    for name in ("config.yaml", "metrics.csv", "embeddings.pt"):  # the killed evaluation's partial outputs
        (tmp_path / name).write_text(f"killed {name}")
    undone = undo_unfinished_evaluation(tmp_path)
    assert sorted(undone) == ["config.yaml", "metrics.csv"]
    assert _texts(tmp_path) == earlier  # exactly the folder before: no kept copies, no record, no partial files
    out = capsys.readouterr().out
    assert "an evaluation stopped there before writing its result: its partial outputs are removed" in out
    keep_earlier_evaluation(tmp_path)
    for name in ("config.yaml", "metrics.csv"):
        (tmp_path / name).write_text(f"killed again {name}")
    kept = keep_earlier_evaluation(tmp_path)  # the undo happens inside: the next evaluation's keep
    assert kept == [f"results.replaced-{stamp}.json", f"config.replaced-{stamp}.yaml", f"metrics.replaced-{stamp}.csv"]
    assert [(tmp_path / n).read_text() for n in kept] == [earlier[n] for n in ("results.json", "config.yaml",
                                                                               "metrics.csv")]
    assert len(list(tmp_path.glob("*.replaced-*"))) == 3 and (tmp_path / REPLACING).is_file()


def test_a_result_written_before_the_kill_stays_with_its_files(tmp_path):
    """Killed between its results.json and the end of the record: the new evaluation finished, and nothing of it
    is undone; the earlier one stays kept."""
    _earlier_evaluation(tmp_path)
    kept = keep_earlier_evaluation(tmp_path)
    new = {"results.json": '{"status": "ok", "test_acc": 0.7}\n', "config.yaml": "new", "metrics.csv": "new"}
    for name, text in new.items():
        (tmp_path / name).write_text(text)
    assert undo_unfinished_evaluation(tmp_path) == []
    assert {n: t for n, t in _texts(tmp_path).items() if ".replaced-" not in n} == new
    assert sorted(p.name for p in tmp_path.glob("*.replaced-*")) == sorted(kept)


def test_a_record_that_is_not_ours_moves_nothing(tmp_path):
    """The record is read from a folder a user may hand over: names with a path, or not kept ones, move nothing."""
    files = _earlier_evaluation(tmp_path)
    (tmp_path / "elsewhere.txt").write_text("not an output")
    digest = hashlib.sha256((tmp_path / "results.json").read_bytes()).hexdigest()  # as if it were the kept one
    for record in ({"results": "../x.replaced-1.json", "moved": {}, "sha256": digest},
                   {"results": "results.replaced-1.json", "moved": {"config.yaml": "elsewhere.txt"}, "sha256": digest},
                   {"results": "results.replaced-1.json", "moved": {"/etc/passwd": "config.replaced-1.yaml"},
                    "sha256": digest},
                   ["not", "a", "record"]):
        (tmp_path / REPLACING).write_text(json.dumps(record))
        assert undo_unfinished_evaluation(tmp_path) == []
        left = {n: t for n, t in _texts(tmp_path).items() if n != REPLACING}
        assert left == {**files, "elsewhere.txt": "not an output"}


def test_a_crafted_record_moves_or_removes_nothing_and_never_fails(tmp_path):
    """The record is read from a folder a user may hand over. One whose names have the right form but are not
    what an evaluation keeps (weights, a user's file, another earlier kept result, a folder, a link, a NUL
    byte, JSON nested too deep) moved files that are not evaluation outputs over others, removed the folder's
    config.yaml and metrics.csv or an earlier kept result, or stopped the evaluation with a traceback."""
    stamp = "20200101-000000"
    results = f"results.replaced-{stamp}.json"

    def folder(name: str):
        where = tmp_path / name
        where.mkdir()
        files = _earlier_evaluation(where)
        digest = hashlib.sha256((where / "results.json").read_bytes()).hexdigest()
        return where, files, digest

    cases = {
        "weights": ({f"config.replaced-{stamp}.yaml": "a user's", "encoder.pt": "weights"},
                    {"moved": {"encoder.pt": f"config.replaced-{stamp}.yaml"}}),
        "a user's file": ({"notes.replaced-by-hand.txt": "notes"},
                          {"moved": {"results.json": "notes.replaced-by-hand.txt"}}),
        "another kept result": ({results: '{"status": "ok", "test_acc": 0.1}\n'}, {"moved": {}}),
        "not a kept name": ({results: '{"status": "ok", "test_acc": 0.5}\n', "notes.replaced-by-hand.txt": "notes"},
                            {"moved": {"config.yaml": "notes.replaced-by-hand.txt"}}),
        "NUL": ({}, {"results": f"results.replaced-{stamp}\0.json", "moved": {}}),
        "results a folder": ({f"{results}/x": "x"}, {"moved": {}}),
    }
    for name, (extra, record) in cases.items():
        where, files, digest = folder(name.replace(" ", "_"))
        for path, text in extra.items():
            (where / path).parent.mkdir(exist_ok=True)
            (where / path).write_text(text)
        before = {p: p.read_bytes() if p.is_file() else None for p in where.rglob("*")}
        (where / REPLACING).write_text(json.dumps({"results": results, "sha256": digest, **record}))
        assert undo_unfinished_evaluation(where) == [], name
        assert {p: p.read_bytes() if p.is_file() else None for p in where.rglob("*") if p.name != REPLACING} \
            == before, name
        assert (where / "results.json").read_text() == files["results.json"], name
    where, files, digest = folder("kept_a_link")  # the record is this program's, its kept config.yaml a link
    (tmp_path / "outside.yaml").write_text("outside")
    (where / f"config.replaced-{stamp}.yaml").symlink_to(tmp_path / "outside.yaml")
    (where / results).write_text(files["results.json"])
    (where / REPLACING).write_text(json.dumps({"results": results, "sha256": digest,
                                               "moved": {"config.yaml": f"config.replaced-{stamp}.yaml"}}))
    assert undo_unfinished_evaluation(where) == []  # the link does not take config.yaml's name
    assert (where / "config.yaml").read_text() == files["config.yaml"] and not (where / "config.yaml").is_symlink()
    assert (where / f"config.replaced-{stamp}.yaml").is_symlink() and (tmp_path / "outside.yaml").read_text() == \
        "outside"
    where, files, digest = folder("a_folder_in_the_way")  # a folder where a kept file would go back: left
    (where / "config.yaml").unlink()
    (where / "config.yaml").mkdir()
    (where / f"config.replaced-{stamp}.yaml").write_text("kept")
    (where / results).write_text(files["results.json"])
    (where / REPLACING).write_text(json.dumps({"results": results, "sha256": digest,
                                               "moved": {"config.yaml": f"config.replaced-{stamp}.yaml"}}))
    assert undo_unfinished_evaluation(where) == []
    assert (where / "config.yaml").is_dir() and (where / f"config.replaced-{stamp}.yaml").read_text() == "kept"
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "results.json").write_text("[" * 100000)  # a results.json nested too deep, kept as it is
    (deep / REPLACING).write_text("[" * 60000)
    assert [n.split(".replaced-")[0] for n in keep_earlier_evaluation(deep)] == ["results"]
    assert json.loads((deep / REPLACING).read_text())["moved"] == {}  # the evaluation's own record, written
    elsewhere, _, _ = folder("elsewhere")
    keep_earlier_evaluation(elsewhere)  # a record of another folder, linked in (here a copy's): not followed
    linked = tmp_path / "linked"
    shutil.copytree(elsewhere, linked)
    (linked / REPLACING).unlink()
    (linked / REPLACING).symlink_to(elsewhere / REPLACING)
    before = _texts(linked)
    assert undo_unfinished_evaluation(linked) == [] and _texts(linked) == before


def test_an_undo_stopped_half_way_is_finished_by_the_next_and_loses_nothing(tmp_path, monkeypatch):
    """Ctrl+C pressed twice: the second one stopped the undo of the first after a kept file had taken its name
    back. The next undo removed it as a partial output, and the earlier evaluation's config.yaml was lost."""
    from pathlib import Path

    earlier = _earlier_evaluation(tmp_path)
    keep_earlier_evaluation(tmp_path)
    for name in ("config.yaml", "metrics.csv"):
        (tmp_path / name).write_text(f"stopped {name}")
    replace, calls = Path.replace, []

    def second_ctrl_c(self, target):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(self, target)

    monkeypatch.setattr(Path, "replace", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        undo_unfinished_evaluation(tmp_path)
    monkeypatch.setattr(Path, "replace", replace)
    assert (tmp_path / REPLACING).is_file()  # the undo is not done
    undo_unfinished_evaluation(tmp_path)
    assert _texts(tmp_path) == earlier
