"""/v1/models: your registered models (MLflow), their versions, aliases and weights, and the
features a version computes for uploaded images."""

from __future__ import annotations

import dataclasses
import shutil
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from service.api.auth import CurrentOwner
from service.api.deps import SettingsDep
from service.api.schemas import (
    COMMON_ERRORS,
    AliasUpdate,
    EmbedOut,
    ImageFeatureOut,
    ModelOut,
    ModelVersionOut,
    error_responses,
)
from service.api.uploads import IMAGE_UPLOAD_ERRORS, image_parts_body, receive_images
from service.core.images import MAX_EMBED_IMAGES, MAX_IMAGE_BYTES, UploadedImage, decode_images
from service.core.model_cache import cached_embedder
from service.core.registry import ModelRegistry, ModelVersion, RegisteredModel, mlflow_ui_url
from service.core.settings import MODEL_NAME_PATTERN, Settings

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    responses=COMMON_ERRORS,
)

ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="Registered model")]
VersionRef = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="A version number, or an alias")
]
AliasName = Annotated[str, Path(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]


class ModelList(BaseModel):
    items: list[ModelOut]


class VersionList(BaseModel):
    items: list[ModelVersionOut]


def _model_out(settings: Settings, model: RegisteredModel) -> ModelOut:
    return ModelOut(
        **dataclasses.asdict(model), mlflow_url=mlflow_ui_url(settings, f"models/{model.name}")
    )


def _version_out(settings: Settings, version: ModelVersion) -> ModelVersionOut:
    name, number = version.name, version.version
    return ModelVersionOut(
        **dataclasses.asdict(version),
        load_uri=version.load_uri,
        download_url=f"/v1/models/{name}/versions/{number}/weights",
        mlflow_url=mlflow_ui_url(settings, f"models/{name}/versions/{number}"),
    )


@router.get("", summary="Your registered models")
def list_models(owner: CurrentOwner, settings: SettingsDep) -> ModelList:
    models = ModelRegistry(settings).list_models(owner)
    return ModelList(items=[_model_out(settings, m) for m in models])


@router.get(
    "/{name}", summary="One registered model", responses=error_responses(e404="Unknown model")
)
def get_model(name: ModelName, owner: CurrentOwner, settings: SettingsDep) -> ModelOut:
    return _model_out(settings, ModelRegistry(settings).get_model(owner, name))


@router.get(
    "/{name}/versions",
    summary="The model's versions, newest first, with their metrics and aliases",
    responses=error_responses(e404="Unknown model"),
)
def list_versions(name: ModelName, owner: CurrentOwner, settings: SettingsDep) -> VersionList:
    versions = ModelRegistry(settings).list_versions(owner, name)
    return VersionList(items=[_version_out(settings, v) for v in versions])


@router.get(
    "/{name}/versions/{version}",
    summary="One version (by number or alias): metrics, the job and run that made it",
    responses=error_responses(e404="Unknown model or version"),
)
def get_version(
    name: ModelName, version: VersionRef, owner: CurrentOwner, settings: SettingsDep
) -> ModelVersionOut:
    return _version_out(settings, ModelRegistry(settings).get_version(owner, name, version))


@router.put(
    "/{name}/aliases/{alias}",
    summary="Point an alias (e.g. best, production) at a version",
    responses=error_responses(e404="Unknown model or version"),
)
def set_alias(
    name: ModelName,
    alias: AliasName,
    body: AliasUpdate,
    owner: CurrentOwner,
    settings: SettingsDep,
) -> ModelVersionOut:
    changed = ModelRegistry(settings).set_alias(owner, name, alias, body.version)
    return _version_out(settings, changed)


@router.get(
    "/{name}/versions/{version}/weights",
    summary="Download the version's weights (model_final.pt: tensors and config, no pickle)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        **error_responses(e404="Unknown model or version"),
    },
)
def download_weights(
    name: ModelName, version: VersionRef, owner: CurrentOwner, settings: SettingsDep
) -> FileResponse:
    """``torch.load(path, weights_only=True)`` reads it; ``reid_core.model_io.load_model`` (or
    ``reid embed --checkpoint``) rebuilds the network from it."""
    registry = ModelRegistry(settings)
    number = registry.get_version(owner, name, version).version
    path, folder = registry.download_weights(owner, name, number)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{name}-v{number}.pt",
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )


_EMBED_BODY = image_parts_body(
    "files",
    f"Person crops (JPEG, PNG, BMP, WebP), at most {MAX_IMAGE_BYTES} bytes each.",
    max_files=MAX_EMBED_IMAGES,
)


def _embed(
    settings: Settings, owner: str, name: str, version: str, images: list[UploadedImage]
) -> EmbedOut:
    registry = ModelRegistry(settings)
    number = registry.get_version(owner, name, version).version  # the owner's
    embedder = cached_embedder(registry, owner, name, number)
    features = embedder.embed_images(decode_images(images))
    return EmbedOut(
        model_name=name,
        model_version=number,
        feature_dim=embedder.feature_dim,
        items=[
            ImageFeatureOut(name=image.name, feature=row.tolist())
            for image, row in zip(images, features, strict=True)
        ],
    )


@router.post(
    "/{name}/versions/{version}/embed",
    summary="Features of images with this version (L2-normalised, one row per image)",
    openapi_extra=_EMBED_BODY,
    responses=error_responses(
        **IMAGE_UPLOAD_ERRORS,
        e404="Unknown model or version",
        e413="Too many images, or one too large",
    ),
)
async def embed_images(
    request: Request,
    name: ModelName,
    version: VersionRef,
    owner: CurrentOwner,
    settings: SettingsDep,
) -> EmbedOut:
    """Multipart file parts named ``files`` (up to ``MAX_EMBED_IMAGES``), answered in the order
    sent; a file that is not an image is a 422 naming it. The features are the ones
    ``Embedder.embed_files`` (and the trained model's evaluation) computes; the model is loaded
    once per API process and kept."""
    images = await receive_images(request, "files")
    return await run_in_threadpool(_embed, settings, owner, name, version, images)
