"""The documentation's promises that a clean clone can check: the README's two set-up commands, the CI
script running the README's test command, and every file the Markdown documents link to or show."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "benchmarks").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def tracked_files() -> set[str] | None:
    """The repository's files as git knows them (None outside a git checkout): a file that exists here
    but is ignored or not committed would be missing from a clean clone."""
    if not shutil.which("git") or not (ROOT / ".git").exists():
        return None
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return set(out.decode().split("\0")) - {""}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_local_link_and_image_is_in_the_repository(doc):
    tracked = tracked_files()
    targets = {t.split("#")[0] for t in LINK.findall(doc.read_text(encoding="utf-8"))}
    local = sorted(t for t in targets if t and not re.match(r"[a-z]+://|mailto:", t))
    if doc.name == "README.md" and doc.parent == ROOT:
        assert len(local) >= 3, "the README's figures and files not found: is the link pattern still right?"
    problems = []
    for target in local:
        path = (doc.parent / target).resolve()
        rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else None
        if not path.exists():
            problems.append(f"{target}: does not exist")
        elif tracked is not None and path.is_file() and rel not in tracked:
            problems.append(f"{target}: not in git (ignored or untracked), so missing from a clean clone")
    assert not problems, f"{doc.name}: " + "; ".join(problems)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2, commands  # one runs the main job, one the tests
    (install, job), (install2, tests) = (c.split(" && ") for c in commands)
    assert install == install2 == 'pip install -e ".[dev]"' and job.startswith("python train.py")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"python -m {install}" in ci and f"{tests} -q" in ci, "CI installs and tests as the README says"


def tables(text: str) -> list[list[str]]:
    """The Markdown tables of ``text``: runs of lines starting with ``|``."""
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            found.append(current)
            current = []
    return found


@pytest.mark.parametrize("doc", [*DOCS, ROOT / "ARCHITECTURE.md"], ids=lambda p: p.name)
def test_every_table_renders_as_one(doc):
    """A table needs its `|---|` row under the header, and rows as wide as the header; the README's results
    tables once lost theirs and showed as a paragraph of pipes."""
    for table in tables(doc.read_text(encoding="utf-8")):
        width = table[0].count("|")
        assert len(table) >= 2 and re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", table[1]), table[0]
        assert all(row.replace("\\|", "").count("|") == width for row in table), table[0]


def test_the_readme_results_tables_are_the_reports_own():
    """The README shows the report's tables as `python -m byol.report` wrote them (its files are kept in
    benchmarks/results/, benchmarks/gpu.sh's in benchmarks/RESULTS.md): each README table with a report's
    header is, row for row, one of those."""
    reports = [*sorted((ROOT / "benchmarks" / "results").glob("*/results.md")), ROOT / "benchmarks" / "RESULTS.md"]
    written = [table for md in reports for table in tables(md.read_text(encoding="utf-8"))]
    headers = {table[0] for table in written}
    shown = [table for table in tables((ROOT / "README.md").read_text(encoding="utf-8")) if table[0] in headers]
    assert len(shown) >= 2  # the results table and the paired comparisons
    for table in shown:
        assert table in written, f"a README table differs from every report's: {table[0]}"
