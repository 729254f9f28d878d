"""What a job shows of its trainer's progress: ``progress.json`` (:class:`reid_core.run_dir.Progress`)
as the job's columns ``progress``, ``epoch``, ``step`` and ``metrics`` (:class:`JobMetrics`).

The supervisor copies them into the job as the trainer goes; the API serves ``metrics`` with
this schema. A number that is not finite (a diverged loss is NaN) is stored and served as null:
JSON has no NaN, and PostgreSQL's JSONB refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, Field

from reid_core.run_dir import Progress, RunStatus

#: Numbers by name; null where the trainer's value was NaN or infinite.
Numbers = Annotated[dict[str, float | None], Field(default_factory=dict)]


class JobMetrics(BaseModel):
    """A job's ``metrics``: the latest ``progress.json`` of its trainer, less what the job has a
    column for (``progress``, ``epoch``, ``step``). Empty (defaults) before the trainer first
    wrote it."""

    status: RunStatus | None = Field(None, description="The trainer's: running, finished, ...")
    losses: Numbers = Field(description="Each loss term of the last step (total, ...).")
    eval: Numbers = Field(
        description="The latest evaluation (mAP, R1, ... in percent, where the dataset has a "
        "query/gallery split), its label-free signals (`label_free/<name>`) and `epoch`, the "
        "epochs finished when it ran (0: before training); empty before the first."
    )  # progress.json's ``metrics``
    clustering: Numbers = Field(description="The latest pseudo labels' signals.")
    epochs: int | None = Field(None, description="Epochs the job trains in all.")
    steps_per_epoch: int | None = None
    step_in_epoch: int | None = Field(None, description="Steps done in the epoch under way.")
    images_per_second: float | None = Field(None, description="Throughput of the epoch under way.")
    eta_seconds: float | None = Field(None, description="Seconds left, estimated.")

    @classmethod
    def from_progress(cls, progress: Progress) -> JobMetrics:
        shared = progress.model_dump(include=set(cls.model_fields) - {"eval"})
        for name in ("losses", "clustering"):
            shared[name] = _finite(shared[name])
        for name in ("images_per_second", "eta_seconds"):
            shared[name] = _finite({name: shared[name]})[name]
        return cls(**shared, eval=_finite(progress.metrics))


def _finite(values: Mapping[str, float | None]) -> dict[str, float | None]:
    return {k: v if v is not None and math.isfinite(v) else None for k, v in values.items()}


def progress_columns(progress: Progress) -> dict[str, Any]:
    """The job's columns from its trainer's ``progress``: name -> value (``metrics`` as JSON)."""
    return {
        "progress": progress.progress,
        "epoch": progress.epoch,
        "step": progress.global_step,
        "metrics": JobMetrics.from_progress(progress).model_dump(mode="json"),
    }
