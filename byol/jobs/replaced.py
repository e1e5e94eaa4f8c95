"""An evaluation run again into its folder: the earlier one kept whole, under names the report does not read."""

from __future__ import annotations

import json
import time
from pathlib import Path

from byol.core.checkpoint import atomic_write_bytes
from byol.jobs.run_folder import CONFIG_FILE, METRICS_FILE


def keep_earlier_evaluation(folder: Path, results_file: str = "results.json") -> list[str]:
    """When ``folder`` holds a finished evaluation (its ``results_file``) about to be evaluated again, keep
    every file of it under ``<stem>.replaced-<its time><suffix>``, which the report does not read: the
    results (a copy whose file names point at the kept files), metrics.csv, config.yaml, embeddings and maps.
    The earlier ``results_file`` itself stays until the new one replaces it in one atomic write, so an
    evaluation stopped half-way leaves the earlier result readable. Returns the kept names."""
    results = Path(folder) / results_file
    if not results.is_file() or results.is_symlink():  # a link's target is not this folder's to copy
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(results.stat().st_mtime))
    outputs = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.is_symlink()
               and ".replaced-" not in p.name and p.name != results_file
               and (p.name in EVALUATION_OUTPUTS or p.name.startswith(MAP_PREFIX))]
    renamed = {}
    for path in outputs:  # moved away: the new evaluation starts without them
        target = _free_name(path, stamp)
        path.replace(target)
        renamed[path.name] = target.name
    try:
        earlier = json.loads(results.read_text())
    except (OSError, ValueError):
        earlier = None
    kept = _free_name(results, stamp)
    if isinstance(earlier, dict) and renamed and ({"embeddings", "maps"} & set(earlier)):  # name the kept files
        earlier = {k: _renamed_in(v, renamed) if k in ("embeddings", "maps") else v for k, v in earlier.items()}
        atomic_write_bytes((json.dumps(earlier, indent=2) + "\n").encode(), kept)
    else:
        atomic_write_bytes(results.read_bytes(), kept)
    return [kept.name, *renamed.values()]


def set_aside_evaluation(folder: Path, results_file: str = "results.json") -> list[str]:
    """:func:`keep_earlier_evaluation` for a folder that no new evaluation will fill: its result is kept under
    the ``.replaced-`` name only, so that the report no longer reads it. Returns the kept names."""
    kept = keep_earlier_evaluation(folder, results_file)
    if kept:
        (Path(folder) / results_file).unlink()
    return kept


EVALUATION_OUTPUTS = (METRICS_FILE, CONFIG_FILE, "embeddings.pt")
MAP_PREFIX = "tsne_"  # the maps of eval=embed: tsne_<part>.png


def _free_name(path: Path, stamp: str) -> Path:
    """``<stem>.replaced-<stamp><suffix>`` beside ``path``, numbered when taken (replaced twice in a second)."""
    target, n = path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}"), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.stem}.replaced-{stamp}-{n}{path.suffix}")
    return target


def _renamed_in(value, renamed: dict):
    """``value`` (a file name, or a mapping / list of them) with each renamed file's new name."""
    if isinstance(value, str):
        return renamed.get(value, value)
    if isinstance(value, dict):
        return {k: _renamed_in(v, renamed) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed_in(v, renamed) for v in value]
    return value
