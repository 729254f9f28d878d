"""The model registry: MLflow's registered models, filtered by owner, and the tags that say whose.

Jobs register their final models (see :mod:`worker.mlflow_hook`); a registered model and its
versions carry the tag :data:`OWNER_TAG`, and an owner sees and changes only their own models.
Every call here is synchronous (the API runs it in a thread) and bounded by
``mlflow.request_timeout_s`` (:func:`configure_http`); an MLflow that does not answer is an
:class:`~service.core.errors.UnavailableError` naming it.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from service.core.errors import UnavailableError, not_found
from service.core.settings import Settings

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

#: The run tag that names the job (how a run is found again when its state file is gone).
JOB_TAG = "reid.job_id"
#: Tag of a registered model and its versions naming the owner (only they see and change it).
OWNER_TAG = "reid.owner"
#: Run tag naming the dataset a job trained on.
DATASET_TAG = "reid.dataset_id"
#: Version tags holding the model's evaluation (``metric.mAP``, ``metric.r1``, ...).
METRIC_TAG_PREFIX = "metric."
#: The alias that names a registered model's best version, by the rule of :mod:`service.core.best`.
BEST_ALIAS = "best"
#: Tag of the version holding ``best``: the rule that chose it (``mAP``, ``human precision@1``,
#: ``label-free mutual_nn_rate``, ``newest``, or :data:`BEST_BY_HAND`).
BEST_RULE_TAG = "reid.best_rule"
#: Tag of the version holding ``best``: the value it won with (none for ``newest`` and by hand).
BEST_VALUE_TAG = "reid.best_value"
#: The rule of a ``best`` its owner pointed at a version (``PUT .../aliases/best``).
BEST_BY_HAND = "set by hand"


class HumanMetric(enum.StrEnum):
    """The run metrics a person's pair check of a version logs (:mod:`service.core.pair_checks`)
    after each answer: precision at ranks 1 and 5 with their 95% interval, and how many of the
    check's pairs are answered (unsure ones included). All at step 0, so that the newest value
    is the run's value of the metric (an undo lowers ``human/answers``); their history is over
    time."""

    PRECISION_AT_1 = "human/precision_at_1"
    PRECISION_AT_1_LOW = "human/precision_at_1_low"
    PRECISION_AT_1_HIGH = "human/precision_at_1_high"
    PRECISION_AT_5 = "human/precision_at_5"
    PRECISION_AT_5_LOW = "human/precision_at_5_low"
    PRECISION_AT_5_HIGH = "human/precision_at_5_high"
    ANSWERS = "human/answers"


#: Inside a logged model: the plain weights + config file (reid_core.model_io format).
WEIGHTS_PATH = "extra_files/model_final.pt"

T = TypeVar("T")

_LOG = logging.getLogger("service.registry")
#: The ``user:password@`` of a URL.
_URL_CREDENTIALS = re.compile(r"//[^/\s@]+@")


def _server_address(tracking_uri: str) -> str | None:
    """An MLflow tracking server's address as errors name it (``http://host:port``, without
    credentials); None for a store that is a file on this server (``sqlite:///...``)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def configure_http(timeout_s: float) -> None:
    """Bound MLflow's HTTP calls in this process: one request waits ``timeout_s`` at most and is
    retried once, so a tracking server that is down costs seconds, never minutes. A variable is
    written only when it changes: a request's registry does not write the environment while
    other threads read it."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def model_uri(name: str, version: str) -> str:
    """``models:/<name>/<version>``: what ``mlflow.pytorch.load_model`` loads, and the name a
    gallery's features carry (:attr:`reid_core.inference.search.GalleryIndex.model_ref`)."""
    return f"models:/{name}/{version}"


def mlflow_ui_url(settings: Settings, path: str) -> str | None:
    """``path`` (``models/<name>``, ``runs/<id>``) in the MLflow UI, when one is configured."""
    base = settings.mlflow.ui_url
    return f"{base.rstrip('/')}/#/{path}" if base else None


def _when(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str | None
    latest_version: str | None
    aliases: dict[str, str]  # alias -> version
    created_at: datetime | None
    updated_at: datetime | None


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    status: str
    run_id: str | None
    job_id: str | None  # the job that trained it
    metrics: dict[str, float]  # its last evaluation (from the METRIC_TAG_PREFIX tags)
    aliases: list[str]
    created_at: datetime | None
    best_rule: str | None  # on the version holding ``best``: the rule that chose it
    best_value: float | None  # and the value it won with

    @property
    def load_uri(self) -> str:
        return model_uri(self.name, self.version)


def ensure_experiment(settings: Settings) -> str:
    """Create the jobs' experiment (with the embedded artifact root) if missing; its id.

    Run once when the embedded service starts, so that the SQLite store is created (and
    migrated) by one process before the API and the workers use it.
    """
    from mlflow.tracking import MlflowClient

    configure_http(settings.mlflow.request_timeout_s)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    return experiment_id(client, settings.mlflow.experiment, settings.mlflow_artifact_location)


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of the experiment ``name``, created (at ``artifact_location``) if missing, also
    when another process creates it at the same time."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


class _MetricStamps:
    """Millisecond timestamps for logged metrics, strictly increasing within this process.

    MLflow's SQL store keeps one row per (run, key, timestamp, step, value): two logs of one
    key with the same value in the same millisecond (an answer changed to one that leaves the
    count as it was) would be a single point, and the run's history would lose a log."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(int(self._clock() * 1000), self._last + 1)
            return self._last


_metric_stamps = _MetricStamps()


class ModelRegistry:
    """Owner-scoped reads and alias changes of MLflow's registered models."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure_http(settings.mlflow.request_timeout_s)

    @functools.cached_property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.settings.mlflow_tracking_uri)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run an MLflow call: unreachable -> UnavailableError, unknown -> _MissingError."""
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise _MissingError from exc
            raise self._unavailable(exc) from exc
        except (OSError, ConnectionError) as exc:
            raise self._unavailable(exc) from exc

    def with_client(self, model_name: str, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on ``model_name`` with MLflow's errors turned into the service's, as
        for every call here (for rules kept in their own modules: :mod:`service.core.best`)."""
        try:
            return self._call(lambda: fn(self.client))
        except _MissingError:
            raise not_found("registered model", model_name) from None

    def _unavailable(self, exc: BaseException) -> UnavailableError:
        server = _server_address(self.settings.mlflow_tracking_uri)
        if server is None:
            # an embedded store is a file here: its errors name our folders, the log has them
            _LOG.warning("the model registry's store did not answer: %s", exc)
            where, text = "MLflow's store on this server", type(exc).__name__
        else:  # MLflow's own message repeats the URL, with any credentials in it
            text = _URL_CREDENTIALS.sub("//", " ".join(str(exc).split()))[:300]
            where = f"MLflow at {server}"
        return UnavailableError(
            "model_registry_unavailable",
            f"the model registry ({where}) did not answer: {text or type(exc).__name__}; "
            "try again later",
        )

    def ping(self) -> None:
        """Raise :class:`UnavailableError` unless MLflow answers."""
        self._call(lambda: self.client.search_experiments(max_results=1))

    # -- reads -------------------------------------------------------------------------------

    def _owned_model(self, owner: str, name: str) -> Any:
        try:
            model = self._call(lambda: self.client.get_registered_model(name))
        except _MissingError:
            raise not_found("model", name) from None
        if model.tags.get(OWNER_TAG) != owner:
            raise not_found("model", name)
        return model

    def list_models(self, owner: str) -> list[RegisteredModel]:
        models = self._call(
            lambda: self.client.search_registered_models(
                filter_string=f"tags.`{OWNER_TAG}` = '{quote(owner)}'", max_results=1000
            )
        )
        return sorted((_model(m) for m in models), key=lambda m: m.name)

    def get_model(self, owner: str, name: str) -> RegisteredModel:
        return _model(self._owned_model(owner, name))

    def list_versions(self, owner: str, name: str) -> list[ModelVersion]:
        model = self._owned_model(owner, name)
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        versions = self._call(
            lambda: self.client.search_model_versions(f"name = '{quote(name)}'", max_results=10_000)
        )
        outs = [_version(v, aliases) for v in versions]
        return sorted(outs, key=lambda v: int(v.version), reverse=True)

    def get_version(self, owner: str, name: str, version: str) -> ModelVersion:
        """``owner``'s version ``version`` (a number or an alias) of model ``name``; not found for
        a model, version or alias that does not exist (or is not the owner's)."""
        model = self._owned_model(owner, name)
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        if not version.isdigit():  # an alias names a version too
            if version not in aliases:
                raise not_found("model version", f"{name}@{version}")
            version = aliases[version]
        try:
            found = self._call(lambda: self.client.get_model_version(name, version))
        except _MissingError:
            raise not_found("model version", f"{name}/{version}") from None
        return _version(found, aliases)

    # -- changes -----------------------------------------------------------------------------

    def set_alias(self, owner: str, name: str, alias: str, version: str) -> ModelVersion:
        """Point ``alias`` at ``version``; ``best`` pointed by hand carries the rule
        :data:`BEST_BY_HAND` (the tags of its former holder no longer count, see
        :func:`_version`; the next :func:`service.core.best.move_best_alias` removes them)."""
        self.get_version(owner, name, version)  # not found unless it exists and is the owner's
        if alias == BEST_ALIAS:
            self._call(lambda: self._tag_by_hand(name, version))
        self._call(lambda: self.client.set_registered_model_alias(name, alias, version))
        return self.get_version(owner, name, version)

    def _tag_by_hand(self, name: str, version: str) -> None:
        from mlflow.exceptions import MlflowException

        self.client.set_model_version_tag(name, version, BEST_RULE_TAG, BEST_BY_HAND)
        try:
            self.client.delete_model_version_tag(name, version, BEST_VALUE_TAG)
        except MlflowException as exc:  # it had none
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise

    def log_version_metrics(
        self, owner: str, name: str, version: str, metrics: Mapping[str, float], step: int = 0
    ) -> str:
        """Log ``metrics`` at ``step`` to the run that registered ``owner``'s ``version`` of
        ``name``; that run's id. Not found for a version that is not the owner's, or whose run
        is gone."""
        from mlflow.entities import Metric

        out = self.get_version(owner, name, version)
        run_id = out.run_id
        if run_id is None:
            raise not_found("run of model version", f"{name}/{out.version}")
        now = _metric_stamps.next()
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        try:
            self._call(lambda: self.client.log_batch(run_id, metrics=batch))
        except _MissingError:
            raise not_found("run of model version", f"{name}/{out.version}") from None
        return run_id

    def download_weights(self, owner: str, name: str, version: str) -> tuple[Path, Path]:
        """``(file, folder)``: the version's ``model_final.pt``, copied into ``folder``, a new
        temporary folder that the caller removes."""
        out = self.get_version(owner, name, version)
        folder = Path(tempfile.mkdtemp(prefix="reid-weights-"))
        import mlflow.artifacts

        def download() -> str:
            # the registry resolves the version to its model's artifacts (``models:/`` URIs
            # would go through the process-wide registry URI, not this service's)
            artifacts = self.client.get_model_version_download_uri(name, out.version)
            return str(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{artifacts.rstrip('/')}/{WEIGHTS_PATH}",
                    dst_path=str(folder),
                    tracking_uri=self.settings.mlflow_tracking_uri,
                )
            )

        try:
            path = self._call(download)
        except _MissingError:
            shutil.rmtree(folder, ignore_errors=True)
            raise not_found("model weights", f"{name}/{out.version}") from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        file = Path(path)
        if not file.resolve().is_relative_to(folder.resolve()):  # a local store answers in place
            file = Path(shutil.copy2(file, folder / file.name))
        return file, folder


