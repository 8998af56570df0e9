"""The last step of a benchmark script: its markdown report on the terminal and in a file."""
from __future__ import annotations

from pathlib import Path


def publish(text: str, out: str | Path) -> None:
    """Print ``text`` after a blank line and write it to ``out`` (its folder is made)."""
    print()
    print(text)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
