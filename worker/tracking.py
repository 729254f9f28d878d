"""A job's MLflow tracking: the two small files the supervisor and the trainer exchange.

The supervisor (a Celery process: no torch) writes a :class:`TrackingSpec` to
``<output_dir>/tracking.json`` before it starts the trainer; the trainer's
:class:`worker.mlflow_hook.MLflowHook` reads it, talks to MLflow, and records what it achieved
in ``<output_dir>/mlflow.json`` (:class:`TrackingState`) after each change. The supervisor copies
that state into the job (run id, model version, warnings) and, when the job reaches a final
state, marks the run terminated. Both files live in the job's folder, so a retried job continues
the same run: one run per job, however many attempts.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from reid_core.atomic_write import write_atomic
from service.core.folders import JobDir
from service.core.registry import configure_http

log = logging.getLogger("worker.tracking")

#: Most warnings kept on a job (the oldest are dropped).
MAX_WARNINGS = 20


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


@dataclass(frozen=True)
class TrackingSpec:
    """Where and how the trainer of one job tracks itself (written by the supervisor)."""

    tracking_uri: str
    experiment: str
    model_name: str
    job_id: str
    run_name: str
    artifact_location: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None  # known from an earlier attempt
    request_timeout_s: float = 10.0
    retry_after_s: float = 30.0
    final_sync_s: float = 120.0
    log_checkpoints: bool = True

    def write(self, output_dir: Path) -> Path:
        path = JobDir(output_dir).tracking_spec
        _write_json(path, asdict(self))
        return path

    @classmethod
    def read(cls, path: Path) -> TrackingSpec:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: :attr:`TrackingState.best_rule` when no version of the model was left to hold ``best`` (the
#: new one deleted before the choice).
NO_VERSION_LEFT = "no version left"


@dataclass
class TrackingState:
    """What the trainer has logged so far (``mlflow.json``)."""

    run_id: str | None = None
    experiment_id: str | None = None
    params_logged: bool = False
    # metrics of epochs 0..this are in MLflow (0: the evaluation before training; -1: none yet)
    logged_through_epoch: int = -1
    checkpoints_logged: list[str] = field(default_factory=list)
    model_uri: str | None = None
    model_id: str | None = None  # MLflow 3's logged model
    model_name: str | None = None
    model_version: str | None = None
    best_alias: bool = False  # this version holds the alias ``best``
    # the rule that chose ``best`` after this version was registered (service.core.best), or
    # NO_VERSION_LEFT; None until the choice was made
    best_rule: str | None = None
    registration_refused: str | None = None  # why the model was not registered (for good)
    warnings: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # what is not in MLflow yet, in words

    @classmethod
    def load(cls, output_dir: Path) -> TrackingState:
        """The state in ``output_dir`` (a fresh one when there is none or it is unreadable)."""
        try:
            data = json.loads(JobDir(output_dir).tracking_state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, output_dir: Path) -> None:
        _write_json(JobDir(output_dir).tracking_state, asdict(self))

    def warn(self, message: str) -> bool:
        """Add ``message`` unless it is already the latest warning; True when added."""
        if self.warnings and self.warnings[-1] == message:
            return False
        self.warnings = [*self.warnings, message][-MAX_WARNINGS:]
        return True


def terminate_run(tracking_uri: str, run_id: str, status: str, timeout_s: float) -> str | None:
    """Mark run ``run_id`` ``FINISHED``, ``FAILED`` or ``KILLED``; returns a warning on failure."""
    configure_http(timeout_s)
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        with contextlib.suppress(Exception):
            if client.get_run(run_id).info.status == status:
                return None
        client.set_terminated(run_id, status=status)
    except Exception as exc:
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)
        return f"MLflow run {run_id} could not be marked {status}: {short_error(exc)}"
    return None


def short_error(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
