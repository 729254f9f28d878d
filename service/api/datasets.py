"""/v1/datasets: register a server folder or upload an archive, list, show, delete."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session

from service.api.auth import CurrentOwner
from service.api.deps import PageDep, SessionDep, SettingsDep
from service.api.errors import APIError
from service.api.schemas import (
    COMMON_ERRORS,
    DATASET_NAME_PATTERN,
    DatasetFromPath,
    DatasetOut,
    Page,
    error_responses,
)
from service.api.uploads import receive_multipart
from service.core import datasets
from service.core.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=COMMON_ERRORS)

_MAX_JSON_BYTES = 64 * 1024

_REGISTER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": DatasetFromPath.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "file"],
                    "properties": {
                        "name": {"type": "string", "pattern": DATASET_NAME_PATTERN},
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A .zip or .tar.gz (.tgz, .tar, .tar.bz2, .tar.xz) "
                            "archive of a Market-1501-layout folder or of plain image files.",
                        },
                    },
                }
            },
        },
    }
}


class _UploadForm(BaseModel):
    name: str = Field(pattern=DATASET_NAME_PATTERN)


def _validation_error(err: ValidationError, where: str = "body") -> RequestValidationError:
    return RequestValidationError(
        [{**e, "loc": (where, *e["loc"])} for e in err.errors(include_url=False)]
    )


async def _read_json_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_JSON_BYTES:
            raise APIError(
                413, "body_too_large", f"JSON bodies are limited to {_MAX_JSON_BYTES} bytes"
            )
    return bytes(body)


async def _register_upload(
    request: Request, session: Session, settings: Settings, owner: str
) -> DatasetOut:
    work = datasets.upload_scratch(settings)
    try:
        received = await receive_multipart(
            request, work / "archive", settings.limits.max_upload_bytes
        )
        try:
            form = _UploadForm.model_validate({"name": received.fields.get("name")})
        except ValidationError as err:
            raise _validation_error(err) from None
        if received.filename is None or received.file_field != "file":
            got = f" (got a file part named {received.file_field!r})" if received.file_field else ""
            raise RequestValidationError(
                [
                    {
                        "type": "missing",
                        "loc": ("body", "file"),
                        "msg": f"Field required: the archive, as a file part named `file`{got}",
                    }
                ]
            )
        dataset = await run_in_threadpool(
            datasets.register_upload, session, settings, owner, form.name, work
        )
        return DatasetOut.model_validate(dataset)
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)


@router.post(
    "",
    status_code=201,
    summary="Register a dataset: a server folder (JSON) or an uploaded archive (multipart)",
    openapi_extra=_REGISTER_BODY,
    responses=error_responses(
        e400="Bad path, bad archive or no readable image",
        e409="Name already used",
        e413="Upload or archive above the limits",
        e415="Neither JSON nor multipart",
    ),
)
async def register_dataset(
    request: Request, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> DatasetOut:
    """JSON ``{"name", "path"}`` registers a folder under one of the configured dataset roots;
    multipart ``name`` + ``file`` uploads a .zip/.tar.gz, checked before it is extracted.

    The folder is scanned: a Market-1501 layout when it has ``bounding_box_train/``, else an
    unlabeled image folder. Counts and unreadable files are stored on the dataset."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await _read_json_body(request)
        try:
            payload = DatasetFromPath.model_validate_json(body)
        except ValidationError as err:
            raise _validation_error(err) from None
        dataset = await run_in_threadpool(
            datasets.register_path, session, settings, owner, payload.name, payload.path
        )
        return DatasetOut.model_validate(dataset)
    if content_type == "multipart/form-data":
        return await _register_upload(request, session, settings, owner)
    raise APIError(
        415,
        "unsupported_media_type",
        f"unsupported Content-Type {content_type or '(none)'!r}: send application/json "
        '{"name", "path"} to register a server folder, or multipart/form-data with `name` and '
        "`file` (an archive) to upload one",
    )


@router.get("", summary="Your datasets, newest first")
def list_datasets(owner: CurrentOwner, session: SessionDep, paging: PageDep) -> Page[DatasetOut]:
    page = datasets.list_datasets(session, owner, paging.limit, paging.offset, paging.after)
    return Page[DatasetOut].of(
        [DatasetOut.model_validate(d) for d in page.rows], page, paging.limit, paging.offset
    )


# `:uuid`: only a UUID is a dataset id in a path (as for jobs: a malformed id is no route, 404).
@router.get("/{dataset_id:uuid}", summary="One dataset", responses=error_responses(e404="Unknown"))
def get_dataset(dataset_id: uuid.UUID, owner: CurrentOwner, session: SessionDep) -> DatasetOut:
    return DatasetOut.model_validate(datasets.owned_dataset(session, owner, dataset_id))


@router.delete(
    "/{dataset_id:uuid}",
    status_code=204,
    summary="Delete a dataset (an upload's files too; a server folder is left alone)",
    responses=error_responses(e404="Unknown", e409="A job still uses it"),
)
def delete_dataset(
    dataset_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    datasets.delete_dataset(session, settings, owner, dataset_id)
    return Response(status_code=204)
