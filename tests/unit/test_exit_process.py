"""exit_process: the exit code, flushed output, atexit handlers and non-daemon threads all kept;
only the interpreter's teardown is skipped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys, threading, time
    from reid_core.engine.exit_codes import exit_process

    out = sys.argv[1]
    logging.basicConfig(filename=out + ".log", level=logging.INFO, format="%(message)s")
    atexit.register(lambda: open(out + ".atexit", "w").write("ran"))

    class Teardown:
        def __del__(self, _open=open):  # runs only in the interpreter's teardown
            _open(out + ".teardown", "w").write("ran")

    keep = Teardown()

    def slow_writer():
        time.sleep(0.3)
        open(out + ".thread", "w").write("done")

    threading.Thread(target=slow_writer).start()
    logging.getLogger("x").info("logged before the exit")
    sys.stdout.write("buffered, no newline")
    exit_process(int(sys.argv[2]))
    """
)


def _run(tmp_path: Path, code: int) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), str(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_exit_process_keeps_code_output_handlers_and_threads(tmp_path: Path) -> None:
    done = _run(tmp_path, 75)
    assert done.returncode == 75, done.stderr
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "out.log").read_text() == "logged before the exit\n"
    assert (tmp_path / "out.atexit").read_text() == "ran"
    assert (tmp_path / "out.thread").read_text() == "done"
    # the teardown itself is what is skipped
    assert not (tmp_path / "out.teardown").exists()


def test_exit_process_with_zero(tmp_path: Path) -> None:
    assert _run(tmp_path, 0).returncode == 0
