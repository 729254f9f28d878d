"""Where a job's and a gallery's files live, and what they are called: the one list of them.

A job's folder, ``<jobs_dir>/<job id>/``, is its trainer's run folder (``runtime.output_dir``):
reid_core's files (:class:`reid_core.run_dir.RunDir`: ``config.yaml``, ``train.log``,
``progress.json``, ``metrics.jsonl``, ``checkpoints/``, ``model_final.pt``) and the service's
(:class:`JobDir`)::

    job_config.yaml   the resolved config the trainer runs (written by the supervisor)
    tracking.json     where the trainer logs to MLflow (supervisor -> trainer)
    mlflow.json       what the trainer logged to MLflow so far (trainer -> supervisor)
    process.log       the trainer's output and the supervisor's notes (the API's /logs)
    trainer.pid       the trainer's process id

A gallery's folder, ``<data_dir>/galleries/<gallery id>/``: the index files
(:meth:`reid_core.inference.search.GalleryIndex.save`) and ``build.log``, the builder's output. The API and
the workers share ``data_dir`` and ``jobs_dir``. A new file of either folder gets its name here
(or, when the trainer writes it, in :class:`reid_core.run_dir.RunDir`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from reid_core.run_dir import Entry, RunDir
from service.core.settings import Settings

BUILD_LOG = "build.log"


class JobDir(RunDir):
    """A job's folder: its trainer's run folder and the service's files (see the module)."""

    job_config = Entry("job_config.yaml")
    tracking_spec = Entry("tracking.json")
    tracking_state = Entry("mlflow.json")
    process_log = Entry("process.log")
    trainer_pid = Entry("trainer.pid")


def job_dir(settings: Settings, job_id: uuid.UUID) -> JobDir:
    """``<jobs_dir>/<id>/``, absolute: the job's ``runtime.output_dir``."""
    return JobDir(settings.jobs_path.absolute() / str(job_id))


def gallery_dir(settings: Settings, gallery_id: uuid.UUID) -> Path:
    """``<data_dir>/galleries/<id>/``: the gallery's index and build log."""
    return settings.data_dir / "galleries" / str(gallery_id)
