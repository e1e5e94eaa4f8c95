"""What a sweep's command planned, against the job folders the sweep holds: a command stopped before its last
jobs leaves no folder for them, and the evaluation and the report, which see folders only, called such a sweep
complete. The plan is Hydra's record of the command (``multirun.yaml``), read as untrusted data."""

from __future__ import annotations

import itertools
from pathlib import Path

from byol.jobs.run_folder import HYDRA_DIR, MAX_CONFIG_BYTES, SWEEP_RECORD, sweep_jobs

MAX_PLANNED = 10_000  # a record planning more jobs than this is not expanded (a crafted one could plan billions)


def _settings(lines) -> dict[str, str]:
    """``{key: value}`` of override lines such as ``seed=8`` (a ``+`` or ``++`` before the key dropped)."""
    out = {}
    for line in lines if isinstance(lines, list) else []:
        if isinstance(line, str) and "=" in line and not line.startswith("~"):
            key, _, value = line.partition("=")
            out[key.lstrip("+")] = value
    return out


def _read(path: Path):
    from omegaconf import OmegaConf

    from byol.jobs.handed_yaml import refuse_unsafe_yaml

    if path.stat().st_size > MAX_CONFIG_BYTES:  # Hydra's records take a few kB, as a run's config.yaml
        raise ValueError(f"{path} holds more than {MAX_CONFIG_BYTES:,} bytes")
    text = path.read_text()
    refuse_unsafe_yaml(text)
    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def job_overrides(job: Path) -> dict[str, str]:
    """``{key: value}`` of the overrides Hydra recorded for ``job`` (``.hydra/overrides.yaml``); {} when there
    is no record or it cannot be read (data from whoever wrote the folder)."""
    try:
        return _settings(_read(Path(job) / HYDRA_DIR / "overrides.yaml"))
    except Exception:
        return {}


def unstarted_jobs(sweep: Path) -> list[str]:
    """The jobs ``sweep``'s command planned that have no folder in it, each as its swept settings
    (``seed=8``, ``eval=finetune repr=combined``); [] when the plan cannot be read or expanded (it is then
    not claimed either way)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = Path(sweep)
    try:
        task = _read(sweep / SWEEP_RECORD)["hydra"]["overrides"]["task"]
        swept = {}
        for override in OverridesParser.create().parse_overrides([t for t in task if isinstance(t, str)]):
            if override.is_sweep_override():
                swept[override.get_key_element().lstrip("+")] = [str(v) for v in override.sweep_string_iterator()]
        if not swept or len(list(itertools.islice(itertools.product(*swept.values()), MAX_PLANNED + 1))) > MAX_PLANNED:
            return []
        present = set()
        for job in sweep_jobs(sweep):
            done = _settings(_read(job / HYDRA_DIR / "overrides.yaml")) if (job / HYDRA_DIR).is_dir() else {}
            present.add(tuple(done.get(key) for key in swept))
    except Exception:  # no record, or one this cannot read: nothing said
        return []
    return [" ".join(f"{key}={value}" for key, value in zip(swept, values, strict=True))
            for values in itertools.product(*swept.values()) if values not in present]


def unstarted_note(sweep: Path, what: str) -> str | None:
    """One line naming the planned jobs of ``sweep`` that never started, or None."""
    missing = unstarted_jobs(sweep)
    if not missing:
        return None
    shown = "; ".join(missing[:6]) + ("; ..." if len(missing) > 6 else "")
    return (f"{len(missing)} job(s) its command planned ({SWEEP_RECORD}) never started, so {what}: {shown} (run the "
            f"sweep's command again to start them)")


def renumbered_jobs(argv: list[str], sweep: Path) -> str | None:
    """The error line for a training sweep command that would train again, under another job number, a job that
    already has a folder in ``sweep``: Hydra numbers a sweep's jobs in the order of its lists (0_..., 1_...), and a
    finished job is skipped only in its own folder, so a longer seed list or another order trained finished runs
    again beside themselves, without a word. None when each planned job is new or keeps its number."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = [o for o in OverridesParser.create().parse_overrides([a for a in argv if "=" in a and
                                                                       not a.startswith("-")])
                  if not o.get_key_element().lstrip("+").startswith("hydra")]
        lists = [[str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override()
                 else [o.get_value_element_as_str()] for o in parsed]
        keys = [o.get_key_element().lstrip("+") for o in parsed]
        earlier = {}
        for job in sweep_jobs(sweep):
            if (job / HYDRA_DIR / "overrides.yaml").is_file():
                earlier[tuple(sorted(_settings(_read(job / HYDRA_DIR / "overrides.yaml")).items()))] = job
        if not earlier:
            return None
        for number, values in enumerate(itertools.islice(itertools.product(*lists), MAX_PLANNED)):
            job = earlier.get(tuple(sorted(zip(keys, values, strict=True))))
            if job is not None and not job.name.startswith(f"{number}_"):
                shown = " ".join(f"{k}={v}" for k, v, o in zip(keys, values, parsed, strict=True)
                                 if o.is_sweep_override())
                return (f"error: this sweep would train {shown} again as job {number}: it has a folder already "
                        f"({job.name}). Hydra numbers a sweep's jobs in the order of its lists, and a finished job "
                        f"is skipped only under its own number; keep the earlier command's lists and order, or "
                        f"sweep the new values into another folder (hydra.sweep.dir=NEW) and report both folders")
    except Exception:  # a command Hydra cannot parse (it says why), or a record this cannot read
        return None
    return None
