"""The README's lifecycle diagram is the one drawn from the transitions.Machine, and the drawing is complete."""

from __future__ import annotations

import re
from pathlib import Path

from engine import lifecycle

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_diagram_is_drawn_from_the_machine() -> None:
    blocks = re.findall(r"```mermaid\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert blocks, "README has no mermaid block"
    assert blocks[0] == lifecycle.mermaid(), "README's diagram is stale: paste `python -m engine.lifecycle`"


def test_every_transition_of_the_table_is_an_arrow() -> None:
    drawn = lifecycle.mermaid()
    for trigger, dests in lifecycle.TABLE.items():
        for source, dest in dests.items():
            start = "[*]" if source == lifecycle.NEW else source
            arrow = re.search(rf"^    {re.escape(start)} --> {dest}: (.*)$", drawn, re.MULTILINE)
            assert arrow is not None and trigger in arrow.group(1).split(", "), (trigger, source, dest)
    assert "REVOKED --> PENDING" not in drawn and "REVOKED --> REVOKED" not in drawn
