"""The run folder's contract (reid_core.run_dir): progress.json and metrics.jsonl through their
models, file names in one place, and the atomic writer everyone uses."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from reid_core.atomic_write import atomic_path, write_atomic
from reid_core.run_dir import EpochMetrics, Progress, RunDir


def _progress(**changes: object) -> Progress:
    fields: dict[str, object] = {
        "status": "running",
        "epoch": 1,
        "epochs": 3,
        "step_in_epoch": 2,
        "steps_per_epoch": 4,
        "global_step": 6,
        "progress": 0.5,
        "losses": {"total": 1.25, "gsl": 0.5},
        "metrics": {"epoch": 1, "mAP": 42.5, "r1": 61.0},
        "clustering": {"cluster/clusters": 7.0},
        "images_per_second": 123.4,
        "eta_seconds": 9.5,
    }
    return Progress.model_validate({**fields, **changes})


def _epoch(epoch: int = 2, **evaluation: float) -> EpochMetrics:
    return EpochMetrics.of_epoch(
        epoch=epoch,
        global_step=8,
        images_per_second=250.0,
        epoch_seconds=3.5,
        losses={"total": 2.5, "instance": 1.5},
        learning_rates=[0.00035, 0.0035],
        clustering={"cluster/clusters": 12.0, "cluster/outliers": 0.25},
        evaluation=evaluation,
    )


def test_progress_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_progress() is None  # before the trainer's first write
    progress = _progress()
    run.write_progress(progress)
    assert run.read_progress() == progress
    written = json.loads(run.progress_file.read_text())
    assert written["metrics"] == {"epoch": 1, "mAP": 42.5, "r1": 61.0}
    assert written["status"] == "running" and written["global_step"] == 6
    assert not list(tmp_path.glob("*.tmp"))


def test_progress_of_an_older_or_newer_writer(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    minimal = {k: v for k, v in _progress().model_dump().items() if k not in ("clustering",)}
    run.progress_file.write_text(json.dumps({**minimal, "from_a_newer_trainer": 1}))
    progress = run.read_progress()
    assert progress is not None and progress.clustering == {}
    run.progress_file.write_text('{"status": "runn')  # never written so, but never fatal either
    assert run.read_progress() is None
    with pytest.raises(ValidationError, match="status"):
        _progress(status="paused")


def test_epoch_metrics_round_trip_as_flat_json_lines(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    first, second = _epoch(1), _epoch(2, mAP=55.5, r1=70.0)
    run.append_metrics(first)
    run.append_metrics(second)
    assert run.read_metrics() == [first, second]
    line = json.loads(run.metrics_file.read_text().splitlines()[1])
    assert line == {
        "epoch": 2,
        "global_step": 8,
        "images_per_second": 250.0,
        "epoch_seconds": 3.5,
        "loss/total": 2.5,
        "loss/instance": 1.5,
        "lr/group0": 0.00035,
        "lr/group1": 0.0035,
        "cluster/clusters": 12.0,
        "cluster/outliers": 0.25,
        "eval/mAP": 55.5,
        "eval/r1": 70.0,
    }
    assert second.metric_values() == {
        k: v for k, v in line.items() if k not in ("epoch", "global_step")
    }


def test_epoch_metrics_keys_are_fields_or_families() -> None:
    sparse = EpochMetrics.model_validate({"epoch": 1, "loss/total": 3})  # an older line
    assert sparse.metric_values() == {"loss/total": 3.0}
    with pytest.raises(ValidationError, match="'accuracy' is neither a field"):
        EpochMetrics.model_validate({"epoch": 1, "accuracy": 0.5})
    with pytest.raises(ValidationError, match="family one of loss, lr, cluster, eval, label_free"):
        EpochMetrics.model_validate({"epoch": 1, "val/mAP": 0.5})
    with pytest.raises(ValidationError):
        EpochMetrics.model_validate({"epoch": 1, "loss/total": "high"})


def test_epoch_0_is_the_evaluation_before_training(tmp_path: Path) -> None:
    before = EpochMetrics.before_training({"mAP": 3.25, "r1": 9.5})
    assert not before.trained and _epoch(1).trained
    assert before.evaluation() == {"mAP": 3.25, "r1": 9.5}
    assert before.metric_values() == {"eval/mAP": 3.25, "eval/r1": 9.5}  # MLflow's step 0
    run = RunDir(tmp_path)
    run.append_metrics(before)
    run.append_metrics(_epoch(1, mAP=20.0))
    assert run.read_metrics() == [before, _epoch(1, mAP=20.0)]
    line = json.loads(run.metrics_file.read_text().splitlines()[0])
    assert line == {
        "epoch": 0,
        "global_step": 0,
        "images_per_second": None,  # nothing trained, nothing timed
        "epoch_seconds": None,
        "eval/mAP": 3.25,
        "eval/r1": 9.5,
    }
    assert EpochMetrics.model_validate({"epoch": 0, "eval/mAP": 1.0}).global_step is None


def test_label_free_signals_join_an_evaluated_line_or_stand_alone() -> None:
    """Label-free signals go with the evaluation of their epoch; on data without a query/gallery
    split they are the evaluation before training's only keys."""
    signals = {"label_free/mutual_nn_rate": 0.25, "label_free/similarity_margin": 0.125}
    before = EpochMetrics.before_training({"mAP": 3.25}, signals)
    assert before.metric_values() == {"eval/mAP": 3.25, **signals}
    assert before.family("label_free") == {"mutual_nn_rate": 0.25, "similarity_margin": 0.125}
    unlabelled = EpochMetrics.before_training({}, signals)
    assert (unlabelled.evaluation(), unlabelled.family("label_free")) == (
        {},
        before.family("label_free"),
    )
    epoch = EpochMetrics.of_epoch(
        epoch=1,
        global_step=8,
        images_per_second=250.0,
        epoch_seconds=3.5,
        losses={"total": 2.5},
        learning_rates=[0.1],
        clustering={},
        evaluation={},
        label_free={**signals, "label_free/neighbour_stability": 0.5},
    )
    assert epoch.family("label_free")["neighbour_stability"] == 0.5
    assert _epoch(2, mAP=1.0).family("label_free") == {}
    with pytest.raises(ValueError, match="unknown metrics family 'labelfree'"):
        epoch.family("labelfree")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"epoch": 0, "eval/mAP": 1.0, "loss/total": 2.0}, "keys only, not loss/total"),
        ({"epoch": 0, "eval/mAP": 1.0, "lr/group0": 0.1}, "not lr/group0"),
        ({"epoch": 0, "eval/mAP": 1.0, "cluster/clusters": 5.0}, "not cluster/clusters"),
        ({"epoch": 0, "eval/mAP": 1.0, "images_per_second": 9.0}, "not images_per_second"),
        ({"epoch": 0, "eval/mAP": 1.0, "epoch_seconds": 9.0}, "not epoch_seconds"),
        ({"epoch": 0, "eval/mAP": 1.0, "global_step": 4}, "global_step is 0 there, not 4"),
        ({"epoch": 0}, "has no eval/<metric> nor label_free/<name> key"),
        ({"epoch": 0, "global_step": 0}, "has no eval/<metric> nor label_free/<name> key"),
        ({"epoch": -1, "eval/mAP": 1.0}, "greater than or equal to 0"),
    ],
)
def test_epoch_0_refuses_what_was_not_measured_before_training(
    line: dict[str, float], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        EpochMetrics.model_validate(line)


def test_read_metrics_leaves_out_an_epoch_0_line_that_trained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir(tmp_path)
    lines = ['{"epoch": 0, "loss/total": 3.5}', '{"epoch": 0, "eval/mAP": 2.0}', '{"epoch": 1}']
    run.metrics_file.write_text("".join(f"{line}\n" for line in lines))
    assert [(r.epoch, r.trained) for r in run.read_metrics()] == [(0, False), (1, True)]
    assert "line 1" in caplog.text
    assert "holds eval/<metric> and label_free/<name> keys only" in caplog.text


def test_non_finite_values_are_written_as_json_has_them(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_metrics(EpochMetrics.model_validate({"epoch": 1, "cluster/adjusted_rand": math.nan}))
    assert "NaN" in run.metrics_file.read_text()
    (record,) = run.read_metrics()
    assert math.isnan(record.metric_values()["cluster/adjusted_rand"])


def test_read_metrics_leaves_out_the_line_being_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunDir(tmp_path)
    run.metrics_file.write_text(
        '{"epoch": 1, "loss/total": 3.5}\n{"epoch": "two"}\n{"epoch": 3, "loss/total": 2.5}\n{"epo'
    )
    assert [r.epoch for r in run.read_metrics()] == [1, 3]
    assert "line 2" in caplog.text and "line 4" not in caplog.text  # only the bad line is news


def test_file_names_are_the_run_dirs(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    names = [run.config_file, run.train_log, run.progress_file, run.metrics_file]
    assert [p.name for p in names] == [
        "config.yaml",
        "train.log",
        "progress.json",
        "metrics.jsonl",
    ]
    assert (run.checkpoints.name, run.final_model.name) == ("checkpoints", "model_final.pt")
    assert all(p.parent == tmp_path for p in [*names, run.checkpoints, run.final_model])
    assert RunDir.progress_file == "progress.json"  # on the class, the name alone


# ----------------------------------------------------------------------------------------------
# the atomic writer
# ----------------------------------------------------------------------------------------------


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, '{"old": true}')
    write_atomic(path, b'{"new": true}', fsync=True)
    assert path.read_text() == '{"new": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    write_atomic(path, "old and complete")

    def fill_the_disk_halfway() -> None:
        with atomic_path(path) as tmp:
            tmp.write_text("new but only half")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fill_the_disk_halfway()
    assert path.read_text() == "old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left


def test_a_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    write_atomic(path, "old")
    with atomic_path(path) as tmp:
        tmp.write_text("new, still being written")
        assert path.read_text() == "old"  # until the block ends
    assert path.read_text() == "new, still being written"
