"""The public surface: what ``engine`` exports, and the error tree its docstring draws."""

from __future__ import annotations

import inspect
import re

import engine
from engine import errors


def test_all_lists_exactly_the_public_names() -> None:
    """``engine.__all__`` equals the module's public names, so nothing is exported by accident."""
    lazy = {
        "CredentialEngine",
        "KeyLease",
        "LeaseChange",
        "RewrapReport",
    }  # loaded on first use (__getattr__)
    public = {name for name in vars(engine) if not name.startswith("_")} | lazy
    submodules = {name for name in public if inspect.ismodule(getattr(engine, name))}
    assert set(engine.__all__) == public - (submodules - {"errors"}) - {"TYPE_CHECKING", "Any"}
    assert sorted(engine.__all__) == engine.__all__


def test_contract_names_exist() -> None:
    """The names other parts and users rely on are importable from ``engine``."""
    for name in ("CredentialEngine", "EngineConfig", "Venue", "CredentialType", "CredentialStatus"):
        assert hasattr(engine, name), name
    assert [v.value for v in engine.Venue] == ["BINANCE", "OKX", "BYBIT", "COINBASE", "KRAKEN"]
    assert [s.value for s in engine.CredentialStatus] == ["PENDING", "VERIFIED", "FAILED", "REVOKED"]


def test_error_tree_in_docstring_matches_the_classes() -> None:
    """Every error class appears in errors.py's drawn tree under its real parent, with its status and errno."""
    doc = errors.__doc__ or ""
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.CredentialEngineError)
    }
    drawn = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        m = re.match(r"^([\s│├└─]*)([A-Z][A-Za-z]+)\b(.*)$", line)
        if not m or m.group(2) not in classes:
            continue
        depth = len(m.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        drawn[m.group(2)] = (stack[-1][1] if stack else None, m.group(3))
        stack.append((depth, m.group(2)))
    assert set(drawn) == set(classes)
    for name, (parent, rest) in drawn.items():
        cls = classes[name]
        if parent is not None:
            assert cls.__mro__[1].__name__ == parent, name
        if name != "CredentialEngineError":
            numbers = re.findall(r"-?\d+", rest)
            assert int(numbers[0]) == cls.http_status, name
            assert int(numbers[1]) == cls.errno, name


def test_errnos_are_unique_and_negative() -> None:
    """Each error kind has its own stable negative errno (the REST API documents them)."""
    classes = [
        c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, errors.CredentialEngineError)
    ]
    numbers = [c.errno for c in classes]
    assert all(n < 0 for n in numbers)
    assert len(set(numbers)) == len(numbers)
