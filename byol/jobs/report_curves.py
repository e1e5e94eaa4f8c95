"""The report's overlay of learning curves: which training runs it draws and what tells them apart.

The runs: those with weights under the folders given, the jobs of a training sweep that failed or have no
weights yet (drawn as far as their metrics.csv goes, marked), and the runs the results evaluated. What tells
them apart: their loss, seed, and the overrides Hydra recorded for them (``.hydra/overrides.yaml``), each
valued from the run's config.yaml where it names a single setting, so that a default and an override of the
same value read alike.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from byol.core.errors import ByolError
from byol.jobs.figures import escaped
from byol.jobs.report_files import note_links

OVERLAY_IN_A_RUN = "curves_overlay.png"  # the overlay's name where curves.png is a run's own figure
MISSING = object()
IGNORED_OVERRIDES = ("hydra", "resume")  # where a run was written or resumed from: no setting of its training


def overlay_folders(folders: Sequence[str | Path], results: Sequence[dict]) -> dict[Path, str]:
    """``{run folder: why it has no model ("" when it has one)}``: the runs with weights under ``folders``, the
    training jobs of the sweeps among them that have none (failed, still training), the runs ``results`` name."""
    from byol.jobs.run_folder import failed_jobs, find_runs, job_kind, run_folder_of, why_no_model

    runs = {run.resolve(): "" for folder in folders for run in find_runs(Path(folder))}
    for folder in map(Path, folders):
        jobs = failed_jobs(folder) + ([(folder, why_no_model(folder))] if job_kind(folder) == "train" else [])
        runs.update({job.resolve(): why for job, why in jobs if why and job_kind(job) == "train"})
    for r in results:
        if r.get("pretrained") in (None, "", "random"):
            continue
        try:  # a path from a results.json: too long, a link loop... leaves that run's curves out
            if Path(r["pretrained"]).exists():
                runs.setdefault(run_folder_of(Path(r["pretrained"])).resolve(), "")
        except (OSError, ValueError, RuntimeError):
            continue
    return dict(sorted(runs.items()))


def run_settings(run: Path, config: dict, keys: Sequence[str]) -> dict[str, str]:
    """The run's value of each override key in ``keys``: its config.yaml's value where the key names one setting
    (``optim.base_lr``), else its own override (a config group: ``backbone=resnet50``), else ``default``."""
    from byol.jobs.report_labels import short_value
    from byol.jobs.sweep_plan import job_overrides

    overrides = job_overrides(run)
    values = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value.get(part, MISSING) if isinstance(value, dict) else MISSING
        single = value is not MISSING and not isinstance(value, dict)
        values[key] = short_value(value) if single else overrides.get(key, "default")
    return values


def described_runs(folders: Sequence[str | Path], results: Sequence[dict]) -> list:
    """The runs to overlay (:class:`~byol.jobs.curves_overlay.OverlayRun`); a run whose config.yaml cannot be
    read, or is no pretraining run's, is one note: what it is, its loss and seed, is not known."""
    from byol.jobs.build import loss_mode
    from byol.jobs.curves_overlay import OverlayRun
    from byol.jobs.pretrained import read_run_config
    from byol.jobs.sweep_plan import job_overrides

    found = []
    for run, status in overlay_folders(folders, results).items():
        try:
            config = read_run_config(run) or {}
            why = None if isinstance(config.get("loss"), dict) else "no config.yaml with a loss"
        except Exception as e:  # an unreadable or refused config: that run's curves are left out
            config, why = {}, f"config.yaml refused: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
        if why is not None:
            if (run / "metrics.csv").is_file():
                print(escaped(f"[report] note: {run} left out of the learning curves ({why})"), file=sys.stderr)
            continue
        found.append((OverlayRun(loss_mode(config["loss"]), f"seed {config.get('seed', '?')}", run, status=status),
                      config))
    keys = list(dict.fromkeys(k for r, _ in found for k in job_overrides(r.folder)
                              if k.split(".")[0] not in IGNORED_OVERRIDES))
    for r, config in found:
        r.settings = run_settings(r.folder, config, keys)
    return [r for r, _ in found]


def training_curves(folders: Sequence[str | Path], results: Sequence[dict], out: Path) -> Path | None:
    """``curves.png`` in ``out``: the learning curves of the training runs in ``folders`` and of the runs the
    results evaluated, overlaid (colour: loss mode and the settings that differ, line style: seed)."""
    from byol.jobs.curves import CURVES_FILE
    from byol.jobs.curves_overlay import overlay_curves
    from byol.jobs.run_folder import is_run_dir

    described = described_runs(folders, results)
    if not described:
        return None
    out.mkdir(parents=True, exist_ok=True)
    # a report written into a run folder keeps that run's own curves.png
    name = OVERLAY_IN_A_RUN if is_run_dir(out) else CURVES_FILE
    note_links([out / name])
    try:
        path = overlay_curves(described, out / name)
    except (OSError, ByolError):
        raise
    except Exception as e:  # the runs' files drew something matplotlib refused: a note, the table still comes
        print(escaped(f"[report] note: {name} not drawn ({type(e).__name__}: {str(e).strip()[:200]})"), file=sys.stderr)
        return None
    if path:
        print(escaped(f"[report] wrote {path}"))
    return path
