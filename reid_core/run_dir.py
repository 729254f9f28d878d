"""A training run's folder (``runtime.output_dir``): what each file is called and what it holds.

::

    config.yaml      the resolved configuration the run trains with
    train.log        the trainer's log (rank 0)
    progress.json    where the run is (:class:`Progress`), rewritten atomically as it goes
    metrics.jsonl    one line per finished epoch (:class:`EpochMetrics`), appended; first, when
                     ``eval.at_start`` ran, the line of the evaluation before training (epoch 0)
    checkpoints/     the checkpointer's files (``last_checkpoint`` names the newest)
    model_final.pt   the trained model (:mod:`reid_core.model_io`), once training completed

The trainer writes them (its hooks, :mod:`reid_core.train`); whoever watches a run (the job
service's worker and API) reads them through :class:`RunDir` and the two models, so each file
name and each key is written down here only (a file's name once, as an :class:`Entry`). A job's
folder holds more files, the service's: ``service.core.folders.JobDir`` extends :class:`RunDir`
with them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reid_core.atomic_write import write_atomic

__all__ = [
    "METRIC_FAMILIES",
    "ClusterSignals",
    "Entry",
    "EpochMetrics",
    "Evaluation",
    "Losses",
    "Progress",
    "RunDir",
    "RunStatus",
]

log = logging.getLogger(__name__)

#: ``running``; ``finished`` (every epoch trained); ``interrupted`` (stopped on request, a
#: SIGTERM or Ctrl-C, after a checkpoint). A run that crashed says what it said last.
RunStatus = Literal["running", "finished", "interrupted"]

#: The families of an :class:`EpochMetrics` line's ``<family>/<name>`` keys.
METRIC_FAMILIES = ("loss", "lr", "cluster", "eval", "label_free")

#: The families a line of the evaluation before training (epoch 0) holds.
_EVALUATION_FAMILIES = ("eval", "label_free")

# What progress.json says of losses, evaluation and clustering (and a job's metrics repeat).
Losses = Annotated[
    dict[str, float], Field(description="Each loss term of the last step (total, ...).")
]
Evaluation = Annotated[
    dict[str, float],
    Field(
        description="The latest evaluation (mAP, R1, ... in percent, where the data has a "
        "query/gallery split), its label-free signals (`label_free/<name>`, with eval.label_free) "
        "and `epoch`, the epochs finished when it ran (0: before training); empty before the "
        "first."
    ),
]
ClusterSignals = Annotated[
    dict[str, float],
    Field(description="The latest pseudo labels' signals (`cluster/<name>`)."),
]


class Progress(BaseModel):
    """``progress.json``: where a run is. Rewritten atomically every
    ``runtime.log_every_n_steps`` steps, after every epoch and when the run stops; a job's
    supervisor polls it. Fields a newer trainer adds are ignored by an older reader."""

    # NaN and infinities are written as JSON's usual NaN/Infinity, as the trainer always has.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    status: RunStatus
    epoch: int = Field(ge=0, description="Epochs finished: the 0-based index of the one under way.")
    epochs: int = Field(ge=0, description="Epochs the run trains in all (schedule.epochs).")
    step_in_epoch: int = Field(ge=0, description="Steps done in the epoch under way.")
    steps_per_epoch: int = Field(ge=0)
    global_step: int = Field(ge=0, description="Steps done since the run began.")
    progress: float = Field(ge=0.0, le=1.0, description="Fraction of all steps done.")
    losses: Losses = Field(default_factory=dict)
    metrics: Evaluation = Field(default_factory=dict)
    clustering: ClusterSignals = Field(default_factory=dict)
    images_per_second: float | None = Field(
        None, description="Throughput of the epoch under way; None before its first step."
    )
    eta_seconds: float | None = Field(
        None, description="Seconds left, estimated; None before this process's first step."
    )
    updated_at: float = Field(default_factory=time.time, description="When written (Unix time).")


class EpochMetrics(BaseModel):
    """One line of ``metrics.jsonl``: a finished epoch. Besides the fields below, one number per
    key ``<family>/<name>`` (``family`` one of :data:`METRIC_FAMILIES`)::

        loss/<term>      the term's mean over the epoch's steps (loss/total, loss/gsl, ...)
        lr/group<i>      the learning rate of parameter group i during the epoch
        cluster/<name>   the signals of the pseudo labels the epoch trained on
        eval/<metric>    the evaluation after the epoch (eval/mAP, eval/R1, ... in percent),
                         when the epoch was evaluated on a query/gallery split
        label_free/<name>  the label-free signals of the model after the epoch
                         (:mod:`reid_core.evaluation.label_free`; ``eval.label_free``), when
                         the epoch was evaluated

    Epoch 0 is the evaluation before training (``eval.at_start``), the file's first line when
    it ran: ``eval/<metric>`` and ``label_free/<name>`` keys only (at least one), ``global_step``
    0 or absent, no throughput nor duration; nothing was trained, so nothing else was measured.
    A reader that counts, times or ranks training epochs leaves it out (:attr:`trained`).

    The keys are the runs' MLflow metric names too (the step is ``epoch``). Build a line with
    :meth:`of_epoch` or :meth:`before_training`.
    """

    # The families' keys are extra fields, each a number: the line stays one flat JSON object.
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")
    __pydantic_extra__: dict[str, float] = Field(init=False)

    epoch: int = Field(
        ge=0,
        description="The epoch, counted from 1; 0: the evaluation before training "
        "(eval.at_start), which holds eval/<metric> and label_free/<name> keys only.",
    )
    global_step: int | None = Field(None, description="Steps done when the epoch ended.")
    images_per_second: float | None = Field(None, description="The epoch's throughput.")
    epoch_seconds: float | None = Field(None, description="How long the epoch took.")

    @model_validator(mode="after")
    def _keys_in_families(self) -> EpochMetrics:
        for key in self.model_extra or {}:
            family, slash, name = key.partition("/")
            if family not in METRIC_FAMILIES or not slash or not name:
                raise ValueError(
                    f"metrics key {key!r} is neither a field ({', '.join(type(self).model_fields)}) "
                    f"nor '<family>/<name>' with family one of {', '.join(METRIC_FAMILIES)}"
                )
        return self

    @model_validator(mode="after")
    def _before_training_is_an_evaluation(self) -> EpochMetrics:
        if self.trained:
            return self
        keys = list(self.model_extra or {})
        wrong = [k for k in ("images_per_second", "epoch_seconds") if getattr(self, k) is not None]
        wrong += [k for k in keys if k.partition("/")[0] not in _EVALUATION_FAMILIES]
        if wrong:
            raise ValueError(
                f"epoch 0 is the evaluation before training: it holds eval/<metric> and "
                f"label_free/<name> keys only, not {', '.join(wrong)} (a training epoch counts "
                "from 1)"
            )
        if not keys:
            raise ValueError(
                "epoch 0, the evaluation before training, has no eval/<metric> nor "
                "label_free/<name> key"
            )
        if self.global_step not in (None, 0):
            raise ValueError(
                f"epoch 0 is the evaluation before training: global_step is 0 there, "
                f"not {self.global_step}"
            )
        return self

    @property
    def trained(self) -> bool:
        """Whether the line is a training epoch's (epoch >= 1), not the evaluation before
        training (epoch 0)."""
        return self.epoch >= 1

    @classmethod
    def before_training(
        cls, evaluation: Mapping[str, float], label_free: Mapping[str, float] | None = None
    ) -> EpochMetrics:
        """The line of the evaluation before training (epoch 0): ``evaluation`` is metric ->
        value, as the evaluator returned it (empty without a query/gallery split);
        ``label_free`` the label-free signals, already keyed ``label_free/<name>`` as
        :meth:`reid_core.evaluation.label_free.LabelFreeSignals.as_metrics` names them."""
        return cls.model_validate(
            {
                "epoch": 0,
                "global_step": 0,
                **{f"eval/{metric}": value for metric, value in evaluation.items()},
                **(label_free or {}),
            }
        )

    @classmethod
    def of_epoch(
        cls,
        *,
        epoch: int,
        global_step: int,
        images_per_second: float,
        epoch_seconds: float,
        losses: Mapping[str, float],
        learning_rates: Sequence[float],
        clustering: Mapping[str, float],
        evaluation: Mapping[str, float],
        label_free: Mapping[str, float] | None = None,
    ) -> EpochMetrics:
        """The line of epoch ``epoch``: ``losses`` (term -> mean), ``learning_rates`` (one per
        parameter group), ``clustering`` (already keyed ``cluster/<name>``, as
        :meth:`reid_core.clustering.pseudo_labels.ClusteringStats.as_metrics` names them),
        ``evaluation`` (metric -> value; empty when the epoch was not evaluated) and
        ``label_free`` (already keyed ``label_free/<name>``; empty or None when not measured)."""
        return cls.model_validate(
            {
                "epoch": epoch,
                "global_step": global_step,
                "images_per_second": images_per_second,
                "epoch_seconds": epoch_seconds,
                **{f"loss/{term}": value for term, value in losses.items()},
                **{f"lr/group{i}": lr for i, lr in enumerate(learning_rates)},
                **clustering,
                **{f"eval/{metric}": value for metric, value in evaluation.items()},
                **(label_free or {}),
            }
        )

    def family(self, family: str) -> dict[str, float]:
        """The line's ``<family>/<name>`` numbers, name -> value (``family("label_free")``:
        ``mutual_nn_rate``, ...); empty when the line has none."""
        if family not in METRIC_FAMILIES:
            raise ValueError(
                f"unknown metrics family {family!r}: one of {', '.join(METRIC_FAMILIES)}"
            )
        prefix = f"{family}/"
        return {
            key.removeprefix(prefix): value
            for key, value in (self.model_extra or {}).items()
            if key.startswith(prefix)
        }

    def evaluation(self) -> dict[str, float]:
        """The line's evaluation, metric -> value (``mAP``, ``r1``, ...); empty when the epoch
        was not evaluated on a query/gallery split."""
        return self.family("eval")

    def metric_values(self) -> dict[str, float]:
        """Every number of the line but its ``epoch`` and ``global_step``, by key: what a run
        logs to MLflow at step ``epoch`` (0 for the evaluation before training)."""
        timing = {"images_per_second": self.images_per_second, "epoch_seconds": self.epoch_seconds}
        values = {key: value for key, value in timing.items() if value is not None}
        return {**values, **(self.model_extra or {})}


class Entry:
    """A file or folder of a run folder, by name: on the class, its name
    (``RunDir.progress_file == "progress.json"``); on a folder, its path
    (``RunDir(out).progress_file == out / "progress.json"``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, folder: None, owner: type[RunDir]) -> str: ...

    @overload
    def __get__(self, folder: RunDir, owner: type[RunDir]) -> Path: ...

    def __get__(self, folder: RunDir | None, owner: type[RunDir]) -> str | Path:
        return self.name if folder is None else folder.path / self.name