class _MissingError(Exception):
    """MLflow said the resource does not exist."""


def _model(model: Any) -> RegisteredModel:
    latest = [int(v.version) for v in (model.latest_versions or [])]
    return RegisteredModel(
        name=model.name,
        description=model.description or None,
        latest_version=str(max(latest)) if latest else None,
        aliases={alias: str(v) for alias, v in (model.aliases or {}).items()},
        created_at=_when(model.creation_timestamp),
        updated_at=_when(model.last_updated_timestamp),
    )


def _version(version: Any, aliases: dict[str, str]) -> ModelVersion:
    tags = version.tags or {}
    metrics: dict[str, float] = {}
    for key, text in tags.items():
        value = finite_number(text) if key.startswith(METRIC_TAG_PREFIX) else None
        if value is not None:
            metrics[key.removeprefix(METRIC_TAG_PREFIX)] = value
    number = str(version.version)
    # the rule tags count on the version holding ``best`` only: a former holder may keep them
    # until the rule runs again (an alias pointed by hand, two writers at once)
    holds_best = aliases.get(BEST_ALIAS) == number
    best_rule = tags.get(BEST_RULE_TAG) if holds_best else None
    best_value = finite_number(tags.get(BEST_VALUE_TAG)) if best_rule is not None else None
    return ModelVersion(
        name=version.name,
        version=number,
        status=str(version.status),
        run_id=version.run_id,
        job_id=tags.get(JOB_TAG),
        metrics=metrics,
        aliases=sorted(a for a, v in aliases.items() if v == number),
        created_at=_when(version.creation_timestamp),
        best_rule=best_rule,
        best_value=best_value,
    )


def finite_number(text: str | None) -> float | None:
    """The finite number ``text`` spells (a tag's value), else None."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def quote(value: str) -> str:
    """``value`` inside single quotes of an MLflow search filter."""
    return value.replace("'", "''")
