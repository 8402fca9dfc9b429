"""Progress bars for long work: shown on a terminal, silent in pipes and with quiet=True.

Every bar names the step it is in and shows the time elapsed, never an estimate of the time left: the long steps
are time-limited searches, whose remaining time a rate cannot predict."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def show_progress(quiet: bool = False) -> bool:
    """True when a progress bar should be drawn (stderr is a terminal and the user did not ask for quiet)."""
    return not quiet and sys.stderr.isatty()


def _progress(*middle):
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), *middle, TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def track(items: Iterable[T], description: str, total: int | None = None, quiet: bool = False,
          name: Callable[[T], str] | None = None) -> Iterator[T]:
    """Iterate over `items` under a bar on stderr when `show_progress(quiet)`; `name(item)` is shown after
    `description` while that item is worked on (the solver running, say)."""
    if not show_progress(quiet):
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn

    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with _progress(BarColumn(), MofNCompleteColumn()) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            if name is not None:
                bar.update(task, description=f"{description}: {name(item)}")
            yield item
            bar.advance(task)


@contextmanager
def counter(description: str, total: int, unit: str, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A bar of `total` items that also counts `unit`s (tokens, say); yields advance(items, units)."""
    if not show_progress(quiet):
        yield lambda items, units: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    with _progress(BarColumn(), MofNCompleteColumn(), TextColumn(f"{{task.fields[units]}} {unit}")) as bar:
        task = bar.add_task(description, total=total, units=0)
        done = [0]

        def advance(items: int, units: int) -> None:
            done[0] += units
            bar.update(task, advance=items, units=done[0])
        yield advance


@contextmanager
def spinner(description: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A spinner naming the step while a block runs that cannot count its progress (a solver, say), with the time
    elapsed; yields step(description) to name the next step of the block."""
    if not show_progress(quiet):
        yield lambda description: None
        return
    with _progress() as bar:
        task = bar.add_task(description, total=None)
        yield lambda text: bar.update(task, description=text)
