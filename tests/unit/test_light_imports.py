"""The engine's core and the probe seam load without the HTTP client.

``venues.base`` (the probe protocol and its values) is imported by the engine's models, config and crypto; the
HTTP probe (``venues.http``) and so aiohttp, multidict and yarl load only when a probe is built. Each check runs
in a fresh interpreter: this test process has long imported aiohttp.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTTP_STACK = ("aiohttp", "multidict", "yarl")


def _loaded_after(statement: str) -> list[str]:
    """The HTTP-stack packages present in ``sys.modules`` after running ``statement`` in a new interpreter."""
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {HTTP_STACK!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize(
    "module", ["engine.crypto", "engine.models", "engine.config", "venues.base", "venues"]
)
def test_core_modules_do_not_load_the_http_client(module: str) -> None:
    assert _loaded_after(f"import {module}") == []


def test_the_check_sees_the_http_client_when_it_loads() -> None:
    """The check is not blind: importing the HTTP probe (as building a probe does) loads all three."""
    assert _loaded_after("import venues.http") == list(HTTP_STACK)
