"""The trainer's MLflow hook: one run per job, its config, metrics, checkpoints and final model.

Runs inside the training process (``python -m worker.train_job``), on the main rank only. Every
exchange with MLflow is a *sync*: bring MLflow up to date with what the trainer has done (create
or find the run, log the params once, the metrics of every ``metrics.jsonl`` line not logged yet
at step ``epoch`` (step 0: the evaluation before training), the newest checkpoint; at the end the
final model, registered and perhaps given the alias ``best``).
Syncs are idempotent and their progress is kept in ``mlflow.json``, so:

- MLflow down: the sync fails quickly (bounded HTTP timeouts), training goes on, a warning is
  recorded, the next sync is tried ``retry_after_s`` later and logs everything missed;
- the trainer killed and the job retried: the run is continued, not duplicated, and epochs
  already logged are not logged again;
- MLflow still down when training ends: the hook keeps trying for ``final_sync_s``, then says in
  ``pending`` what MLflow never received (the job shows it).

The final model is logged twice over, in one MLflow model: ``mlflow.pytorch``'s flavor of a
:class:`reid_core.inference.embedder.Embedder` (``mlflow.pytorch.load_model("models:/NAME@best")`` gives a
module that embeds images) with ``model_final.pt`` and ``config.yaml`` among its extra files
(plain tensors and a dict, loadable with ``torch.load(weights_only=True)``). Then the alias
``best`` is chosen again among all the model's versions (:func:`service.core.best.move_best_alias`:
mAP where a version was evaluated on labels, else human precision@1, else the kept label-free
signal).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from reid_core import distributed as dist_utils
from reid_core.config import config_to_dict, flatten
from reid_core.engine.trainer import HookBase
from reid_core.inference.embedder import Embedder
from reid_core.run_dir import EpochMetrics, RunDir
from service.core.best import move_best_alias
from service.core.folders import JobDir
from service.core.registry import JOB_TAG, METRIC_TAG_PREFIX, OWNER_TAG, configure_http
from service.core.registry import experiment_id as registry_experiment_id
from worker.tracking import NO_VERSION_LEFT, TrackingSpec, TrackingState, short_error

log = logging.getLogger("worker.mlflow")

#: Params that change between attempts of one job (MLflow refuses to change a logged param).
_VOLATILE_PARAMS = frozenset({"checkpoint.resume"})
_MAX_PARAM_LENGTH = 6000


def model_requirements() -> list[str]:
    """What the logged model needs to load: this project and the torch it was trained with."""
    from importlib import metadata

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    reqs.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    try:
        reqs.append(f"reid-service=={metadata.version('reid-service')}")
    except metadata.PackageNotFoundError:
        reqs.append("reid-service")
    return reqs


class MLflowHook(HookBase):
    """Tracks the run in MLflow as described in the module; ``clock`` and ``sleep`` for tests."""

    def __init__(
        self,
        spec: TrackingSpec,
        output_dir: Path,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.spec = spec
        self.folder = JobDir(output_dir)
        self.clock = clock
        self.sleep = sleep
        self.state = TrackingState()
        self._next_try = 0.0
        self._failing_since: str | None = None  # what the first failed sync was doing
        self._client: Any = None

    # -- hook points -----------------------------------------------------------------------

    def before_train(self) -> None:
        if not dist_utils.is_main_process():
            return
        configure_http(self.spec.request_timeout_s)
        self.state = TrackingState.load(self.folder.path)
        if self.state.run_id is None and self.spec.run_id:
            self.state.run_id = self.spec.run_id
        self._sync(final=False)

    def after_epoch(self) -> None:
        if dist_utils.is_main_process():
            self._sync(final=False)

    def on_interrupt(self) -> None:
        if dist_utils.is_main_process():
            self._sync(final=False)

    def after_train(self) -> None:
        if not dist_utils.is_main_process():
            return
        deadline = self.clock() + self.spec.final_sync_s
        self._next_try = 0.0
        while not self._sync(final=True):
            wait = min(self.spec.retry_after_s, deadline - self.clock())
            if wait <= 0:
                break
            self.sleep(wait)
            self._next_try = 0.0
        if self.state.pending:
            message = (
                f"MLflow at {self.spec.tracking_uri}: gave up {self.spec.final_sync_s:g} s "
                f"after training ended; never logged: {'; '.join(self.state.pending)}"
            )
            log.error("%s", message)
            self.state.warn(message)
            self._save_state()

    # -- sync ------------------------------------------------------------------------------

    def _sync(self, final: bool) -> bool:
        """Bring MLflow up to date; True when nothing is left to log."""
        if self.clock() < self._next_try:
            return False
        step = "connecting"
        try:
            step = "creating the run"
            self._ensure_run()
            step = "logging params"
            self._log_params()
            step = "logging metrics"
            self._log_metrics()
            step = "logging a checkpoint"
            self._log_checkpoint()
            if final:
                step = "logging the final model"
                self._log_model()
        except Exception as exc:
            self._next_try = self.clock() + self.spec.retry_after_s
            self.state.pending = self._pending(final)
            if self._failing_since is None:
                self._failing_since = step
                message = (
                    f"MLflow at {self.spec.tracking_uri} failed while {step} (epoch "
                    f"{self._epochs_done()}): {short_error(exc)}; training goes on, retrying every "
                    f"{self.spec.retry_after_s:g} s"
                )
                log.warning("%s", message)
                self.state.warn(message)
            self._save_state()
            return False
        if self._failing_since is not None:
            message = f"MLflow reachable again: caught up to epoch {self._epochs_done()}"
            log.info("%s", message)
            self.state.warn(message)
            self._failing_since = None
        self.state.pending = []
        self._save_state()
        return True

    def _pending(self, final: bool) -> list[str]:
        pending: list[str] = []
        if self.state.run_id is None:
            pending.append("the run")
        unlogged = self._unlogged()
        if unlogged:
            first, last = unlogged[0].epoch, unlogged[-1].epoch
            pending.append(f"metrics of epoch{'s' if last > first else ''} " + _span(first, last))
        if final and not self.state.registration_refused:
            if self.state.model_version is None:
                pending.append("the final model")
            elif self.state.best_rule is None:
                pending.append("the choice of the alias best")
        return pending

    def _save_state(self) -> None:
        try:
            self.state.save(self.folder.path)
        except OSError as exc:  # a full disk must not end the training
            log.warning("cannot write %s: %s", self.folder.tracking_state, exc)

    def _epochs_done(self) -> int:
        """Training epochs finished (the evaluation before training, epoch 0, is none)."""
        history = self.trainer.state.history
        return int(history[-1]["epoch"]) if history else 0

    def _unlogged(self) -> list[EpochMetrics]:
        """The trainer's metrics lines that MLflow has not received yet, oldest first."""
        history = [EpochMetrics.model_validate(r) for r in self.trainer.state.history]
        return [r for r in history if r.epoch > self.state.logged_through_epoch]

    # -- the steps ---------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.spec.tracking_uri)
        return self._client

    def _ensure_run(self) -> None:
        if self.state.run_id is not None:
            run = self.client.get_run(self.state.run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(self.state.run_id, status="RUNNING")
            return
        experiment_id = registry_experiment_id(
            self.client, self.spec.experiment, self.spec.artifact_location
        )
        # A run of this job whose id was lost (state file gone): continue it, never a second.
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{self.spec.job_id}'"
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {JOB_TAG: self.spec.job_id, **self.spec.tags}
            run = self.client.create_run(experiment_id, run_name=self.spec.run_name, tags=tags)
            run_id = run.info.run_id
        self.state.run_id, self.state.experiment_id = run_id, experiment_id
        log.info("MLflow run %s (experiment %s)", run_id, self.spec.experiment)

    def _log_params(self) -> None:
        if self.state.params_logged:
            return
        from mlflow.entities import Param

        flat = flatten(config_to_dict(self.trainer.cfg))
        params = [
            Param(key, _param_value(value))
            for key, value in sorted(flat.items())
            if key not in _VOLATILE_PARAMS
        ]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.state.run_id, params=params[start : start + 100])
        self.state.params_logged = True

    def _log_metrics(self) -> None:
        from mlflow.entities import Metric

        new = self._unlogged()
        if not new:
            return
        now_ms = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now_ms, record.epoch)
            for record in new
            for key, value in record.metric_values().items()
            if math.isfinite(value)
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.state.run_id, metrics=metrics[start : start + 1000])
        self.state.logged_through_epoch = new[-1].epoch

    def _log_checkpoint(self) -> None:
        if not self.spec.log_checkpoints:
            return
        newest = _newest(self.folder.checkpoints)
        if newest is None or newest.name in self.state.checkpoints_logged:
            return
        self.client.log_artifact(self.state.run_id, str(newest), RunDir.checkpoints)
        self.state.checkpoints_logged = [*self.state.checkpoints_logged, newest.name]

    def _log_model(self) -> None:
        if self.state.registration_refused:
            return
        if self.state.model_version is None:
            self._log_and_register_model()
        if self.state.model_name is not None and self.state.best_rule is None:
            self._choose_best(self.state.model_name)

    def _log_and_register_model(self) -> None:
        import mlflow

        model_file = self.folder.final_model
        if self.state.model_uri is None:
            embedder = Embedder.from_file(model_file)
            extra = [str(model_file), str(self.folder.config_file)]
            mlflow.set_tracking_uri(self.spec.tracking_uri)
            # MLflow warns that pickled models run code on load: known and documented here
            # (the weights also travel as model_final.pt, which loads with weights_only=True).
            pytorch_log = logging.getLogger("mlflow.pytorch")
            level = pytorch_log.level
            pytorch_log.setLevel(logging.ERROR)
            try:
                with mlflow.start_run(run_id=self.state.run_id, log_system_metrics=False):
                    info = mlflow.pytorch.log_model(
                        embedder,
                        name="model",
                        serialization_format="pickle",
                        pip_requirements=model_requirements(),
                        extra_files=[p for p in extra if Path(p).is_file()],
                    )
            finally:
                pytorch_log.setLevel(level)
            self.client.update_run(self.state.run_id, status="RUNNING")  # the job decides
            self.state.model_uri, self.state.model_id = info.model_uri, info.model_id
            self._save_state()
        self._register(self.state.model_uri, self.state.model_id)

    def _register(self, model_uri: str, model_id: str | None) -> None:
        from mlflow.exceptions import MlflowException

        name = self.spec.model_name
        owner = self.spec.tags.get(OWNER_TAG)
        try:
            self.client.create_registered_model(name, tags={OWNER_TAG: owner} if owner else None)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            holder = self.client.get_registered_model(name).tags.get(OWNER_TAG)
            if owner and holder and holder != owner:
                self.state.registration_refused = (
                    f"registered model {name!r} belongs to {holder!r}: the model stays in run "
                    f"{self.state.run_id} unregistered; submit with another model_name"
                )
                self.state.warn(self.state.registration_refused)
                self._save_state()
                return
        existing = self.client.search_model_versions(
            f"name = '{name}' and run_id = '{self.state.run_id}'"
        )
        if existing:
            version = existing[0]
        else:
            metrics = {
                f"{METRIC_TAG_PREFIX}{k}": str(v)
                for k, v in self.trainer.state.metrics.items()
                if k != "epoch"
            }
            tags = {JOB_TAG: self.spec.job_id, **self.spec.tags, **metrics}
            version = self.client.create_model_version(
                name, model_uri, run_id=self.state.run_id, tags=tags, model_id=model_id
            )
        self.state.model_name, self.state.model_version = name, str(version.version)
        self._save_state()
        log.info("model registered: %s version %s", name, version.version)

    def _choose_best(self, name: str) -> None:
        """The alias ``best`` chosen again among all the model's versions, this one included."""
        best = move_best_alias(self.client, name)
        self.state.best_alias = best is not None and best.version == self.state.model_version
        self.state.best_rule = best.rule if best is not None else NO_VERSION_LEFT
        self._save_state()
        if best is not None:
            log.info("alias best: %s version %s (%s)", name, best.version, best.rule)


def _newest(directory: Path) -> Path | None:
    """The most recent ``*.pt`` in ``directory`` (files rotated away meanwhile are skipped)."""
    stamped = []
    for path in directory.glob("*.pt"):
        try:
            stamped.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue
    return max(stamped)[1] if stamped else None


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"
