"""What every benchmark's report shares: the command that made it, the lines it printed (the
report's Output section) and the Markdown file it writes under ``bench/results/``."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["Transcript", "command_line", "table", "targets_table", "write_report"]


class Transcript:
    """The lines a benchmark prints, kept for its report."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(msg)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """``python bench/<script> <arguments>`` as the user typed it (``argv``: main's arguments,
    ``None`` for the process's own)."""
    args = sys.argv[1:] if argv is None else argv
    return f"python bench/{script} {shlex.join(args)}".strip()


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table's lines."""
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def targets_table(rows: Iterable[tuple[str, str, float, str]]) -> list[str]:
    """The Targets table: (target, rule, measured, verdict) per row, measured to 2 decimals."""
    return table(
        ("target", "rule", "measured", "verdict"),
        ((target, rule, f"{measured:.2f}", verdict) for target, rule, measured, verdict in rows),
    )


def write_report(path: Path, md: list[str], transcript: Transcript) -> None:
    """``md``, then the Output section (what the run printed), to ``path``."""
    md = [*md, "## Output", "", "```", *transcript.lines, "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md))
    print(f"wrote {path}")