class RunDir:
    """The files of one run's folder (see the module): ``RunDir(cfg.runtime.output_dir)``."""

    config_file = Entry("config.yaml")
    train_log = Entry("train.log")
    progress_file = Entry("progress.json")
    metrics_file = Entry("metrics.jsonl")
    checkpoints = Entry("checkpoints")
    final_model = Entry("model_final.pt")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def write_progress(self, progress: Progress) -> None:
        write_atomic(self.progress_file, progress.model_dump_json(indent=1))

    def read_progress(self) -> Progress | None:
        """The run's progress; None before the trainer first wrote it, or when it is unreadable
        (a reader never fails on it: the next write replaces it)."""
        try:
            return Progress.model_validate_json(self.progress_file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("%s is unreadable: %s", self.progress_file, exc)
            return None

    def append_metrics(self, record: EpochMetrics) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(record.model_dump_json() + "\n")

    def read_metrics(self) -> list[EpochMetrics]:
        """One record per line, oldest first: the evaluation before training (epoch 0) when it
        ran, then one per finished epoch; empty before the first was written. A line being
        appended right now (the last, unfinished) is left out, as is, with a warning,
        one that does not parse."""
        try:
            text = self.metrics_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        lines = text.split("\n")  # the last one is "" once the last record is complete
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(EpochMetrics.model_validate_json(line))
            except ValidationError as exc:
                if number < len(lines):
                    log.warning("%s, line %d, is left out: %s", self.metrics_file, number, exc)
        return records
