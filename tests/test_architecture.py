"""The three layers and their import rules, and the size limits that keep each file readable.

byol/core       torch, torchvision, numpy, PIL only: the method, testable alone
byol/lightning  Lightning adapters: receive built objects, never read a config (no Hydra, no OmegaConf)
byol/jobs       the only code that reads the config: building objects, run folders, the jobs, the report
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "byol"
FRAMEWORKS = ("pytorch_lightning", "lightning", "hydra", "omegaconf")
CONFIG_LIBRARIES = ("hydra", "omegaconf")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules(layer: str) -> list[str]:
    return sorted(f"byol.{layer}.{p.stem}" for p in (PACKAGE / layer).glob("*.py") if p.stem != "__init__")


def loaded_after_import(names: list[str]) -> list[str]:
    """The top-level packages in sys.modules after importing ``names`` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_three_layers_exist():
    for layer in ("core", "lightning", "jobs"):
        assert modules(layer), f"byol/{layer}/ holds no module"


def test_core_imports_no_framework():
    loaded = loaded_after_import(modules("core"))
    assert not [f for f in FRAMEWORKS if f in loaded], "byol.core must import torch, torchvision, numpy, PIL only"


def test_adapters_read_no_config():
    loaded = loaded_after_import(modules("lightning"))
    assert not [f for f in CONFIG_LIBRARIES if f in loaded], "byol.lightning must not import Hydra or OmegaConf"


def test_load_encoder_needs_neither_lightning_nor_hydra():
    loaded = loaded_after_import(["byol.core.checkpoint"])
    assert "torch" in loaded and not [f for f in FRAMEWORKS if f in loaded]


def test_only_jobs_call_instantiate():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if "instantiate" in p.read_text() and p.parent.name != "jobs"]
    assert not offenders


def _python_files():
    return sorted([*PACKAGE.rglob("*.py"), ROOT / "train.py", ROOT / "evaluate.py"])


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: more than {MAX_MODULE_LINES} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
