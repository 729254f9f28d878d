"""What a job shows of its trainer's progress: ``progress.json`` (:class:`reid_core.run_dir.Progress`)
as the job's columns ``progress``, ``epoch``, ``step`` and ``metrics`` (:class:`JobMetrics`).

The supervisor copies them into the job as the trainer goes; the API serves ``metrics`` with
this schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from reid_core.run_dir import ClusterSignals, Evaluation, Losses, Progress, RunStatus

__all__ = ["JobMetrics", "progress_columns"]


class JobMetrics(BaseModel):
    """A job's ``metrics``: the latest ``progress.json`` of its trainer, less what the job has a
    column for (``progress``, ``epoch``, ``step``). Empty (defaults) before the trainer first
    wrote it."""

    status: RunStatus | None = Field(None, description="The trainer's: running, finished, ...")
    losses: Losses = Field(default_factory=dict)
    eval: Evaluation = Field(default_factory=dict)  # progress.json's ``metrics``
    clustering: ClusterSignals = Field(default_factory=dict)
    epochs: int | None = Field(None, description="Epochs the job trains in all.")
    steps_per_epoch: int | None = None
    step_in_epoch: int | None = Field(None, description="Steps done in the epoch under way.")
    images_per_second: float | None = Field(None, description="Throughput of the epoch under way.")
    eta_seconds: float | None = Field(None, description="Seconds left, estimated.")

    @classmethod
    def from_progress(cls, progress: Progress) -> JobMetrics:
        shared = progress.model_dump(include=set(cls.model_fields) - {"eval"})
        return cls(**shared, eval=progress.metrics)


def progress_columns(progress: Progress) -> dict[str, Any]:
    """The job's columns from its trainer's ``progress``: name -> value (``metrics`` as JSON)."""
    return {
        "progress": progress.progress,
        "epoch": progress.epoch,
        "step": progress.global_step,
        "metrics": JobMetrics.from_progress(progress).model_dump(mode="json"),
    }
