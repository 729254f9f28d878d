"""bench/report.py: the parts of a benchmark's report every script shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import Transcript, command_line, table, targets_table, write_report


def test_table_lines() -> None:
    assert table(("a", "b"), [(1, "x"), (2.5, "")]) == [
        "| a | b |",
        "| --- | --- |",
        "| 1 | x |",
        "| 2.5 |  |",
    ]


def test_targets_table_rounds_the_measure() -> None:
    assert targets_table([("p99 (ms)", "< 50", 107.694, "FAIL")])[2] == (
        "| p99 (ms) | < 50 | 107.69 | FAIL |"
    )


def test_command_line_quotes_what_needs_it() -> None:
    assert command_line("x.py", ["--note", "a b"]) == "python bench/x.py --note 'a b'"
    assert command_line("x.py", []) == "python bench/x.py"


def test_the_report_ends_with_what_the_run_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transcript = Transcript()
    transcript.say("first")
    transcript.say("second")
    out = tmp_path / "results" / "r.md"

    write_report(out, ["# R", ""], transcript)

    assert out.read_text() == "# R\n\n## Output\n\n```\nfirst\nsecond\n```\n"
    assert capsys.readouterr().out == f"first\nsecond\nwrote {out}\n"
