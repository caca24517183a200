"""The house rules that a reviewer would otherwise check by eye: the layer order holds (and the check
would catch a violation), and function-local imports exist only for optional heavy dependencies."""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "afm_jax"
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")

# Imported inside functions on purpose: optional extras (torch, timm, transformers), or heavy modules
# only one code path needs (TensorFlow Datasets' builder, faiss, pydicom, array_record, tensorboardX).
LAZY_ALLOWED = (
    "torch",
    "timm",
    "transformers",
    "safetensors.torch",
    "tensorboardX",
    "tensorflow_datasets",
    "faiss",
    "pydicom",
    "array_record",
    "gdcm",
)


def _run_lint_imports(cwd: pathlib.Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
    )


def test_layer_contract_holds():
    result = _run_lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "lower,higher",
    [
        ("models", "afm_jax.train.loop"),
        ("data", "afm_jax.evaluation.metrics"),
        ("interop", "afm_jax.train.checkpoint"),
        ("data", "afm_jax.models.vit"),
        ("train", "afm_jax.evaluation.knn"),
    ],
)
def test_layer_contract_fails_on_a_deliberate_violation(tmp_path, lower, higher):
    """A copy of the package with one upward (or sideways) import, hidden inside a function: broken."""
    shutil.copytree(PACKAGE, tmp_path / "afm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "afm_jax" / lower / "violation.py").write_text(f"def sneaky():\n    import {higher}\n")
    result = _run_lint_imports(tmp_path)
    assert result.returncode != 0
    assert f"afm_jax.{lower}.violation -> {higher}" in result.stdout


def _function_local_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, node.module or ""))
    return found


def _block_is_commented(lines: list[str], index: int) -> bool:
    """True when the run of import lines around `lines[index]` carries a comment (on one of its lines,
    or on the line just above the run): the reason for importing lazily."""

    def is_import(i: int) -> bool:
        text = lines[i].strip()
        return text.startswith(("import ", "from ")) or (
            text and not text.startswith("#") and lines[i].startswith(" " * 12) and i > 0 and is_import(i - 1)
        )

    start = index
    while start > 0 and is_import(start - 1):
        start -= 1
    end = index
    while end + 1 < len(lines) and is_import(end + 1):
        end += 1
    return any("#" in lines[i] for i in range(start, end + 1)) or (
        start > 0 and lines[start - 1].strip().startswith("#")
    )


def test_function_local_imports_are_only_optional_heavy_dependencies():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for lineno, module in _function_local_imports(path):
            allowed = any(module == m or module.startswith(m + ".") for m in LAZY_ALLOWED)
            commented = _block_is_commented(lines, lineno - 1)
            if not (allowed and commented):
                offenders.append(f"{path.relative_to(REPO)}:{lineno} imports {module}")
    assert not offenders, "function-local imports (hoist them, or comment an optional dependency):\n" + "\n".join(
        offenders
    )


def test_no_tool_edits_sys_path_or_forces_a_platform():
    for path in sorted([*(REPO / "tools").glob("*.py"), *(REPO / "bench").glob("*.py")]):
        text = path.read_text()
        assert "sys.path" not in text, path
        assert "JAX_PLATFORMS" not in text, path
