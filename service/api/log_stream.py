"""A job's log as server-sent events: the last lines, then each new line as it is written.

Every line is one ``data:`` event whose ``id`` is the byte offset just after it, so a client
that reconnects with ``Last-Event-ID`` (``EventSource`` does it by itself) continues where it
stopped. When the job is in a final state and the log has no more lines, an ``end`` event
carrying the state closes the stream. A comment line every ``keepalive_s`` keeps proxies from
closing an idle connection.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def tail_offset(path: Path, lines: int) -> int:
    """Byte offset at which the last ``lines`` lines of ``path`` start (0 when shorter)."""
    if not path.is_file():
        return 0
    if lines <= 0:
        return path.stat().st_size
    starts: collections.deque[int] = collections.deque(maxlen=lines)
    offset = 0
    with path.open("rb") as f:
        for line in f:
            starts.append(offset)
            offset += len(line)
    return starts[0] if starts else 0


def _event(line: bytes, offset: int) -> str:
    text = line.decode("utf-8", errors="replace").rstrip("\n")
    text = text.rsplit("\r", 1)[-1]  # a progress bar redrawn in place: its last state
    return f"id: {offset}\ndata: {text}\n\n"


def follow_log(
    path: Path,
    start: int,
    final_state: Callable[[], str | None],
    poll_s: float = 0.5,
    keepalive_s: float = 15.0,
) -> Iterator[str]:
    """SSE text for the lines of ``path`` from byte ``start`` on, until ``final_state()`` names a
    final state and everything is sent. ``final_state`` is called once per idle poll; it returns
    the job's state when final, else None."""
    offset = start  # bytes read so far
    consumed = start  # bytes sent as whole lines; ``pending`` holds the rest
    pending = b""
    last_sent = time.monotonic()
    while True:
        chunk = b""
        if path.is_file():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read(1 << 20)
        if chunk:
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                consumed += len(line) + 1
                yield _event(line, consumed)  # id: where a reconnect resumes
            last_sent = time.monotonic()
            continue
        state = final_state()
        if state is not None:
            if pending:
                yield _event(pending, offset)
            yield f"event: end\ndata: {state}\n\n"
            return
        now = time.monotonic()
        if now - last_sent >= keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = now
        time.sleep(poll_s)
