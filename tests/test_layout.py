"""The package's shape: stages as subpackages, and the rule deployment rests on (the torch-free
stages, and predict.py with everything it imports, never import torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "brats"
TORCH_FREE = ("io", "data", "deploy")  # stages predict.py may use
TOP_LEVEL_MAX = 6  # modules beside __init__.py: the package's thin faces


def modules_of(stage: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (PACKAGE / stage).glob("*.py")
        if p.name != "__init__.py"
    )


def test_the_stages_are_subpackages_with_empty_inits():
    stages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert stages == ["data", "deploy", "evaluation", "io", "models", "runs", "training"]
    for stage in stages:
        assert (PACKAGE / stage / "__init__.py").read_text() == "", stage  # a re-export could pull torch in
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= TOP_LEVEL_MAX, top


def test_torch_free_stages_import_with_torch_made_unimportable(tmp_path):
    (tmp_path / "torch.py").write_text('raise ImportError("torch is blocked")\n')
    modules = [m for stage in TORCH_FREE for m in modules_of(stage)] + ["brats.errors"]
    assert len(modules) >= 10
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print('ok', len(sys.modules))\n"
    )
    env_path = f"{tmp_path}:{ROOT}"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": env_path}
    )
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_predict_help_runs_with_torch_made_unimportable(tmp_path):
    (tmp_path / "torch.py").write_text('raise ImportError("torch is blocked")\n')
    r = subprocess.run(
        [sys.executable, "predict.py", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(tmp_path), "COLUMNS": "120"},
    )
    assert r.returncode == 0 and "--cam" in r.stdout, r.stderr[-2000:]


def test_torch_free_stages_import_only_torch_free_stages():
    """Statically too: a module of a torch-free stage imports brats modules of those stages (and
    brats.errors) only, so the guard above cannot pass by a lazy import it never executes."""
    allowed = tuple(f"brats.{s}." for s in TORCH_FREE) + ("brats.errors",)
    for stage in TORCH_FREE:
        for path in (PACKAGE / stage).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brats"):
                    assert node.module.startswith(allowed), f"{path.name} imports {node.module}"
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                    assert not any(n == "torch" or n.startswith("torch.") for n in names), path.name


def test_no_function_in_the_package_is_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({n} lines)")
    assert not long, long
