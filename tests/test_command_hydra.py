"""Hydra's own settings on the command line: a misspelt ``hydra.*`` key, an unknown group or option
(``hydra/launcher=ray``) and a key the chosen launcher lacks are one ``error:`` line with the key they resemble,
before Hydra composes anything (Hydra's own error spanned several lines and advised ``+hydra...``)."""

from __future__ import annotations

import pytest
from conftest import ROOT
from in_process import run_here

SHOWN = "(python train.py --cfg hydra prints Hydra's settings)"


@pytest.mark.parametrize("argv, expected", [
    (["experiment=smoke", "hydra.run.dri=x"], f"error: hydra.run.dri is not a setting of Hydra's; did you mean "
                                              f"hydra.run.dir? {SHOWN}"),
    (["hydra.rn.dir=x"], "error: hydra.rn.dir is not a setting of Hydra's; did you mean hydra.run.dir?"),
    (["hydra.job.chdri=false"], "error: hydra.job.chdri is not a setting of Hydra's; did you mean hydra.job.chdir?"),
    # Hydra's advice, followed: a key it never reads
    (["+hydra.run.dri=x"], f"error: +hydra.run.dri adds a key Hydra never reads; did you mean hydra.run.dir? {SHOWN}"),
    (["hydra/launcher=ray"], "error: hydra/launcher=ray is not an option of hydra/launcher; choose one of: basic, "
                             "joblib, submitit_local, submitit_slurm"),
    (["hydra/launcher=jobib"], "error: hydra/launcher=jobib is not an option of hydra/launcher (did you mean "
                               "hydra/launcher=joblib?)"),
    (["hydra/launchr=joblib"], "error: hydra/launchr is not a group of Hydra's; did you mean hydra/launcher?"),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_job=2"],
     "error: hydra.launcher.n_job is not a setting of hydra/launcher=joblib; did you mean hydra.launcher.n_jobs? "
     "(python train.py hydra/launcher=joblib --cfg hydra prints Hydra's settings)"),
    (["-m", "hydra.launcher.n_jobs=2"], "error: hydra.launcher.n_jobs is not a setting of hydra/launcher=basic; it is "
                                        "a setting of hydra/launcher=joblib: add hydra/launcher=joblib"),
    (["hydra.launcher=joblib"], "error: hydra.launcher=joblib sets a key; an option of Hydra's launcher is chosen "
                                "with hydra/launcher=joblib"),
    (["hydra.job_logging.root.levl=DEBUG"], "error: hydra.job_logging.root.levl is not a setting of "
                                            "hydra/job_logging=default; did you mean hydra.job_logging.root.level?"),
    # Hydra's own keys, and new keys where Hydra takes them
    (["hydra.run.dir=x", "hydra.job.chdir=false", "hydra.verbose=true", "hydra.sweep.subdir=y"], None),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1"], None),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=5"], None),
    (["hydra/launcher=basic", "hydra/sweeper=basic"], None),
    (["+hydra.job.env_set.FOO=1", "++hydra.launcher.extra=1", "hydra.job.config.override_dirname.exclude_keys=[a]"],
     None),
])
def test_a_hydra_key_or_option_hydra_lacks_is_one_line(argv, expected):
    from byol.jobs.command_hydra import hydra_problem
    from byol.jobs.command_line import _parse

    message = hydra_problem(_parse(tuple(argv)) or [], "train")
    if expected is None:
        assert message is None, message
    else:
        assert message is not None and message.startswith(expected), message


def test_a_misspelt_hydra_key_is_refused_before_hydra_makes_a_run_folder(tmp_path):
    """The whole command: one line, status 1, and no outputs/ folder (Hydra's error came after its own start)."""
    result = run_here(str(ROOT / "train.py"), "experiment=smoke", "hydra.run.dri=x", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: hydra.run.dri is not a setting of Hydra's; did you mean hydra.run.dir?")
    assert not (tmp_path / "outputs").exists()
