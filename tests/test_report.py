"""The results table: means, sample standard deviations, counts, missing and failed cells, unfinished
and failed pretraining runs, and rows that never pool results of different settings."""

from __future__ import annotations

import csv
import json
import math
import os
import random
from pathlib import Path

import pytest

from byol.jobs.report import main, report
from byol.jobs.report_cells import build_cells, mean_std
from byol.jobs.report_files import load_results
from byol.jobs.report_paired import paired_comparisons


def write(folder: Path, name: str, loss: str, repr_name: str, protocol: str, test=None, val=None,
          status="ok", seed=0, error=None, **fields) -> None:
    """A results.json as evaluate.py writes it; ``fields`` replace or add keys (None: remove the key)."""
    d = folder / name
    d.mkdir(parents=True)
    r = {"pretrained": f"/runs/{name}", "loss": loss, "repr": repr_name, "eval": protocol,
         "backbone": "resnet18", "stem": "imagenet", "pretrain_epochs": 5,
         "eval_epochs": 0 if protocol == "knn" else 100, "seed": seed, "val_acc": val, "test_acc": test,
         "status": status}
    if error:
        r["error"] = error
    r.update(fields)
    (d / "results.json").write_text(json.dumps({k: v for k, v in r.items() if v is not None}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for seed, (t, v) in enumerate([(0.50, 0.40), (0.60, 0.50), (0.70, 0.90)]):
        write(root / "job0", f"classic{seed}", "classic", "avgpool", "linear", t, v, seed=seed)
    write(root / "job0", "multi0", "multi", "avgpool", "linear", 0.80, 0.75)
    write(root / "job0", "multi1", "multi", "avgpool", "linear", status="failed", error="corrupt file")
    write(root / "job0", "random-init", "random-init", "avgpool", "linear", 0.30, 0.35)
    write(root / "job1", "classic0", "classic", "combined", "finetune", status="failed", error="NaN loss")
    write(root / "job2", "classic0", "classic", "avgpool", "knn", 0.45, 0.55)
    (root / "job2" / "notes.txt").write_text("not a result")
    return root


def test_mean_and_sample_std():
    m, s = mean_std([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and s == pytest.approx(0.1)  # sample std (n - 1); population: 0.0816
    m, s = mean_std([0.8])
    assert m == 0.8 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_std([]))


def test_cells_group_results_and_count_runs_and_failures(sweep):
    results = load_results(sorted(sweep.rglob("results.json")))
    cells = {(c.loss, c.repr, c.eval): c for c in build_cells(results)}
    c = cells[("classic", "avgpool", "linear")]
    assert (c.runs, c.failed, c.status) == (3, 0, "ok")
    assert mean_std(c.test) == pytest.approx((0.6, 0.1))
    assert mean_std(c.val) == pytest.approx((0.6, math.sqrt(0.07)))  # deviations -.2, -.1, .3
    m = cells[("multi", "avgpool", "linear")]
    assert (m.runs, m.failed, m.status) == (1, 1, "ok")
    assert cells[("classic", "combined", "finetune")].status == "failed"
    assert cells[("multi", "combined", "finetune")].status == "missing"
    assert cells[("random-init", "avgpool", "linear")].runs == 1
    assert cells[("classic", "avgpool", "knn")].runs == 1
    # expected: classic, multi x avgpool, combined x linear, finetune, knn (each occurs in some result)
    assert sum(c.status == "missing" for c in cells.values()) == 8  # of the 12 expected cells
    assert len(cells) == 12 + 1  # the 12 expected cells, the baseline


def test_report_writes_markdown_csv_and_plot(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    report([sweep], out)
    md = (out / "results.md").read_text()
    assert capsys.readouterr().out.startswith(md)  # the table is printed
    assert "| classic | avgpool | linear | 60.00 ± 10.00 | 60.00 ± 26.46 | 3 | 0 |" in md
    assert "| multi | avgpool | linear | 80.00 | 75.00 | 1 | 1 |" in md
    assert "| random-init | avgpool | linear | 30.00 | 35.00 | 1 | 0 |" in md
    assert "**failed**: NaN loss" in md
    assert "Missing cells (8 of 12 expected)" in md and "multi/combined/finetune" in md
    assert "classic/combined/finetune" in md.split("Failed cells")[1]
    rows = {(r["loss"], r["repr"], r["eval"]): r for r in csv.DictReader(open(out / "results.csv"))}
    r = rows[("classic", "avgpool", "linear")]
    # percent, as in the markdown table
    pct = [float(r[f"{split}_acc_{stat}_pct"]) for split in ("test", "val") for stat in ("mean", "std")]
    assert pct == pytest.approx([60, 10, 60, 100 * math.sqrt(0.07)])
    assert (r["runs"], r["failed"], r["status"], r["eval_epochs"]) == ("3", "0", "ok", "100")
    assert float(rows[("multi", "avgpool", "linear")]["test_acc_mean_pct"]) == pytest.approx(80)
    assert rows[("multi", "avgpool", "linear")]["test_acc_std_pct"] == ""  # one run: no std
    assert rows[("multi", "combined", "linear")]["status"] == "missing"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("field, value, said", [
    ("test_acc", "abc", "test_acc is 'abc', not an accuracy in [0, 1]"),
    ("test_acc", 87.5, "test_acc is 87.5, not an accuracy in [0, 1]"),  # percent where a fraction belongs
    ("val_acc", [0.5], "val_acc is [0.5], not an accuracy in [0, 1]"),
    ("seed", "0", "seed is '0', not a whole number"),
    ("pretrain_epochs", 2.5, "pretrain_epochs is 2.5, not a whole number"),
    ("width", True, "width is True, not a number"),
    ("loss", {"a": 1}, "loss is {'a': 1}, not a str"),
    ("eval_data", "cifar10", "eval_data is 'cifar10', not a dict"),
])
def test_a_results_json_with_a_field_of_the_wrong_kind_is_skipped_and_named(sweep, tmp_path, capsys, field,
                                                                            value, said):
    """results.json files are data from whoever wrote them: one edited by hand is skipped with the field
    named (it was a traceback), and the rest of the sweep is still reported."""
    given = {"loss": "classic", "repr_name": "avgpool", "protocol": "linear", "test": 0.9, "val": 0.9, "seed": 7}
    write(sweep / "job3", "edited", **{**given, {"test_acc": "test", "val_acc": "val"}.get(field, field): value})
    out = tmp_path / "out"
    report([sweep], out)
    captured = capsys.readouterr()
    assert f"[report] note: skipping {(sweep / 'job3' / 'edited' / 'results.json').resolve()}: {said}" in captured.err
    md = (out / "results.md").read_text()
    assert md.split("\n")[2].startswith("9 results.json files (1 skipped, listed below). ")
    assert f"\n- {(sweep / 'job3' / 'edited' / 'results.json').resolve()}: {said}" in md  # in the file, not only said
    assert "| classic | avgpool | linear | 60.00 ± 10.00 | 60.00 ± 26.46 | 3 | 0 |" in md  # as without it


def test_an_output_folder_that_cannot_be_written_is_one_line(sweep, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep), "--out", str(tmp_path / "a_file" / "report")])
    assert str(exit_.value) == (f"error: cannot write the report into '{tmp_path / 'a_file' / 'report'}' (Not a "
                                f"directory); choose another folder with --out DIR")


def test_complete_grid_has_no_missing_cells(tmp_path):
    for loss in ("classic", "multi"):
        for r in ("avgpool", "combined"):
            for e in ("linear", "finetune"):
                write(tmp_path, f"{loss}-{r}-{e}", loss, r, e, 0.5, 0.5)
    report([tmp_path], tmp_path)
    assert "All 8 expected cells have results." in (tmp_path / "results.md").read_text()


def test_cli_defaults_to_the_newest_evaluation_sweep(sweep, tmp_path, monkeypatch, capsys):
    evals = tmp_path / "outputs" / "multirun" / "eval"
    old, new = evals / "old", evals / "new"
    write(old, "a", "classic", "avgpool", "linear", 0.1, 0.1)
    write(new, "a", "multi", "combined", "finetune", 0.9, 0.9)
    os.utime(old, (1000, 1000))
    monkeypatch.chdir(tmp_path)
    main([])
    assert "newest evaluation sweep" in capsys.readouterr().out
    assert (new / "results.md").is_file() and not (old / "results.md").exists()
    main([str(sweep), "--out", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "results.csv").is_file()
    (tmp_path / "elsewhere" / "nothing").mkdir()
    with pytest.raises(SystemExit, match="no results.json"):
        main([str(tmp_path / "elsewhere" / "nothing")])


def test_a_folder_that_does_not_exist_or_a_file_of_another_kind_is_refused_before_writing(sweep, tmp_path):
    """A typo among the folders left its runs out of the table without a word."""
    typo = tmp_path / "swep"
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep), str(typo)])
    assert str(exit_.value) == (f"error: '{typo}' does not exist; name evaluation or training folders (or "
                                f"results.json files) to report on")
    assert not (sweep / "results.md").exists()
    other = sweep / "job2" / "notes.txt"
    with pytest.raises(SystemExit, match=f"'{other}' is a file, not a folder or a results.json; name the folder "
                                         f"that holds it"):
        main([str(other)])
    main([str(sweep / "job2" / "classic0" / "results.json"), "--out", str(tmp_path / "one")])  # a results.json
    assert (tmp_path / "one" / "results.md").is_file()


