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
"""

from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    OK = 0
    CRASHED = 1
    BAD_CONFIG = 2
    BAD_DATA = 3
    NO_SPACE = 4
    DIVERGED = 5
    INTERRUPTED = 75  # EX_TEMPFAIL: "try again later"
