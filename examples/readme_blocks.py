"""Blocks of a Markdown file that a script writes: what it measured goes between the block's markers,
``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, so that no figure in the README is typed by hand."""

from __future__ import annotations

import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of the block ``name``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def rewrite_block(readme: Path, name: str, block: str) -> None:
    """Replace what lies between the markers of the block ``name`` in the Markdown file ``readme`` by ``block``."""
    start, end = markers(name)
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"readme {readme} must hold exactly one {start} ... {end} block")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{block}\n{end}", text))
