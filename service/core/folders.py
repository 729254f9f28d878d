"""Where a job's and a gallery's files live, and what they are called: the one list of them.

A job's folder, ``<jobs_dir>/<job id>/`` (the trainer's ``runtime.output_dir``)::

    job_config.yaml   the resolved config the trainer runs (written by the supervisor)
    tracking.json     where the trainer logs to MLflow (supervisor -> trainer)
    mlflow.json       what the trainer logged to MLflow so far (trainer -> supervisor)
    process.log       the trainer's output and the supervisor's notes (the API's /logs)
    trainer.pid       the trainer's process id
    progress.json     the trainer's progress, rewritten as it goes (reid_core's ProgressHook)
    metrics.jsonl     one record per finished epoch (reid_core's ProgressHook; the API's /metrics)

A gallery's folder, ``<data_dir>/galleries/<gallery id>/``: the index files
(:meth:`reid_core.search.GalleryIndex.save`) and ``build.log``, the builder's output. The API and
the workers share ``data_dir`` and ``jobs_dir``. A new file of either folder gets its name here.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from service.core.settings import Settings

__all__ = [
    "BUILD_LOG",
    "CONFIG_FILE",
    "LOG_FILE",
    "METRICS_FILE",
    "PID_FILE",
    "PROGRESS_FILE",
    "SPEC_FILE",
    "STATE_FILE",
    "gallery_dir",
    "job_dir",
]

CONFIG_FILE = "job_config.yaml"
SPEC_FILE = "tracking.json"
STATE_FILE = "mlflow.json"
LOG_FILE = "process.log"
PID_FILE = "trainer.pid"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"

BUILD_LOG = "build.log"


def job_dir(settings: Settings, job_id: uuid.UUID) -> Path:
    """``<jobs_dir>/<id>/``, absolute: the job's ``runtime.output_dir``."""
    return settings.jobs_path.absolute() / str(job_id)


def gallery_dir(settings: Settings, gallery_id: uuid.UUID) -> Path:
    """``<data_dir>/galleries/<id>/``: the gallery's index and build log."""
    return settings.data_dir / "galleries" / str(gallery_id)
