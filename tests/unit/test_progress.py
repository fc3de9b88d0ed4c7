"""CaseProgress: case i of n on stderr when it is a terminal, nothing when it is not or when quiet."""

import sys

import pytest

from moekit.bench.progress import CaseProgress

BAR = "━"  # rich's bar


def _two_cases(quiet: bool) -> None:
    with CaseProgress(2, quiet=quiet) as progress:
        progress.case("naive at T=64")
        progress.case("grouped_mm at T=64")


def test_a_terminal_sees_case_i_of_n_on_stderr(capsys, monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _two_cases(quiet=False)
    out, err = capsys.readouterr()
    assert "case 1 of 2: naive at T=64" in err and "case 2 of 2: grouped_mm at T=64" in err and BAR in err
    assert out == ""


@pytest.mark.parametrize("terminal", [False, True])
def test_nothing_is_shown_off_a_terminal_or_when_quiet(terminal, capfd, monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    _two_cases(quiet=terminal)
    assert capfd.readouterr() == ("", "")
