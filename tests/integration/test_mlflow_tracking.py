"""The trainer's MLflow hook (worker/mlflow_hook.py) on a real MLflow store (SQLite, local
artifacts): one run per job with params, per-epoch metrics and checkpoints; the final model
registered, loadable with ``mlflow.pytorch.load_model`` as an image embedder; training that goes
on and catches up when MLflow is away; a resumed job that continues its run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import reid_core.train as train_module
from reid_core.engine.exit_codes import ExitCode
from reid_core.engine.trainer import HookBase
from reid_core.inference.embedder import Embedder
from reid_core.run_dir import RunDir
from service.core.registry import BEST_RULE_TAG, BEST_VALUE_TAG, JOB_TAG
from tests.integration.conftest import tiny_config
from tests.integration.test_label_free import unlabelled_folder
from worker.mlflow_hook import MLflowHook
from worker.tracking import TrackingSpec, TrackingState

MODEL = "tiny-reid"


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _spec(store: str, tmp_path: Path, job_id: str = "job-1", **kw: Any) -> TrackingSpec:
    fields: dict[str, Any] = {
        "tracking_uri": store,
        "experiment": "tests",
        "model_name": MODEL,
        "job_id": job_id,
        "run_name": job_id,
        "artifact_location": (tmp_path / "artifacts").as_uri(),
        "tags": {"reid.owner": "alice"},
        "retry_after_s": 0.0,
        "final_sync_s": 0.0,
        **kw,
    }
    return TrackingSpec(**fields)


def _train(out: Path, data: Path, hooks: list[HookBase], *extra: str, epochs: int = 2) -> ExitCode:
    cfg = tiny_config(out, data, *extra, epochs=epochs)
    return train_module.run(cfg, hooks)


def _images(data: Path, n: int = 3) -> list[Path]:
    return sorted(data.rglob("*.jpg"))[:n]


def test_a_run_logs_everything_and_registers_an_embedder(
    tmp_path: Path, synthetic_root: Path, store: str
) -> None:
    out = tmp_path / "run"
    hooks: list[HookBase] = [MLflowHook(_spec(store, tmp_path), out)]
    assert _train(out, synthetic_root, hooks, "eval.at_start=true") == ExitCode.OK

    state = TrackingState.load(out)
    assert state.pending == [] and state.warnings == []
    assert state.logged_through_epoch == 2
    assert (state.model_name, state.model_version, state.best_alias) == (MODEL, "1", True)
    assert state.best_rule == "mAP"  # the synthetic data has a query/gallery split
    client = MlflowClient(store)
    run = client.get_run(state.run_id)
    assert run.data.tags[JOB_TAG] == "job-1" and run.data.tags["reid.owner"] == "alice"
    assert run.data.params["model.backbone"] == "mobilenet_v3_small"
    assert "checkpoint.resume" not in run.data.params  # changes on retries
    history = client.get_metric_history(state.run_id, "loss/total")
    assert [m.step for m in history] == [1, 2]  # nothing trained at step 0
    # the evaluation before training is step 0, as metrics.jsonl's epoch 0 has it
    evaluations = client.get_metric_history(state.run_id, "eval/mAP")
    assert [m.step for m in evaluations] == [0, 1, 2]
    lines = RunDir(out).read_metrics()
    assert [m.value for m in evaluations] == [r.metric_values()["eval/mAP"] for r in lines]
    # the label-free signals of every evaluation, the one before training included
    for key in ("label_free/mutual_nn_rate", "label_free/similarity_margin"):
        logged_values = client.get_metric_history(state.run_id, key)
        assert [(m.step, m.value) for m in logged_values] == [
            (r.epoch, r.metric_values()[key]) for r in lines
        ]
    stability = client.get_metric_history(state.run_id, "label_free/neighbour_stability")
    assert [m.step for m in stability] == [1, 2]  # nothing to compare with before training
    assert "images_per_second" in run.data.metrics  # the latest, epoch 2's
    steps = {m.step for m in client.get_metric_history(state.run_id, "images_per_second")}
    assert steps == {1, 2}
    logged = {f.path for f in client.list_artifacts(state.run_id, "checkpoints")}
    assert logged == {"checkpoints/epoch_0001.pt", "checkpoints/epoch_0002.pt"}

    version = client.get_model_version(MODEL, "1")
    assert version.run_id == state.run_id
    assert version.tags[JOB_TAG] == "job-1"
    assert float(version.tags["metric.mAP"]) > 0
    assert "metric.label_free/mutual_nn_rate" in version.tags

    mlflow.set_tracking_uri(store)
    loaded = mlflow.pytorch.load_model(f"models:/{MODEL}@best")
    assert isinstance(loaded, Embedder)
    reference = Embedder.from_file(out / "model_final.pt")
    got, want = (
        loaded.embed_files(_images(synthetic_root)),
        reference.embed_files(_images(synthetic_root)),
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    # the plain weights travel with the model, readable without unpickling any class
    weights = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{MODEL}/1/extra_files/model_final.pt",
        dst_path=str(tmp_path / "dl"),
    )
    payload = torch.load(weights, weights_only=True)
    assert payload["format"] == "reid_core.model/1"


def test_best_alias_moves_only_to_a_better_map(
    tmp_path: Path, synthetic_root: Path, store: str
) -> None:
    client = MlflowClient(store)
    first = tmp_path / "first"
    _train(first, synthetic_root, [MLflowHook(_spec(store, tmp_path, "job-a"), first)])
    # pretend version 1 is unbeatable: the next one must not take the alias
    client.set_model_version_tag(MODEL, "1", "metric.mAP", "1000")
    second = tmp_path / "second"
    _train(second, synthetic_root, [MLflowHook(_spec(store, tmp_path, "job-b"), second)])
    assert TrackingState.load(second).model_version == "2"
    assert TrackingState.load(second).best_alias is False
    assert str(client.get_model_version_by_alias(MODEL, "best").version) == "1"
    # and now beatable: the third one takes it
    client.set_model_version_tag(MODEL, "1", "metric.mAP", "-1")
    third = tmp_path / "third"
    _train(third, synthetic_root, [MLflowHook(_spec(store, tmp_path, "job-c"), third)])
    assert str(client.get_model_version_by_alias(MODEL, "best").version) == "3"


def test_on_unlabelled_data_best_follows_the_kept_label_free_signal(
    tmp_path: Path, synthetic_root: Path, store: str
) -> None:
    crops = unlabelled_folder(synthetic_root, tmp_path / "crops", cameras=True)
    client = MlflowClient(store)
    first = tmp_path / "first"
    hooks: list[HookBase] = [MLflowHook(_spec(store, tmp_path, "job-a"), first)]
    assert _train(first, crops, hooks, "data.dataset=image_folder") == ExitCode.OK
    state = TrackingState.load(first)
    assert (state.model_version, state.best_alias) == ("1", True)
    assert state.best_rule == "label-free mutual_nn_rate"
    version = client.get_model_version(MODEL, "1")
    assert "metric.mAP" not in version.tags  # nothing evaluated with labels
    signal = version.tags["metric.label_free/mutual_nn_rate"]
    assert version.tags[BEST_RULE_TAG] == "label-free mutual_nn_rate"
    assert float(version.tags[BEST_VALUE_TAG]) == float(signal)

    # version 1 with a signal no model reaches: the next version leaves best where it is
    client.set_model_version_tag(MODEL, "1", "metric.label_free/mutual_nn_rate", "2")
    second = tmp_path / "second"
    hooks = [MLflowHook(_spec(store, tmp_path, "job-b"), second)]
    assert _train(second, crops, hooks, "data.dataset=image_folder") == ExitCode.OK
    state = TrackingState.load(second)
    assert (state.model_version, state.best_alias) == ("2", False)
    assert state.best_rule == "label-free mutual_nn_rate"
    assert str(client.get_model_version_by_alias(MODEL, "best").version) == "1"
    assert BEST_RULE_TAG not in client.get_model_version(MODEL, "2").tags


class _FlakyClient:
    """An MLflow client that is down for the first ``down`` calls, then the real one."""

    def __init__(self, real: MlflowClient, down: int) -> None:
        self.real, self.down = real, down

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down > 0:
                self.down -= 1
                raise ConnectionError("connection refused (test)")
            return attr(*args, **kwargs)

        return call


def test_training_goes_on_while_mlflow_is_down_and_catches_up(
    tmp_path: Path, synthetic_root: Path, store: str
) -> None:
    out = tmp_path / "run"
    hook = MLflowHook(_spec(store, tmp_path, final_sync_s=0.0), out)
    # down at the start and at the end of epoch 1 (two syncs), back for epoch 2
    hook._client = _FlakyClient(MlflowClient(store), down=2)
    assert _train(out, synthetic_root, [hook]) == ExitCode.OK
    state = TrackingState.load(out)
    assert state.pending == []
    assert state.warnings[0].startswith(f"MLflow at {store} failed while creating the run")
    assert state.warnings[-1] == "MLflow reachable again: caught up to epoch 2"
    steps = [m.step for m in MlflowClient(store).get_metric_history(state.run_id, "loss/total")]
    assert steps == [1, 2]  # epoch 1, missed while down, logged late
    assert state.model_version == "1"


def test_mlflow_never_reachable_training_succeeds_and_says_what_was_lost(
    tmp_path: Path, synthetic_root: Path
) -> None:
    out = tmp_path / "run"
    spec = _spec("http://127.0.0.1:9", tmp_path, request_timeout_s=1.0, retry_after_s=3600)
    hooks: list[HookBase] = [MLflowHook(spec, out)]
    assert _train(out, synthetic_root, hooks, "eval.at_start=true") == ExitCode.OK
    assert (out / "model_final.pt").is_file()
    state = TrackingState.load(out)
    assert state.run_id is None
    # epoch 0: the evaluation before training
    assert state.pending == ["the run", "metrics of epochs 0-2", "the final model"]
    assert "never logged: the run; metrics of epochs 0-2; the final model" in state.warnings[-1]
    assert "failed while creating the run (epoch 0)" in state.warnings[0]


class _StopAfterEpoch(HookBase):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_epoch(self) -> None:
        if self.trainer.state.epoch + 1 == self.epoch:
            self.trainer.request_stop()


def test_a_resumed_job_continues_its_run(tmp_path: Path, synthetic_root: Path, store: str) -> None:
    out = tmp_path / "run"
    spec = _spec(store, tmp_path)
    code = _train(out, synthetic_root, [_StopAfterEpoch(1), MLflowHook(spec, out)], epochs=3)
    assert code == ExitCode.INTERRUPTED
    run_id = TrackingState.load(out).run_id
    # the state file lost too: the run is found again by its job tag
    (out / "mlflow.json").unlink()
    code = _train(out, synthetic_root, [MLflowHook(spec, out)], "checkpoint.resume=auto", epochs=3)
    assert code == ExitCode.OK
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss/total"))
    assert steps[-1] == 3 and set(steps) == {1, 2, 3}


def test_a_model_name_of_another_owner_is_not_taken(
    tmp_path: Path, synthetic_root: Path, store: str
) -> None:
    MlflowClient(store).create_registered_model(MODEL, tags={"reid.owner": "bob"})
    out = tmp_path / "run"
    assert _train(out, synthetic_root, [MLflowHook(_spec(store, tmp_path), out)]) == ExitCode.OK
    state = TrackingState.load(out)
    assert state.model_version is None and state.pending == []
    assert state.registration_refused is not None
    assert "belongs to 'bob'" in state.registration_refused
    assert MlflowClient(store).search_model_versions(f"name = '{MODEL}'") == []
