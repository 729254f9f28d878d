"""Exit codes of ``python -m reid_core.train``; the job supervisor maps them to job states.

| code | name        | meaning                                                          | supervisor  |
|------|-------------|------------------------------------------------------------------|-------------|
| 0    | OK          | training finished                                                | SUCCEEDED   |
| 1    | CRASHED     | an unexpected error (a bug, CUDA error, ...)                     | retry       |
| 2    | BAD_CONFIG  | the configuration was rejected (message on stderr)               | FAILED      |
| 3    | BAD_DATA    | the dataset is missing, empty, or has too many unreadable images  | FAILED      |
| 4    | NO_SPACE    | a checkpoint could not be written (disk full, read-only, ...)     | FAILED      |
| 5    | DIVERGED    | the loss became NaN/inf (message names the step and the terms)    | FAILED      |
| 75   | INTERRUPTED | SIGTERM/SIGINT: a checkpoint was written, ``resume: auto`` goes on | CANCELLED or retry |

A training process ends through :func:`exit_process`, which skips the interpreter's teardown.
"""

import atexit
import contextlib
import logging
import os
import sys
import threading
from enum import IntEnum
from typing import NoReturn

__all__ = ["ExitCode", "exit_process"]


class ExitCode(IntEnum):
    OK = 0
    CRASHED = 1
    BAD_CONFIG = 2
    BAD_DATA = 3
    NO_SPACE = 4
    DIVERGED = 5
    INTERRUPTED = 75  # EX_TEMPFAIL: "try again later"


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` once its work is saved, without the interpreter's teardown.

    Waits for the threads that are not daemons, runs the ``atexit`` handlers (multiprocessing's
    clean-up of loader workers, the logging flush, ...), flushes stdout and stderr, then
    ``os._exit(code)``. What is skipped is the finalisation of every module and object, which
    with torch, torchvision and MLflow loaded takes 3-4 s on a CPU (bench/scheduling.py): time
    a worker would otherwise spend per job with its result already written.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # closed, or a broken pipe: nothing more can be written
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(int(code))
