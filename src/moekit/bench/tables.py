"""Printing benchmark results as rich tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass(frozen=True)
class NotRun:
    """The cell of a case that did not run (unsupported, OOM): printed as n/a, and `case: reason` once under
    the table."""

    case: str
    reason: str


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence], console: Console | None = None):
    """One rich table: a header of `columns`, then `rows`, then the reasons of its NotRun cells, each once;
    a console that is not a terminal is 200 wide."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(escape(format_value(v)) for v in row))  # "case[param]" is not rich markup
    notes = dict.fromkeys(f"n/a  {v.case}: {v.reason}" for row in rows for v in row if isinstance(v, NotRun))
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)


def format_value(value) -> str:
    """Floats: thousands separators from 100 up, else 3 significant digits; NotRun: n/a; the rest: str()."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, NotRun):
        return "n/a"
    return str(value)