# ------------------------------------------------------------------------ unfinished, failed, other settings

CIFAR = {"name": "cifar10", "root": "data/cifar10", "subset": None, "image_size": 32}
EVAL_CIFAR = {**CIFAR, "split": "holdout", "val_size": 5000}
SYNTHETIC = {"name": "synthetic", "root": None, "subset": None, "image_size": 32, "num_train": 128,
             "num_test": 64}


def rows_of(md: str, loss: str, repr_name: str = "avgpool", protocol: str = "linear") -> list[list[str]]:
    """The cells of the table rows of one (loss, repr, eval) combination."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith(f"| {loss} | {repr_name} | {protocol} |")]


def test_unfinished_run_gets_a_row_of_its_own_and_enters_no_mean(tmp_path, capsys):
    root = tmp_path / "ev"
    for seed, t in enumerate([0.50, 0.60]):
        write(root, f"classic{seed}", "classic", "avgpool", "linear", t, t, seed=seed,
              pretrain_status="complete", pretrain_epochs=5, pretrain_epochs_planned=5)
    # killed at step 1: evaluated from its last.ckpt, 0 of 5 epochs done
    write(root, "classic2", "classic", "avgpool", "linear", 0.10, 0.12, seed=2, pretrain_status="incomplete",
          pretrain_epochs=0, pretrain_epochs_planned=5, pretrained="/runs/classic2/checkpoints/last.ckpt")
    report([root], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    complete, unfinished = rows_of(md, "classic")
    assert complete == ["classic", "avgpool", "linear", "55.00 ± 7.07", "55.00 ± 7.07", "2", "0",
                        "resnet18/imagenet", "?", "5", "100", "", "0, 1"]
    assert unfinished == ["classic", "avgpool", "linear", "incomplete", "incomplete", "0", "0",
                          "resnet18/imagenet", "?", "0 of 5", "100",
                          "**incomplete**: 1 run(s) not in any mean (classic2)", "2"]
    assert ("Incomplete pretraining runs (1), not in any mean (count them with allow_incomplete=true in "
            "evaluate.py, or python -m byol.report --allow-incomplete):\n"
            "- classic2: 0 of 5 epochs (/runs/classic2/checkpoints/last.ckpt)") in md
    csv_rows = [r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))
                if (r["loss"], r["repr"], r["eval"]) == ("classic", "avgpool", "linear")]
    assert [(r["status"], r["runs"], r["incomplete"], r["pretrain_epochs"], r["pretrain_epochs_planned"],
             r["test_acc_mean_pct"]) for r in csv_rows] == [("ok", "2", "0", "5", "", "55.0000"),
                                                             ("incomplete", "0", "1", "0", "5", "incomplete")]

    # --allow-incomplete: its accuracy counts, in its own row; the finished runs' mean does not move
    main([str(root), "--out", str(tmp_path / "allowed"), "--allow-incomplete"])
    md = (tmp_path / "allowed" / "results.md").read_text()
    complete, unfinished = rows_of(md, "classic")
    assert complete[3:7] == ["55.00 ± 7.07", "55.00 ± 7.07", "2", "0"]
    assert unfinished[3:7] == ["10.00", "12.00", "1", "0"] and unfinished[9] == "0 of 5"
    assert unfinished[11] == "**incomplete** pretraining (1 run(s)), counted: allow_incomplete"

    # evaluate.py's allow_incomplete=true is the report's default for that result; --no-allow-incomplete wins
    saved = root / "classic2" / "results.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "allow_incomplete": True}))
    assert [c.runs for c in build_cells(load_results([saved]))
            if (c.loss, c.repr, c.eval) == ("classic", "avgpool", "linear")] == [1]
    main([str(root), "--out", str(tmp_path / "refused"), "--no-allow-incomplete"])
    refused = rows_of((tmp_path / "refused" / "results.md").read_text(), "classic")
    assert refused[1][3:6] == ["incomplete", "incomplete", "0"]


def _x_labels(cells) -> list[str]:
    """The groups of results.png (protocol and representation), as its x-axis names them."""
    import matplotlib.pyplot as plt

    from byol.jobs.report_plot import figure

    fig = figure(cells)
    labels = [t.get_text().replace("\n", " ") for t in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    return labels


def _evaluate_sweep(root: Path, reprs, protocols, losses=("classic", "multi"), skip=()) -> None:
    """The results.json files of an evaluation sweep over ``reprs`` x ``protocols``, with the random-init baseline;
    the (repr, eval) jobs in ``skip`` died before writing any."""
    for r in reprs:
        for e in protocols:
            if (r, e) not in skip:
                for loss in (*losses, "random-init"):
                    write(root, f"{r}_{e}_{loss}", loss, r, e, 0.5, 0.5)


def test_only_the_losses_reprs_and_protocols_run_are_expected(tmp_path):
    """repr=avgpool eval=knn,linear flagged classic/combined/linear and multi/combined/linear missing (a fixed
    2 x 2 x {linear, finetune} grid), one loss trained flagged the other's cells: a cell nobody asked for is no gap."""
    _evaluate_sweep(tmp_path / "ev", ["avgpool"], ["knn", "linear"])
    cells = build_cells(load_results(sorted((tmp_path / "ev").rglob("results.json"))))
    assert sorted(c.triple for c in cells if not c.n_results) == []
    report([tmp_path / "ev"], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "All 4 expected cells have results." in md and "Missing cells" not in md and "combined" not in md
    assert _x_labels(cells) == ["linear avgpool", "knn avgpool"]  # no empty combined group

    _evaluate_sweep(tmp_path / "one_loss", ["avgpool", "combined"], ["linear", "finetune"], losses=("classic",))
    report([tmp_path / "one_loss"], tmp_path / "out1")
    md = (tmp_path / "out1" / "results.md").read_text()
    assert "All 4 expected cells have results." in md and "multi" not in md

    write(tmp_path / "knn", "a", "multi", "avgpool", "knn", 0.5, 0.5)
    report([tmp_path / "knn"], tmp_path / "out2")
    md = (tmp_path / "out2" / "results.md").read_text()
    assert "The expected cell has results." in md and "Missing cells" not in md and "finetune" not in md


def test_a_job_of_the_sweep_that_died_leaves_missing_cells(tmp_path):
    """combined occurs (under linear) and knn occurs (on avgpool): combined/knn with no result is a gap, for each
    loss, in the table, its note and the figure."""
    _evaluate_sweep(tmp_path / "ev", ["avgpool", "combined"], ["knn", "linear"], skip=[("combined", "knn")])
    report([tmp_path / "ev"], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Missing cells (2 of 8 expected): classic/combined/knn, multi/combined/knn." in md
    assert rows_of(md, "multi", "combined", "knn") == [["multi", "combined", "knn", "missing", "missing", "0", "0",
                                                       "", "", "", "", "**missing**", ""]]
    cells = build_cells(load_results(sorted((tmp_path / "ev").rglob("results.json"))))
    assert sorted(c.triple for c in cells if not c.n_results) == [("classic", "combined", "knn"),
                                                                 ("multi", "combined", "knn")]
    assert "knn combined" in _x_labels(cells)


def test_an_evaluation_job_refused_before_writing_a_result_is_listed_under_the_table(sweep, tmp_path, capsys):
    """``evaluate.py -m ... eval.k=0,5``: the job the config check refused leaves FAILED and no results.json, and
    the report had said "failed 0" with nothing about it. It is named, with why, under the table and in a note;
    a training job's FAILED (its run) and a job with a result (counted in its row) are not listed."""
    refused = sweep / "job3" / "0_eval.k=0"
    refused.mkdir(parents=True)
    (refused / "evaluate.log").write_text("[evaluate] overrides: eval.k=0\n")
    (refused / "FAILED").write_text("eval.k must be a positive whole number, not 0 (the command line)\n")
    training = sweep / "job4" / "0_seed=1"
    training.mkdir(parents=True)
    (training / "train.log").write_text("")
    (training / "FAILED").write_text("loss became NaN\n")
    (sweep / "job2" / "classic0" / "FAILED").write_text("an earlier try\n")
    (sweep / "job2" / "classic0" / "evaluate.log").write_text("")
    report([sweep], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    why = "eval.k must be a positive whole number, not 0 (the command line)"
    assert md.endswith(f"Jobs with results missing: failed before writing one, stopped, or never started (1, in no "
                       f"row):\n- {refused}: {why}\n")
    assert f"[report] note: {refused} failed before writing a result: {why}" in capsys.readouterr().err


def test_jobs_a_stopped_sweep_never_started_are_named_from_its_multirun_record(tmp_path, capsys):
    """An evaluation sweep stopped (Ctrl+C) in its first job left no folder for the others, and the report said
    "The expected cell has results". The jobs its command planned (Hydra's multirun.yaml) that have no folder
    are named now; a record that cannot be read claims nothing."""
    import yaml

    from byol.jobs.sweep_plan import unstarted_jobs

    root = tmp_path / "ev"
    write(root, "0_eval=knn,repr=avgpool", "classic", "avgpool", "knn", 0.5)
    job = root / "0_eval=knn,repr=avgpool"
    (job / ".hydra").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["pretrained=/runs", "repr=avgpool", "eval=knn"]))
    task = ["pretrained=/runs", "repr=avgpool,combined", "eval=knn,linear", "+seed=range(0,2)"]
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    # the job's own record has no +seed: a value it lacks is a value it was not run with
    assert unstarted_jobs(root) == [f"repr={r} eval={e} seed={s}" for r in ("avgpool", "combined")
                                    for e in ("knn", "linear") for s in (0, 1)]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["pretrained=/runs", "repr=avgpool", "eval=knn",
                                                                   "+seed=0"]))
    missing = unstarted_jobs(root)
    assert len(missing) == 7 and "repr=avgpool eval=knn seed=0" not in missing
    report([root], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"- {root}: 7 job(s) its command planned (multirun.yaml) never started, so they have no result: " in md
    assert "[report] note: " in capsys.readouterr().err
    (root / "multirun.yaml").write_text("hydra: !!python/object/apply:os.system [echo]")  # read as data: nothing
    assert unstarted_jobs(root) == []


def test_training_jobs_that_never_started_are_named_under_the_evaluations_table(tmp_path, capsys):
    """A training sweep stopped before its loss=multi jobs: its evaluation had no multi row, and its report said
    "All 2 expected cells have results". The report reads the plan of the training sweep its runs came from; a
    sweep still running (a job holding its lock) is not claimed."""
    import yaml

    train = tmp_path / "train"
    for seed in (0, 1):
        job = train / f"{seed}_loss=classic,seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["loss=classic", f"seed={seed}"]))
        (job / "encoder.pt").write_bytes(b"weights")
    (train / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["loss=classic,multi",
                                                                                           "seed=0,1"]}}}))
    root = tmp_path / "ev"
    for seed in (0, 1):
        write(root / "0_eval=knn", f"{seed}_loss=classic,seed={seed}", "classic", "avgpool", "knn", 0.5, seed=seed,
              pretrained=str(train / f"{seed}_loss=classic,seed={seed}" / "encoder.pt"))
    report([root], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert (f"- {train}: 2 job(s) its command planned (multirun.yaml) never started, so they have no result: "
            f"loss=multi seed=0; loss=multi seed=1") in md
    assert "The expected cell has results, but some jobs have none (listed below)." in md
    (train / "0_loss=classic,seed=0" / ".lock").write_text(str(os.getpid()))
    import fcntl

    with open(train / "0_loss=classic,seed=0" / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report([root], tmp_path / "out2")
    assert "never started" not in (tmp_path / "out2" / "results.md").read_text()


def test_failed_training_jobs_are_listed_as_missing(tmp_path):
    root = tmp_path / "ev"
    write(root, "0_loss=multi,seed=0", "multi", "avgpool", "linear", 0.80, 0.70)
    # what evaluate.py writes for a job with a FAILED file and for a job folder without weights
    write(root, "1_loss=multi,seed=1", "multi", "avgpool", "linear", status="missing",
          pretrain_status="failed", error="training failed: non-finite loss at step 3",
          pretrained="/train/sw/1_loss=multi,seed=1", label="1_loss=multi,seed=1", pretrain_epochs=None)
    write(root, "2_loss=classic,seed=0", "classic", "avgpool", "linear", status="missing",
          pretrain_status="no weights", error="no weights: no encoder.pt and no checkpoints/*.ckpt",
          pretrained="/train/sw/2_loss=classic,seed=0", label="2_loss=classic,seed=0", pretrain_epochs=None)
    report([root], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert rows_of(md, "multi") == [["multi", "avgpool", "linear", "80.00", "70.00", "1", "0",
                                     "resnet18/imagenet", "?", "5", "100", "1 missing (1_loss=multi,seed=1)", "0"]]
    assert rows_of(md, "classic") == [["classic", "avgpool", "linear", "missing", "missing", "0", "0",
                                       "resnet18/imagenet", "?", "?", "100",
                                       "**missing**: no model (2_loss=classic,seed=0)", ""]]
    assert "Missing cells (1 of 2 expected): classic/avgpool/linear." in md  # linear on avgpool only was run
    assert ("Missing pretraining runs (2, not evaluated):\n"
            "- /train/sw/1_loss=multi,seed=1: training failed: non-finite loss at step 3\n"
            "- /train/sw/2_loss=classic,seed=0: no weights: no encoder.pt and no checkpoints/*.ckpt") in md
    rows = {(r["loss"], r["repr"], r["eval"]): r
            for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert [(rows[(loss, "avgpool", "linear")][k]) for loss in ("multi", "classic")
            for k in ("status", "runs", "failed", "missing")] == ["ok", "1", "0", "1",
                                                                   "missing", "0", "0", "1"]


def test_results_of_different_settings_are_never_pooled(tmp_path):
    root = tmp_path / "ev"
    cifar = {"pretrain_data": CIFAR, "eval_data": EVAL_CIFAR, "pretrain_epochs": 8,
             "pretrain_status": "complete"}
    write(root, "a", "classic", "avgpool", "linear", 0.30, 0.30, **cifar)
    write(root, "b", "classic", "avgpool", "linear", 0.32, 0.32, seed=1, width=1.0, **cifar)  # = no width
    # the tester's case: a smoke run (synthetic data, 2 epochs, 1 evaluation epoch) beside CIFAR runs
    write(root, "smoke", "classic", "avgpool", "linear", 1.00, 1.00, pretrain_data=SYNTHETIC,
          eval_data={**SYNTHETIC, "split": "holdout", "val_size": 32}, pretrain_epochs=2, eval_epochs=1)
    write(root, "r50", "classic", "avgpool", "linear", 0.40, 0.40, **{**cifar, "backbone": "resnet50"})
    write(root, "stem", "classic", "avgpool", "linear", 0.45, 0.45, **{**cifar, "stem": "cifar"})
    write(root, "subset", "classic", "avgpool", "linear", 0.20, 0.20,
          **{**cifar, "pretrain_data": {**CIFAR, "subset": 10000}})
    write(root, "ft50", "classic", "avgpool", "linear", 0.25, 0.25, **{**cifar, "eval_epochs": 50})
    write(root, "long", "classic", "avgpool", "linear", 0.35, 0.35, **{**cifar, "pretrain_epochs": 16})
    write(root, "half", "classic", "avgpool", "linear", 0.15, 0.15, **{**cifar, "width": 0.5})
    report([root], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    # (test acc, runs, backbone, data, pretrain epochs, eval epochs): each setting its own row
    assert sorted((r[3], r[5], r[7], r[8], r[9], r[10]) for r in rows_of(md, "classic")) == sorted([
        ("31.00 ± 1.41", "2", "resnet18/imagenet", "cifar10 subset=none", "8", "100"),
        ("100.00", "1", "resnet18/imagenet", "synthetic", "2", "1"),
        ("40.00", "1", "resnet50/imagenet", "cifar10 subset=none", "8", "100"),
        ("45.00", "1", "resnet18/cifar", "cifar10 subset=none", "8", "100"),
        ("20.00", "1", "resnet18/imagenet", "cifar10 subset=10000 → cifar10 subset=none", "8", "100"),
        ("25.00", "1", "resnet18/imagenet", "cifar10 subset=none", "8", "50"),
        ("35.00", "1", "resnet18/imagenet", "cifar10 subset=none", "16", "100"),
        ("15.00", "1", "resnet18 x0.5/imagenet", "cifar10 subset=none", "8", "100"),
    ])
    assert len([r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))
                if (r["loss"], r["repr"], r["eval"]) == ("classic", "avgpool", "linear")]) == 8
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the evaluation data's folder (or split) separates too, and the row says so
    other = tmp_path / "other"
    write(other, "a", "multi", "avgpool", "linear", 0.30, 0.30, **cifar)
    write(other, "b", "multi", "avgpool", "linear", 0.50, 0.50,
          **{**cifar, "eval_data": {**EVAL_CIFAR, "root": "/x"}})
    cells = [c for c in build_cells(load_results(sorted(other.rglob("results.json")))) if c.loss == "multi"
             and c.repr == "avgpool" and c.eval == "linear"]
    assert sorted((c.runs, c.test[0], c.data) for c in cells) == [
        (1, 0.30, "cifar10 root=data/cifar10"), (1, 0.50, "cifar10 root=data/cifar10 → cifar10 root=/x")]


def test_results_json_of_an_older_version_still_load(tmp_path):
    root = tmp_path / "ev"
    # before `status`, pretrain_status, pretrain_data and eval_data: finished when it has test_acc
    old = {"status": None, "data": "cifar10"}
    write(root, "old0", "classic", "avgpool", "linear", 0.50, 0.40, **old)
    write(root, "old1", "classic", "avgpool", "linear", 0.70, 0.60, seed=1, **old)
    write(root, "old2", "classic", "avgpool", "linear", seed=2, **old)  # no accuracy: failed
    write(root, "bare", "multi", "avgpool", "linear", 0.9, 0.9, status=None, backbone=None, stem=None,
          pretrain_epochs=None, eval_epochs=None)
    # a result of this version beside them: its settings are known, theirs are not, so it is not pooled
    write(root, "new", "classic", "avgpool", "linear", 0.10, 0.10, pretrain_data=CIFAR, eval_data=EVAL_CIFAR,
          pretrain_status="complete")
    report([root], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert sorted(rows_of(md, "classic")) == sorted([
        ["classic", "avgpool", "linear", "60.00 ± 14.14", "50.00 ± 14.14", "2", "1", "resnet18/imagenet",
         "? → cifar10 (settings unknown)", "5", "100", "1 failed", "0, 1"],
        ["classic", "avgpool", "linear", "10.00", "10.00", "1", "0", "resnet18/imagenet", "cifar10", "5",
         "100", "", "0"],
    ])
    assert rows_of(md, "multi") == [["multi", "avgpool", "linear", "90.00", "90.00", "1", "0", "?", "?", "?",
                                     "?", "", "0"]]


# ------------------------------------------------------------------------ the everyday-use issue

def test_missing_cells_are_written_missing_in_the_table_the_csv_and_the_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from byol.jobs.report_plot import figure

    for seed, t in enumerate([0.50, 0.60]):
        write(tmp_path, f"classic{seed}", "classic", "avgpool", "linear", t, t, seed=seed, num_classes=10)
    write(tmp_path, "broken", "multi", "combined", "linear", status="failed", error="NaN loss")
    report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert rows_of(md, "multi") == [["multi", "avgpool", "linear", "missing", "missing", "0", "0", "", "", "", "",
                                     "**missing**", ""]]
    assert rows_of(md, "multi", "combined")[0][3:5] == ["failed", "failed"]
    rows = {(r["loss"], r["repr"], r["eval"]): r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert [rows[("multi", "avgpool", "linear")][k] for k in ("status", "test_acc_mean_pct", "val_acc_mean_pct")] \
        == ["missing", "missing", "missing"]
    assert rows[("multi", "combined", "linear")]["test_acc_mean_pct"] == "failed"

    fig = figure(build_cells(load_results(sorted(tmp_path.rglob("results.json")))))
    ax = fig.axes[0]
    # one bar, the only cell with an accuracy: no zero-height bar (nor its error caps) for the others
    assert [round(p.get_height(), 6) for p in ax.patches] == [55.0]
    assert all(0 not in line.get_ydata() for line in ax.lines)  # the error caps: 55 ± 7.07
    # each group (x = 0, 1: linear on avgpool, combined; no finetune was run) holds a classic and a multi
    # place (x - 0.2, x + 0.2): the empty ones say why
    labels = sorted((round(t.get_position()[0], 6), t.get_text()) for t in ax.texts)
    assert labels == [(-0.2, "55.0"), (0.2, "multi: missing"), (0.8, "classic: missing"), (1.2, "multi: failed")]
    assert ax.patches[0].get_x() + ax.patches[0].get_width() / 2 == pytest.approx(-0.2)


def test_figure_names_what_it_shows_marks_chance_and_fits_its_axis(tmp_path):
    pytest.importorskip("matplotlib")
    from byol.jobs.report_plot import chance_levels, figure, figure_title, y_limits

    data = {"pretrain_data": CIFAR, "eval_data": EVAL_CIFAR, "pretrain_epochs": 8, "num_classes": 10}
    for seed, (classic, multi) in enumerate([(0.18, 0.22), (0.20, 0.26), (0.22, 0.24)]):
        write(tmp_path, f"classic{seed}", "classic", "avgpool", "linear", classic, classic, seed=seed, **data)
        write(tmp_path, f"multi{seed}", "multi", "avgpool", "linear", multi, multi, seed=seed, **data)
    cells = build_cells(load_results(sorted(tmp_path.rglob("results.json"))))
    assert figure_title(cells).splitlines()[0] == "Test accuracy on cifar10, 8 pretraining epochs, 3 runs per bar"
    assert chance_levels(cells) == [(10, 10.0)]
    ax = figure(cells).axes[0]
    assert ax.get_title() == figure_title(cells)
    # bars 18-26 % (mean ± std), chance 10 % near them: 5-30 %, not 0-100 %
    assert ax.get_ylim() == (5.0, 30.0)
    assert [list(line.get_ydata()) for line in ax.lines if list(line.get_xdata()) == [0, 1]] == [[10.0, 10.0]]
    assert "chance, 10 classes: 10.0%" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "axis starts at 5%" in ax.get_ylabel()

    # the axis follows the values; a chance level far below them is named, not drawn
    assert y_limits([47.9, 62.1], [10.0]) == (45.0, 70.0)
    assert y_limits([18.0, 26.0], [10.0]) == (5.0, 30.0)
    assert y_limits([95.0, 99.5]) == (90.0, 105.0) and y_limits([]) == (0.0, 100.0)  # room for a label at 99.5
    high = tmp_path / "high"
    for seed, t in enumerate([0.80, 0.84]):
        write(high, f"c{seed}", "classic", "avgpool", "linear", t, t, seed=seed, **{**data, "pretrain_epochs": 100})
    write(high, "r", "random-init", "avgpool", "linear", 0.30, 0.30, pretrain_epochs=0, num_classes=10)
    write(high, "old", "multi", "avgpool", "linear", 0.81, 0.81, status=None, pretrain_epochs=None)  # bare
    cells = build_cells(load_results(sorted(high.rglob("results.json"))))
    assert figure_title(cells).splitlines()[0] == \
        "Test accuracy on cifar10, 100 / ? pretraining epochs, 1–2 runs per bar"
    ax = figure(cells[:1]).axes[0]  # classic only: 80-84 %
    assert ax.get_ylim() == (75.0, 90.0)
    assert not [line for line in ax.lines if list(line.get_xdata()) == [0, 1]]  # no chance line drawn
    assert "chance, 10 classes: 10.0% (below the axis)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_csv_and_markdown_give_the_same_accuracies_in_percent(sweep, tmp_path):
    report([sweep], tmp_path)
    md_rows = [[c.strip() for c in line.strip().strip("|").split("|")]
               for line in (tmp_path / "results.md").read_text().splitlines()[6:] if line.startswith("| ")]
    csv_rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r[:3] for r in md_rows] == [[r["loss"], r["repr"], r["eval"]] for r in csv_rows]
    compared = 0
    for md_row, csv_row in zip(md_rows, csv_rows, strict=True):
        for column, split in ((3, "test"), (4, "val")):
            mean, _, std = md_row[column].partition(" ± ")
            if not mean[0].isdigit():  # a word: the same word in the CSV
                assert csv_row[f"{split}_acc_mean_pct"] == mean and csv_row[f"{split}_acc_std_pct"] == ""
                continue
            assert float(csv_row[f"{split}_acc_mean_pct"]) == pytest.approx(float(mean), abs=0.005)
            assert csv_row[f"{split}_acc_std_pct"] == "" if not std else \
                float(csv_row[f"{split}_acc_std_pct"]) == pytest.approx(float(std), abs=0.005)
            compared += 1
    assert compared == 2 * 4  # classic, multi, random-init (linear) and kNN rows, test and val
    assert md_rows[0][3] == "60.00 ± 10.00" and float(csv_rows[0]["test_acc_mean_pct"]) == 60  # %, not 0.6


def test_results_json_with_test_acc_and_no_status_counts_as_finished(tmp_path):
    write(tmp_path, "a", "classic", "avgpool", "linear", 0.50, 0.40, status=None)
    write(tmp_path, "b", "classic", "avgpool", "linear", 0.0, 0.0, seed=1, status=None)  # 0 % is still a result
    write(tmp_path, "c", "classic", "avgpool", "linear", seed=2, status=None)  # no accuracy: failed
    results = load_results(sorted(tmp_path.rglob("results.json")))
    assert ["status" in r for r in results] == [False] * 3
    (cell,) = [c for c in build_cells(results) if c.triple == ("classic", "avgpool", "linear")]
    assert (cell.status, cell.runs, cell.failed, cell.test) == ("ok", 2, 1, [0.50, 0.0])
    report([tmp_path], tmp_path / "out")
    assert rows_of((tmp_path / "out" / "results.md").read_text(), "classic")[0][3:7] == \
        ["25.00 ± 35.36", "20.00 ± 28.28", "2", "1"]


# ----------------------------------------------------------------------------- paired by seed


@pytest.fixture
def seeded(tmp_path) -> Path:
    """Three seeds of classic, multi and random init on avgpool/linear, the values chosen by hand."""
    root = tmp_path / "seeded"
    scores = {"classic": (0.50, 0.60, 0.70), "multi": (0.55, 0.62, 0.80), "random-init": (0.40, 0.42, 0.44)}
    for loss, values in scores.items():
        for seed, t in enumerate(values):
            write(root, f"{loss}{seed}", loss, "avgpool", "linear", t, seed=seed,
                  pretrain_epochs=0 if loss == "random-init" else 5)
    return root


def _pairs(folder: Path) -> dict:
    from byol.jobs.report_paired import paired_comparisons

    cells = build_cells(load_results(sorted(folder.rglob("results.json"))))
    return {(p.a.loss, p.b.loss, p.a.repr, p.a.eval): p for p in paired_comparisons(cells)}


def test_paired_differences_are_taken_seed_by_seed(seeded):
    pairs = _pairs(seeded)
    assert set(pairs) == {("multi", "classic", "avgpool", "linear"), ("classic", "random-init", "avgpool", "linear"),
                          ("multi", "random-init", "avgpool", "linear")}
    p = pairs[("multi", "classic", "avgpool", "linear")]
    assert p.seeds == [0, 1, 2]
    assert p.diffs == pytest.approx([0.05, 0.02, 0.10])
    assert p.ahead == 3
    # |0.6567 - 0.6| = 0.057 < std(multi) 0.129 + std(classic) 0.1: every seed ahead, but within the spread
    assert not p.beyond_spread
    q = pairs[("multi", "random-init", "avgpool", "linear")]
    assert q.diffs == pytest.approx([0.15, 0.20, 0.36]) and q.beyond_spread  # 0.237 > 0.129 + 0.02


# Student's t: two-sided critical values at p = 0.05 and 0.01 (printed tables), by degrees of freedom
T_TABLE = {1: (12.706, 63.657), 2: (4.303, 9.925), 3: (3.182, 5.841), 4: (2.776, 4.604), 5: (2.571, 4.032),
           9: (2.262, 3.250), 20: (2.086, 2.845)}


def differences_with_t(t: float, n: int) -> list[float]:
    """n differences whose mean / (sample std / sqrt n) is ``t``."""
    spread = [(-1) ** i for i in range(n - n % 2)] + [0.0] * (n % 2)
    std = (sum(x * x for x in spread) / (n - 1)) ** 0.5
    return [x + t * std / n ** 0.5 for x in spread]


@pytest.mark.parametrize("dof", sorted(T_TABLE))
def test_paired_t_test_p_values_match_the_tables(dof):
    from byol.jobs.report_paired import t_test_p

    for t, p in zip(T_TABLE[dof], (0.05, 0.01), strict=True):
        assert t_test_p(differences_with_t(t, dof + 1)) == pytest.approx(p, abs=2e-4)
        assert t_test_p([-d for d in differences_with_t(t, dof + 1)]) == pytest.approx(p, abs=2e-4)  # two-sided
    assert t_test_p(differences_with_t(0.0, dof + 1)) == pytest.approx(1.0)


def test_paired_t_test_edge_cases_and_scipy():
    from byol.jobs.report_paired import t_test_p

    # one difference, or differences all equal: no spread, no test (not p = 0, "<0.001"; see test_report_stats.py)
    assert all(math.isnan(t_test_p(d)) for d in ([0.1], [0.1, 0.1], [0.0, 0.0]))
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for n in range(2, 12):
        diffs = [rng.gauss(0.02, 0.03) for _ in range(n)]
        assert t_test_p(diffs) == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue, rel=1e-9, abs=1e-12)


def test_paired_rows_need_the_same_settings_and_two_shared_seeds(tmp_path):
    root = tmp_path / "r"
    for seed in (0, 1):
        write(root, f"classic{seed}", "classic", "avgpool", "linear", 0.5 + seed / 10, seed=seed)
        write(root, f"multi{seed}", "multi", "avgpool", "linear", 0.6, seed=seed, eval_epochs=50)  # other row
        write(root, f"classicft{seed}", "classic", "avgpool", "finetune", 0.5, seed=seed)
    write(root, "multift0", "multi", "avgpool", "finetune", 0.6, seed=0)  # one shared seed only
    write(root, "multift2", "multi", "avgpool", "finetune", 0.6, seed=2)
    for name, seed, acc in (("a", 0, 0.6), ("b", 0, 0.8), ("c", 2, 0.6), ("d", 10, 0.6)):  # seed 0 twice
        write(root, f"multiknn_{name}", "multi", "avgpool", "knn", acc, seed=seed)
        write(root, f"classicknn_{name}", "classic", "avgpool", "knn", 0.5, seed=seed)
    pairs = _pairs(root)
    assert list(pairs) == [("multi", "classic", "avgpool", "knn")]
    knn = pairs[("multi", "classic", "avgpool", "knn")]
    assert knn.seeds == [0, 2, 10]  # in numeric order
    assert knn.a_values == pytest.approx([0.7, 0.6, 0.6])  # seed 0's two results averaged, as the table does


def test_rows_of_two_evaluation_lengths_are_paired_apart_and_listed_group_by_group(tmp_path):
    from byol.jobs.report_paired import markdown_lines

    root = tmp_path / "ft"
    for epochs in (1, 5):
        for seed in (0, 1):
            for loss, base in (("classic", 0.40), ("multi", 0.45), ("random-init", 0.30)):
                write(root, f"{loss}{seed}_ep{epochs}", loss, "avgpool", "finetune", base + epochs / 100 + seed / 100,
                      seed=seed, eval_epochs=epochs, pretrain_epochs=0 if loss == "random-init" else 5)
    cells = build_cells(load_results(sorted(root.rglob("results.json"))))
    lines = markdown_lines(paired_comparisons(cells))
    rows = [line.split(" | ")[2:4] for line in lines if line.startswith("| avgpool")]
    assert rows == [["1", "multi − classic"], ["1", "classic − random-init"], ["1", "multi − random-init"],
                    ["5", "multi − classic"], ["5", "classic − random-init"], ["5", "multi − random-init"]]


def test_a_protocol_run_for_two_lengths_gets_a_group_per_length_and_colours_stay_losses(tmp_path):
    pytest.importorskip("matplotlib")
    from byol.jobs.report_plot import figure

    for epochs in (1, 5):
        for loss in ("classic", "multi"):
            write(tmp_path, f"{loss}_ft{epochs}", loss, "avgpool", "finetune", 0.4 + epochs / 100, eval_epochs=epochs)
    write(tmp_path, "classic_knn", "classic", "avgpool", "knn", 0.3)
    write(tmp_path, "classic_knn_combined", "classic", "combined", "knn", 0.3)  # combined is expected under finetune
    ax = figure(build_cells(load_results(sorted(tmp_path.rglob("results.json"))))).axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]  # with the empty cells of finetune (combined)
    assert [t for t in ticks if t.endswith("avgpool")] == [
        "finetune, 1 epoch\navgpool", "finetune, 5 epochs\navgpool", "knn\navgpool"]
    assert "finetune\ncombined" in ticks  # no length there: one group, with its empty places
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["classic", "multi"]  # not "classic (eval epochs 1)", "classic (eval epochs 5)", ...
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == [30.0, 30.0, 41.0, 41.0, 45.0, 45.0]
    assert "multi: missing" in [t.get_text() for t in ax.texts]  # multi's knn


def test_report_writes_the_paired_section_and_csv(seeded, tmp_path, sweep):
    out = tmp_path / "out"
    report([seeded], out)
    md = (out / "results.md").read_text()
    assert "## Paired by seed" in md
    assert ("| avgpool | linear | 100 | multi − classic | +5.67 ± 4.04 | 3 of 3 | 65.67 ± 12.90 | 60.00 ± 10.00 | no "
            "| 0.136 |") in md  # t = 5.67 / (4.04 / sqrt 3) = 2.43, 2 degrees of freedom: p = 1 - t / sqrt(2 + t^2)
    rows = list(csv.DictReader(open(out / "paired.csv")))
    assert [(r["a"], r["b"], r["ahead"], r["beyond_spread"]) for r in rows] == [
        ("multi", "classic", "3", "False"), ("classic", "random-init", "3", "True"),
        ("multi", "random-init", "3", "True")]
    assert rows[0]["seeds"] == "0 1 2" and rows[0]["diffs_pts"] == "5.0000 2.0000 10.0000"
    assert rows[0]["p_paired_t"] == "0.1358"  # 4 significant digits
    report([sweep], tmp_path / "single")  # one seed per row: nothing to pair, no section, no file
    assert "Paired" not in (tmp_path / "single" / "results.md").read_text()
    assert not (tmp_path / "single" / "paired.csv").exists()



def test_paired_csv_names_every_column_it_writes(tmp_path):
    """The rows ended with the settings that tell two lines apart, under no header (17 names, 18 fields)."""
    for seed in (0, 1):
        for lr, shift in ((1.0, 0.0), (5.0, 0.1)):
            for loss, t in (("classic", 0.5), ("multi", 0.6)):
                write(tmp_path / "ev", f"{loss}_lr{lr}_{seed}", loss, "avgpool", "linear", t + shift + seed / 10,
                      seed=seed, trained={"optim.base_lr": lr})
    report([tmp_path / "ev"], tmp_path / "out")
    header, *rows = list(csv.reader(open(tmp_path / "out" / "paired.csv", encoding="utf-8")))
    assert header[-4:] == ["backbone", "data", "pretrain_epochs", "settings"]
    assert {len(row) for row in rows} == {len(header)}
    named = list(csv.DictReader(open(tmp_path / "out" / "paired.csv", encoding="utf-8")))
    assert [(r["a"], r["b"], r["diffs_pts"], r["settings"]) for r in named] == [
        ("multi", "classic", "10.0000 10.0000", "optim.base_lr=1.0"),
        ("multi", "classic", "10.0000 10.0000", "optim.base_lr=5.0")]

# ------------------------------------------------------------- files handed to us are data, not instructions

def training_run(folder: Path, seed=0, loss_taps: str = "[]") -> Path:
    """A pretraining run folder as the report finds it: config.yaml, encoder.pt and a 2-epoch metrics.csv."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed: {json.dumps(seed)}\nloss:\n  taps: {loss_taps}\n"
                                        f"backbone:\n  name: resnet18\n")
    (folder / "encoder.pt").write_bytes(b"")
    (folder / "metrics.csv").write_text("epoch,step,monitor/knn/avgpool,train/loss_epoch,train/tau\n,0,0.3,,\n"
                                        "0,3,0.35,2.0,0.99\n1,7,0.42,1.5,0.99\n")
    return folder


def test_the_reports_files_replace_symbolic_links_and_never_write_through_them(seeded, tmp_path, capsys):
    """A folder from elsewhere can hold results.csv (results.md, paired.csv, results.png, curves.png) as a link
    to any file: the report wrote through it. Each file is now a new file in its place, the targets untouched."""
    training_run(seeded / "run")  # a training run: curves.png too
    victims = {}
    for name in ("results.md", "results.csv", "paired.csv", "results.png", "curves.png"):
        victims[name] = tmp_path / f"victim_{name}"
        victims[name].write_text(f"not the report's {name}")
        (seeded / name).symlink_to(victims[name])
    report([seeded], seeded)
    err = capsys.readouterr().err
    for name, victim in victims.items():
        assert victim.read_text() == f"not the report's {name}"
        assert (seeded / name).is_file() and not (seeded / name).is_symlink()
        assert f"[report] note: {seeded / name} was a symbolic link (to {victim}); replaced by the report's file" in err
    assert (seeded / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Paired by seed" in (seeded / "results.md").read_text()
    assert next(csv.reader(open(seeded / "paired.csv")))[0] == "repr"


def test_figures_replace_symbolic_links_and_a_place_that_cannot_be_replaced_is_one_line(sweep, tmp_path):
    """A run's own curves.png (drawn during training) and the t-SNE maps replace a link too; a report file
    that cannot be replaced (a folder in its place) is one error line naming it."""
    from byol.jobs.curves import CURVES_FILE, write_curves

    run = training_run(tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_text("kept")
    (run / CURVES_FILE).symlink_to(victim)
    write_curves(run)
    assert victim.read_text() == "kept" and not (run / CURVES_FILE).is_symlink()
    import torch

    from byol.jobs.embedding import draw_map

    (tmp_path / "tsne.png").symlink_to(victim)
    draw_map(torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"], "map", tmp_path / "tsne.png")
    assert victim.read_text() == "kept" and (tmp_path / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "out" / "results.csv").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main([str(sweep), "--out", str(tmp_path / "out")])
    assert str(exit_.value).startswith(f"error: could not write '{tmp_path / 'out' / 'results.csv'}' (Is a directory)")
    assert "\n" not in str(exit_.value)


@pytest.mark.parametrize("text, said", [
    ('{"x": 1}', "no repr and no eval field (not a results.json of evaluate.py)"),
    ('{"repr": "avgpool", "eval": "embed", "status": "ok", "maps": ["a.png"]}',
     "maps is ['a.png'], not a dict of map names to file names"),  # AttributeError: 'list' ... 'values'
    ('{"repr": "avgpool", "eval": "embed", "status": "ok", "maps": {"avgpool": 1}}',
     "maps is {'avgpool': 1}, not a dict of map names to file names"),  # TypeError in str.join
    ('{"repr": "avgpool", "eval": "linear", "eval_data": {"name": ["x"]}}',
     "eval_data is {'name': ['x']}, not a dict of plain values (text, numbers) with a text name"),
    ('{"repr": "avgpool", "eval": "linear", "status": "failed", "error": {"a": 1}}', "error is {'a': 1}, not a str"),
    ('{"repr": "avgpool", "eval": "linear", "width": 1' + "0" * 400 + "}",
     "width is 1000000000000000000000000000000000000..., not a number"),  # OverflowError in math.isfinite
    ('{"repr": "avgpool", "eval": "linear", "pretrained": "/runs/a\\u0000b"}',
     "pretrained is '/runs/a\\x00b', not a str"),
    ("[" * 100_000 + "]" * 100_000, "not JSON the report reads (nested too deep)"),  # RecursionError
    ("[1, 2]", "not a results object (a JSON array)"),
], ids=["not-a-result", "maps-list", "maps-int", "data-name-list", "error-dict", "huge-int", "nul", "deep", "array"])
def test_a_malformed_results_json_is_one_note_and_the_rest_is_reported(sweep, tmp_path, capsys, text, said):
    """Each was a traceback (or a row of None/None/None): now one note naming the file, and the report of the
    others; when no file is left, one error line."""
    bad = sweep / "job9" / "bad" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(text)
    report([sweep], tmp_path / "out")
    captured = capsys.readouterr()
    assert f"[report] note: skipping {bad.resolve()}: {said}\n" in captured.err
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.split("\n")[2].startswith("9 results.json files (1 skipped, listed below). ") and "None" not in md
    assert f"Skipped results.json files (1, in no row):\n- {bad.resolve()}: {said}\n" in md
    assert "| classic | avgpool | linear | 60.00 ± 10.00 | 60.00 ± 26.46 | 3 | 0 |" in md
    with pytest.raises(SystemExit) as exit_:
        main([str(bad.parent), "--out", str(tmp_path / "alone")])
    assert str(exit_.value) == (f"error: none of the 1 results.json file(s) under {bad.parent} could be used (each "
                                f"named above); no results table written")
    assert not (tmp_path / "alone" / "results.md").exists()


def test_text_from_files_is_drawn_literally_in_every_figure(tmp_path, monkeypatch):
    """A loss (label, data name, seed, metric, folder or class name) such as "$\\foo$" stopped matplotlib's
    mathtext parser (ParseFatalException, no results.png); with text.usetex set it would go to LaTeX."""
    pytest.importorskip("matplotlib")
    import matplotlib
    from PIL import Image

    from byol.jobs.curves import write_curves
    from byol.jobs.curves_overlay import overlay_curves
    from byol.jobs.report_plot import figure

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)  # a user's matplotlibrc: still never LaTeX
    dollar = "$\\foo$"
    root = tmp_path / "ev"
    write(root, "a", dollar, "avgpool", "linear", 0.5, 0.5, eval_data={"name": "$x^$"}, pretrain_data={"name": "$x^$"})
    write(root, "b", "classic", "avgpool", "linear", 0.6, 0.6, label="$\\bar{$")
    report([root], tmp_path / "out")
    assert Image.open(tmp_path / "out" / "results.png").size[0] > 500
    ax = figure(build_cells(load_results(sorted(root.rglob("results.json"))))).axes[0]
    assert dollar in [t.get_text() for t in ax.get_legend().get_texts()] and "$x^$" in ax.get_title()
    run = training_run(tmp_path / "$\\run{", seed="$\\seed$")  # the folder's name is the figure's title
    metrics = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(metrics.replace("train/tau", "train/tau$\\x$"))  # a metric's name: a label
    assert Image.open(write_curves(run)).size[0] > 1000
    assert Image.open(overlay_curves([(dollar, "seed $\\s$", run)], tmp_path / "overlay.png", "$\\t$")).size[0] > 1000
    import torch

    from byol.jobs.embedding import draw_map

    draw_map(torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]), [dollar, "$^"], dollar, tmp_path / "map.png")
    assert Image.open(tmp_path / "map.png").size[0] > 500
    assert matplotlib.rcParams["text.parse_math"] and matplotlib.rcParams["text.usetex"]  # restored afterwards


@pytest.mark.parametrize("damage, why", [
    (b"step,epoch,train/loss/avgpool\n0,0,\xff\xfe\n", "not UTF-8 text: byte 0xff at position 34"),
    (b"step,epoch,train/loss/avgpool\n0,0," + b"1" * 200_000 + b"\n",
     "not CSV the report reads: field larger than field limit (131072)"),
    (b"step,epoch,train/loss/avgpool\n0,0,-1e308\n1,0,1e308\n",  # "arange: cannot compute length": no figure
     "train/loss/avgpool = -1e+308 at epoch 0.5, beyond the ±1e+300 a figure can draw"),
], ids=["not-utf8", "field-limit", "1e308"])
def test_a_run_whose_metrics_csv_cannot_be_read_or_drawn_is_left_out_and_the_others_drawn(
        sweep, tmp_path, capsys, monkeypatch, damage, why):
    """One such metrics.csv cost every run's curves, with a note that named no file: now that run is one
    note naming its metrics.csv, and the other runs are drawn."""
    import byol.jobs.curves as curves

    training_run(tmp_path / "runs" / "good", seed=0)
    bad = training_run(tmp_path / "runs" / "bad", seed=1)
    (bad / "metrics.csv").write_bytes(damage)
    figures, save = [], curves._save
    monkeypatch.setattr(curves, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    report([sweep, tmp_path / "runs"], tmp_path / "out")
    err = capsys.readouterr().err
    assert f"[report] note: {(bad / 'metrics.csv').resolve()} left out of curves.png ({why})\n" in err
    assert "not drawn" not in err
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    knn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[1].get_lines()}
    assert knn.keys() == {"loss=classic seed 0 avgpool"}  # the good run, alone
    assert knn["loss=classic seed 0 avgpool"] == ([0.0, 1.0, 2.0], pytest.approx([30.0, 35.0, 42.0]))


def test_a_name_that_is_not_utf8_is_written_escaped_and_the_report_completes(seeded, tmp_path, capsys):
    """A run folder named with a byte that is not UTF-8 (``mkdir $(printf 'e\\xff1')``; Python holds it as
    "\\udcff") stopped the report with a UnicodeEncodeError before results.md was written; a "\\udcff" in a
    results.json did the same. Each is written escaped, as ``ls -b`` shows it, in every file and line."""
    odd = os.fsdecode(b"e\xff1")
    (seeded / odd).mkdir()
    (seeded / odd / "results.json").write_text(json.dumps({"repr": "avgpool", "eval": "linear", "test_acc": "bad"}))
    for seed, acc in enumerate((0.5, 0.6, 0.7)):
        write(seeded, f"odd{seed}", "lo\udcffss", "avgpool", "linear", acc, acc, seed=seed)
    write(seeded, "gone", "lo\udcffss", "avgpool", "linear", status="missing", pretrained="/runs/r\udcff9",
          error="no encoder.pt in /runs/r\udcff9")
    for loss, seed in ((loss, seed) for loss in ("classic", "multi") for seed in (0, 1)):  # paired: a tick label
        write(seeded, f"{loss}-odd{seed}", loss, "av\udcffg", "linear", 0.5 + seed / 10, seed=seed)
    out = tmp_path / "out"
    report([seeded], out)
    captured = capsys.readouterr()  # pytest's capture is strict UTF-8, like a terminal that is not C.UTF-8
    skipped = f"{seeded.resolve()}/e\\xff1/results.json: test_acc is 'bad', not an accuracy in [0, 1]"
    assert f"[report] note: skipping {skipped}\n" in captured.err
    md = (out / "results.md").read_text(encoding="utf-8")
    assert captured.out.startswith(md)
    assert f"- {skipped}\n" in md
    assert "| lo\\xffss | avgpool | linear | 60.00 ± 10.00 | 60.00 ± 10.00 | 3 | 0 |" in md
    assert "- /runs/r\\xff9: no encoder.pt in /runs/r\\xff9\n" in md
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [(r["runs"], r["missing"]) for r in rows if r["loss"] == "lo\\xffss"] == [("3", "1")]
    paired = [(r["repr"], r["a"], r["b"]) for r in csv.DictReader(open(out / "paired.csv", encoding="utf-8"))]
    assert ("av\\xffg", "multi", "classic") in paired
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG" and "not drawn" not in captured.err


def test_a_missing_val_accuracy_says_whether_no_val_split_was_held_out(tmp_path):
    """split.val_size=0 (the probe fitted on every training image) has no validation accuracy by design:
    the table and the CSV say 'no val split', not 'not recorded' (which an older result without one gets)."""
    root = tmp_path / "sweep"
    write(root, "no_val", "classic", "avgpool", "linear", 0.77, eval_data={"name": "cifar10", "val_size": 0})
    write(root, "old", "classic", "avgpool", "knn", 0.70, eval_data={"name": "cifar10", "val_size": 5000})
    write(root, "with_val", "multi", "avgpool", "linear", 0.78, 0.79, eval_data={"name": "cifar10", "val_size": 0})
    report([root], tmp_path / "out")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): [c.strip() for c in line.strip("|").split("|")]
            for line in (tmp_path / "out" / "results.md").read_text().splitlines() if line.startswith("| ")}
    assert rows[("classic", "avgpool", "linear")][3:5] == ["77.00", "no val split"]
    assert rows[("classic", "avgpool", "knn")][3:5] == ["70.00", "not recorded"]
    assert rows[("multi", "avgpool", "linear")][3:5] == ["78.00", "79.00"]
    by_cell = {(r["loss"], r["repr"], r["eval"]): r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert by_cell[("classic", "avgpool", "linear")]["val_acc_mean_pct"] == "no val split"
    assert by_cell[("classic", "avgpool", "knn")]["val_acc_mean_pct"] == "not recorded"


def test_a_result_that_does_not_record_its_validation_split_is_not_recorded_not_no_val_split(tmp_path):
    """'no val split' only where the evaluation data says val_size=0: an older results.json without eval_data
    (the dataset's name in data, or nothing) keeps 'not recorded'."""
    root = tmp_path / "sweep"
    write(root, "named", "classic", "avgpool", "linear", 0.77, data="cifar10")
    write(root, "bare", "multi", "avgpool", "linear", 0.78)
    write(root, "held_out", "classic", "avgpool", "knn", 0.70, eval_data={"name": "cifar10", "split": "holdout"})
    report([root], tmp_path / "out")
    by_cell = {(r["loss"], r["repr"], r["eval"]): r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    for cell in (("classic", "avgpool", "linear"), ("multi", "avgpool", "linear"), ("classic", "avgpool", "knn")):
        assert by_cell[cell]["val_acc_mean_pct"] == "not recorded", cell


def test_the_report_of_an_evaluation_still_running_says_its_table_is_partial(tmp_path):
    """A report made while the evaluation sweep ran showed the cells done so far as complete ("The expected cell has
    results"), with the runs still to come nowhere. A job holding its folder's lock makes it say so instead."""
    import fcntl

    root = tmp_path / "ev"
    write(root / "0_eval=knn", "0_seed=0", "classic", "avgpool", "knn", 0.5)
    (root / "0_eval=knn" / ".hydra").mkdir()
    lock = root / "0_eval=knn" / ".lock"
    lock.write_text(str(os.getpid()))
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report([root], tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert (f"- {root}: still running (process {os.getpid()}): the table holds the results written so "
            f"far; report again once it has finished") in md


def test_a_result_that_says_ok_without_an_accuracy_is_skipped_by_name(tmp_path):
    """A hand-edited results.json with status ok and no test_acc was counted as a failed run with no reason and
    not among the skipped files; an embed result (no accuracy by design) is still read."""
    write(tmp_path, "edited", "classic", "avgpool", "knn", None)
    write(tmp_path, "embed", "classic", "avgpool", "embed", None)
    skipped = []
    results = load_results(sorted(tmp_path.glob("*/results.json")), skipped)
    assert [Path(r["_path"]).parent.name for r in results] == ["embed"]
    assert skipped == [(str(tmp_path / "edited" / "results.json"),
                        "status ok but no test_acc (only eval=embed measures no accuracy)")]
