"""The package's layering is a checked contract (``[tool.importlinter]`` in pyproject.toml), and so is its lint."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def assert_python_succeeds(*args: str) -> None:
    """Run ``python ARGS`` in the repository root; on failure show what it printed."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold():
    """In its own process: import-linter configures logging with ``dictConfig``, which disables every logger that
    exists (Lightning's included) in the process that calls it."""
    lint = ("from importlinter.cli import lint_imports; "
            "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True))")
    assert_python_succeeds("-c", lint)


def test_the_repository_passes_ruff():
    """The rules pinned in pyproject.toml (pyflakes and pycodestyle's errors) over the package, tests and benchmarks."""
    assert_python_succeeds("-m", "ruff", "check", "--no-cache", "--output-format", "concise", ".")


PACKAGE = ROOT / "lightning_compress"


def _docstring_lines(tree: ast.AST) -> int:
    lines = 0
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines += first.end_lineno - first.lineno + 1
    return lines


def test_modules_are_small():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {name: size for name, size in sizes.items() if size > 600} == {}


def test_docstrings_are_at_most_35_percent_of_the_package():
    total = documented = 0
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        total += len(text.splitlines())
        documented += _docstring_lines(ast.parse(text))
    assert documented / total <= 0.35, f"docstrings are {documented / total:.1%} of {total} lines"
