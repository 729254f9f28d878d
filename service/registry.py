"""The model registry as the API sees it: MLflow's registered models, filtered by owner.

Jobs register their final models (see :mod:`worker.mlflow_hook`); a registered model and its
versions carry the tag ``reid.owner``, and an owner sees and changes only their own models.
Every call here is synchronous (FastAPI runs the routes in its thread pool) and bounded by
``mlflow.request_timeout_s``; an MLflow that does not answer is a 503 naming it.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from service.errors import APIError, not_found
from service.schemas import ModelOut, ModelVersionOut
from service.settings import Settings
from worker.tracking import JOB_TAG, METRIC_TAG_PREFIX, OWNER_TAG, configure_http

__all__ = ["ModelRegistry", "ensure_experiment"]

#: Inside a logged model: the plain weights + config file (reid_core.model_io format).
WEIGHTS_PATH = "extra_files/model_final.pt"

T = TypeVar("T")


def _when(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None


def ensure_experiment(settings: Settings) -> str:
    """Create the jobs' experiment (with the embedded artifact root) if missing; its id.

    Run once when the embedded service starts, so that the SQLite store is created (and
    migrated) by one process before the API and the workers use it.
    """
    from mlflow.tracking import MlflowClient

    configure_http(settings.mlflow.request_timeout_s)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(
        client.create_experiment(
            settings.mlflow.experiment, artifact_location=settings.mlflow_artifact_location
        )
    )


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
        """Run an MLflow call; unreachable -> 503, unknown resource -> None-like 404 upstream."""
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise _MissingError from exc
            raise self._unavailable(exc) from exc
        except (OSError, ConnectionError) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> APIError:
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        return APIError(
            503,
            "model_registry_unavailable",
            f"the model registry (MLflow at {self.settings.mlflow_tracking_uri}) did not answer: "
            f"{text}; try again later",
        )

    def ping(self) -> None:
        """Raise (503 APIError) unless MLflow answers."""
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

    def _out(self, model: Any) -> ModelOut:
        latest = [int(v.version) for v in (model.latest_versions or [])]
        return ModelOut(
            name=model.name,
            description=model.description or None,
            latest_version=str(max(latest)) if latest else None,
            aliases={alias: str(v) for alias, v in (model.aliases or {}).items()},
            created_at=_when(model.creation_timestamp),
            updated_at=_when(model.last_updated_timestamp),
            mlflow_url=self._ui(f"models/{model.name}"),
        )

    def _ui(self, path: str) -> str | None:
        base = self.settings.mlflow.ui_url
        return f"{base.rstrip('/')}/#/{path}" if base else None

    def _version_out(self, version: Any, aliases: dict[str, str]) -> ModelVersionOut:
        metrics: dict[str, float] = {}
        for key, value in (version.tags or {}).items():
            if key.startswith(METRIC_TAG_PREFIX):
                try:
                    metrics[key.removeprefix(METRIC_TAG_PREFIX)] = float(value)
                except ValueError:
                    continue
        name, number = version.name, str(version.version)
        return ModelVersionOut(
            name=name,
            version=number,
            status=str(version.status),
            run_id=version.run_id,
            job_id=(version.tags or {}).get(JOB_TAG),
            metrics=metrics,
            aliases=sorted(a for a, v in aliases.items() if v == number),
            created_at=_when(version.creation_timestamp),
            load_uri=f"models:/{name}/{number}",
            download_url=f"/v1/models/{name}/versions/{number}/weights",
            mlflow_url=self._ui(f"models/{name}/versions/{number}"),
        )

    def list_models(self, owner: str) -> list[ModelOut]:
        models = self._call(
            lambda: self.client.search_registered_models(
                filter_string=f"tags.`{OWNER_TAG}` = '{_quote(owner)}'", max_results=1000
            )
        )
        return sorted((self._out(m) for m in models), key=lambda m: m.name)

    def get_model(self, owner: str, name: str) -> ModelOut:
        return self._out(self._owned_model(owner, name))

    def list_versions(self, owner: str, name: str) -> list[ModelVersionOut]:
        model = self._owned_model(owner, name)
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        versions = self._call(
            lambda: self.client.search_model_versions(
                f"name = '{_quote(name)}'", max_results=10_000
            )
        )
        outs = [self._version_out(v, aliases) for v in versions]
        return sorted(outs, key=lambda v: int(v.version), reverse=True)

    def get_version(self, owner: str, name: str, version: str) -> ModelVersionOut:
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
        return self._version_out(found, aliases)

    # -- changes -----------------------------------------------------------------------------

    def set_alias(self, owner: str, name: str, alias: str, version: str) -> ModelVersionOut:
        self.get_version(owner, name, version)  # 404 unless it exists and is the owner's
        self._call(lambda: self.client.set_registered_model_alias(name, alias, version))
        return self.get_version(owner, name, version)

    def download_weights(self, owner: str, name: str, version: str) -> tuple[Path, Path]:
        """``(file, folder)``: the version's ``model_final.pt``, copied into ``folder``, a new
        temporary folder that the caller removes."""
        out = self.get_version(owner, name, version)
        folder = Path(tempfile.mkdtemp(prefix="reid-weights-"))
        import mlflow.artifacts

        def download() -> str:
            # the registry resolves the version to its model's artifacts (``models:/`` URIs
            # would go through the process-wide registry URI, not this service's)
            model_uri = self.client.get_model_version_download_uri(name, out.version)
            return str(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{model_uri.rstrip('/')}/{WEIGHTS_PATH}",
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


def _quote(value: str) -> str:
    return value.replace("'", "''")
