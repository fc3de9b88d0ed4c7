"""A progress bar on stderr for the benchmark loops: case i of n, and the case being timed.

Shown only when stderr is a terminal and --quiet is not given, so piped output, --json runs and CI logs get
nothing from it. The bar is transient (gone when the loop ends) and does not capture stdout: the commands
print their tables after the loop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

Case = TypeVar("Case")
Result = TypeVar("Result")


class CaseProgress:
    """`with CaseProgress(n, quiet=args.quiet) as progress:`, then `progress.case(name)` as each of the n
    cases starts."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        self.total, self.started = total, 0
        self._bar = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
            disable=quiet or not sys.stderr.isatty(),
        )
        self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> CaseProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def case(self, name: str) -> None:
        """Show `name` as the case now running, and the cases before it as done."""
        self.started += 1
        description = f"case {self.started} of {self.total}: {name}"
        self._bar.update(self._task, completed=self.started - 1, description=description, refresh=True)


def each_case(
    cases: Sequence[Case], run: Callable[[Case], Result], name: Callable[[Case], str], *, quiet: bool
) -> list[Result]:
    """[run(case) for case in cases], each shown by name(case) as it starts."""
    results = []
    with CaseProgress(len(cases), quiet=quiet) as progress:
        for case in cases:
            progress.case(name(case))
            results.append(run(case))
    return results
