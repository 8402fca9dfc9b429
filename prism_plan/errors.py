"""User-facing errors: one line that says what is wrong and how to fix it.

Library messages name Python parameters (`time_limit`, `budget_bytes`) and list them in `parameters`; the CLI
rewrites those names into the flags of the verb that was run.
"""

from __future__ import annotations

from typing import Iterable


class PrismError(ValueError):
    """An error caused by the caller's input; the CLI prints it as one line and exits with code 2.

    parameters: the Python parameter names the message mentions, for front ends that call them otherwise.
    """

    exit_code = 2

    def __init__(self, message: str, *, parameters: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.parameters = tuple(parameters)


class MissingInputError(PrismError, FileNotFoundError):
    """An input file or folder that does not exist."""


class InfeasibleError(PrismError):
    """The cluster cannot hold the placement that was asked for (memory, replicas, a move budget)."""


class TimeLimitError(PrismError):
    """The time limit ran out before any placement was found."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception` in a
    solver swallows it; the run stops and removes what it wrote. note: what the run leaves behind, for the
    user."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.note = "nothing was written and existing files are untouched"
