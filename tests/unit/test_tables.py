"""print_table: a case that did not run reads n/a, and its reason prints once under the table."""

import io

from rich.console import Console

from moekit.bench.tables import NotRun, print_table


def test_a_case_that_did_not_run_reads_n_a_with_its_reason_once_under_the_table():
    console = Console(file=io.StringIO(), width=120)
    cuda = NotRun("triton", "unsupported: a Triton kernel needs CUDA, or TRITON_INTERPRET=1 on the CPU")
    rows = [["loop", 1.5, 2.5], ["triton", cuda, cuda], ["batched", 3.5, NotRun("batched", "OOM: needs 9 GiB")]]
    print_table("ms", ["backend", "T=8", "T=16"], rows, console=console)
    printed = console.file.getvalue()
    table, notes = printed.split("└", 1)
    assert table.count("n/a") == 3 and "unsupported" not in table and "OOM" not in table
    assert notes.count("n/a  triton: unsupported: a Triton kernel needs CUDA, or TRITON_INTERPRET=1 on the CPU") == 1
    assert notes.count("n/a  batched: OOM: needs 9 GiB") == 1
    assert max(len(line) for line in table.splitlines()) < 40  # no column widened by a reason
