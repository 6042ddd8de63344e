"""The package layout: subpackages whose ``__init__`` only hands names on, and a wheel that ships all of them."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine import db as dbmod

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"
SUBPACKAGES = sorted(p.parent.name for p in ENGINE.glob("*/__init__.py"))


def test_subpackages_exist() -> None:
    assert {"api", "cli", "webhooks"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_init_only_hands_names_on(name: str) -> None:
    """A subpackage's ``__init__`` is a docstring, imports from its own modules, and ``__all__`` naming
    exactly what it imported: no code of its own."""
    tree = ast.parse((ENGINE / name / "__init__.py").read_text(encoding="utf-8"))
    imported: set[str] = set()
    exported: list[str] | None = None
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None and node.module.startswith(f"engine.{name}."), ast.dump(node)
            imported |= {alias.asname or alias.name for alias in node.names}
            continue
        assert isinstance(node, ast.Assign), f"engine/{name}/__init__.py line {node.lineno}: not a hand-on"
        assert [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"]
        exported = ast.literal_eval(node.value)
    assert exported is not None and set(exported) == imported
    module = importlib.import_module(f"engine.{name}")
    for attr in exported:
        assert hasattr(module, attr), attr


def test_wheel_lists_every_package_and_its_sql() -> None:
    """``[tool.setuptools] packages`` is an explicit list: every (sub)package is in it, and every package
    holding .sql files ships them (``make package-check`` loads them from the installed wheel)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("engine", "venues")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert set(config["packages"]) == on_disk
    for package in on_disk:
        if any((ROOT / package.replace(".", "/")).glob("*.sql")):
            assert "*.sql" in config["package-data"].get(package, []), package


def test_every_query_file_is_found() -> None:
    """Each of ``db.QUERY_FILES`` (paths relative to the ``engine`` package) exists and has named queries."""
    for name in dbmod.QUERY_FILES:
        assert (ENGINE / name).is_file(), name
        assert dbmod.load_queries(name), name


def test_python_m_engine_cli_runs_the_console_script() -> None:
    """``python -m engine.cli`` is the ``credential-engine`` script (tests and bench start the server so)."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: credential-engine")
