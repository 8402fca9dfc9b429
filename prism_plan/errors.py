"""User-facing errors: one line that says what is wrong and how to fix it."""


class PrismError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with code 2."""

    exit_code = 2


class InfeasibleError(PrismError):
    """The cluster cannot hold the placement that was asked for (memory, replicas)."""
