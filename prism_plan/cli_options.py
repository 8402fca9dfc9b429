"""Click plumbing shared by the `prism-plan` verbs: library errors shown with the verb's own flags, commands
listed in pipeline order, the options several verbs share, and printing a summary as JSON or text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from prism_plan.errors import PrismError

FILE = click.Path(path_type=Path)
POSITIVE_SECONDS = click.FloatRange(min=0, min_open=True)
# Library parameters whose flag carries another name (the rest share the flag's name).
FLAG_OF = {"budget_bytes": "budget_gib", "out": "output", "journal_dir": "journal", "timeout_s": "timeout",
           "current": "plan"}


class Command(click.Command):
    """A verb whose library errors name its own flags instead of the Python parameters."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PrismError as e:
            flags = {p.name: max(p.opts, key=len) for p in self.params if isinstance(p, click.Option)}
            for name in e.parameters:
                flag = flags.get(FLAG_OF.get(name, name), name.replace("_", " "))
                e.args = (re.sub(rf"`{re.escape(name)}`", flag, str(e)),)
            raise


class Group(click.Group):
    """Commands listed in pipeline order, each a `Command`."""

    command_class = Command
    group_class = type

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def outputs(what: str, required: bool = True, default: Path | None = None):
    """-o/--output, --quiet and --json, the options of every verb that writes."""
    return lambda f: click.option("-o", "--output", type=FILE, required=required, default=default, help=what,
                                  show_default=default is not None)(
        click.option("--quiet", is_flag=True, help="No progress display (also off in pipes).")(
            click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")(f)))


def say(as_json: bool, summary, lines) -> None:
    """The summary as JSON, or the lines (one string or several) for people."""
    click.echo(json.dumps(summary, indent=1, default=float) if as_json else
               lines if isinstance(lines, str) else "\n".join(lines))


PLAN = click.option("--plan", type=FILE, required=True, help="Plan (.json).")
CLUSTER = click.option("--cluster", required=True, help="Cluster TOML, or the name of a bundled one (edge-4).")
NO_WEIGHTS = click.option("--no-weights", is_flag=True, help="Leave gate weights out (a much smaller file).")
CONCURRENCY = click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
                           help="Requests per origin batched in one step when replaying a trace.")
