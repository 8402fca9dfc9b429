"""Progress bars for long work: shown on a terminal, silent in pipes and with quiet=True."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

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


@contextmanager
def counter(description: str, total: int, unit: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A bar of `total` items that also counts `unit`s (tokens, say); yields advance(items, units)."""
    if not show_progress(quiet):
        yield lambda items, units: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(f"{{task.fields[units]}} {unit}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, units=0)
        done = [0]

        def advance(items: int, units: int) -> None:
            done[0] += units
            bar.update(task, advance=items, units=done[0])
        yield advance


@contextmanager
def spinner(description: str, quiet: bool = False) -> Iterator[None]:
    """A spinner naming the step while a block runs that cannot count its progress (a solver, say)."""
    if not show_progress(quiet):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(description):
        yield
