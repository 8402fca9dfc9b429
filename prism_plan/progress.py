"""Progress bars for long work: shown on a terminal, silent in pipes and with quiet=True."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def show_progress(quiet: bool = False) -> bool:
    """True when a progress bar should be drawn (stderr is a terminal and the user did not ask for quiet)."""
    return not quiet and sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None, quiet: bool = False) -> Iterator[T]:
    """Iterate over `items`, drawing a progress bar on stderr when `show_progress(quiet)`."""
    if not show_progress(quiet):
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, console=Console(stderr=True),
                          transient=True)
