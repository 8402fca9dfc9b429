"""Click plumbing shared by the `prism-plan` verbs: each verb one output transaction over its declared inputs
and outputs, library errors shown with the verb's own flags, commands listed in pipeline order, the options
several verbs share, and printing a summary as JSON or text."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click

from prism_plan.errors import Interrupted, PrismError
from prism_plan.fileio import bundled_or_given, check_distinct, check_output, transaction


class Input(click.Path):
    """A file or folder the verb reads."""


class InputName(click.ParamType):
    """An input given as a path or as a name (a bundled cluster, a model preset): kept as the string given."""

    name = "text"

    def __init__(self, suffix: str = "") -> None:
        self.suffix = suffix

    def path(self, value: str) -> Path:
        """The file `value` names, where it names one."""
        return bundled_or_given(value, self.suffix) if self.suffix else Path(value)


class Output(click.Path):
    """A file the verb writes (kind "file"), a folder it writes files into ("folder"), or either, as the other
    options decide (None: the library checks it)."""

    def __init__(self, kind: str | None = "file") -> None:
        super().__init__(path_type=Path)
        self.kind = kind


class Finite(click.FloatRange):
    """A float range that also refuses nan and inf."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Counts(click.ParamType):
    """Comma-separated whole numbers (at least one, none negative): `13,14`."""

    name = "n,n,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if not all(p.strip().isdigit() for p in parts):
            self.fail(f"{value!r} is not a comma-separated list of whole numbers such as 13,14", param, ctx)
        return tuple(int(p) for p in parts)


FILE = Input(path_type=Path)
OUT = Output()
POSITIVE_SECONDS = Finite(min=0, min_open=True)
# Library parameters whose flag carries another name (the rest share the flag's name).
FLAG_OF = {"budget_bytes": "budget_gib", "out": "output", "journal_dir": "journal", "timeout_s": "timeout",
           "current": "plan"}


class Command(click.Command):
    """A verb run as one output transaction: its outputs checked against its inputs and each other before any
    work, written only when all succeed; its library errors name its own flags instead of Python parameters."""

    # What an interrupt leaves behind, for verbs whose work outlives the run (None: nothing, as the transaction
    # removes every output).
    interrupted_note: str | None = None

    def files(self, params: dict) -> tuple[list[Path], list[tuple[Path, str | None]]]:
        """(the inputs, the (output, kind) pairs) among the parsed `params`."""
        inputs, outputs = [], []
        for p in self.params:
            value = params.get(p.name)
            if value is None:
                continue
            if isinstance(p.type, Input):
                inputs.append(Path(value))
            elif isinstance(p.type, InputName):
                inputs.append(p.type.path(value))
            elif isinstance(p.type, Output):
                outputs.append((Path(value), p.type.kind))
        return inputs, outputs

    def invoke(self, ctx: click.Context):
        tx = None
        try:
            inputs, outputs = self.files(ctx.params)
            check_distinct(inputs, [path for path, _ in outputs])
            with transaction() as tx:
                for path, kind in outputs:
                    if kind is not None:
                        check_output(path, folder=kind == "folder")
                        tx.probe(path, folder=kind == "folder")
                return super().invoke(ctx)
        except Interrupted as e:
            if tx is not None and tx.committed:
                e.note = "the run had finished: its outputs are written"
            elif self.interrupted_note is not None:
                e.note = self.interrupted_note
            raise
        except PrismError as e:
            flags = {p.name: max(p.opts, key=len) for p in self.params if isinstance(p, click.Option)}
            for name in e.parameters:
                flag = flags.get(FLAG_OF.get(name, name), name.replace("_", " "))
                e.args = (re.sub(rf"`{re.escape(name)}`", flag, str(e)),)
            raise
        except EOFError as e:  # click would call it an abort; it is an input file that ends early
            raise PrismError(f"an input file ends early ({e or 'end of file'}); is it truncated? write it again")


class ResumableCommand(Command):
    """A verb whose stages are journaled, so an interrupted run resumes (apply)."""

    interrupted_note = "the journals keep the stages done; run the same command again to resume"


class Group(click.Group):
    """Commands listed in pipeline order, each a `Command`."""

    command_class = Command
    group_class = type

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def outputs(what: str, required: bool = True, default: Path | None = None, kind: str | None = "file"):
    """-o/--output (an Output of `kind`), --quiet and --json, the options of every verb that writes."""
    # click 8.5 takes an explicit default of None as a value given, and a required option then goes unchecked
    given = {} if default is None else {"default": default, "show_default": True}
    return lambda f: click.option("-o", "--output", type=Output(kind), required=required, help=what, **given)(
        click.option("--quiet", is_flag=True, help="No progress display (also off in pipes).")(
            click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")(f)))


def say(as_json: bool, summary, lines) -> None:
    """The summary as JSON, or the lines (one string or several) for people."""
    click.echo(json.dumps(summary, indent=1, default=float) if as_json else
               lines if isinstance(lines, str) else "\n".join(lines))


PLAN = click.option("--plan", type=FILE, required=True, help="Plan (.json).")
CLUSTER_FILE = InputName(".toml")
CLUSTER = click.option("--cluster", type=CLUSTER_FILE, required=True,
                       help="Cluster TOML, or the name of a bundled one (edge-4).")
MODEL = InputName()
NO_WEIGHTS = click.option("--no-weights", is_flag=True, help="Leave gate weights out (a much smaller file).")
CONCURRENCY = click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
                           help="Requests per origin batched in one step when replaying a trace.")
