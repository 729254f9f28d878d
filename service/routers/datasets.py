"""/v1/datasets: register a server folder or upload an archive, list, show, delete."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.archives import ArchiveError, ArchiveLimits, extract_archive
from service.auth import CurrentOwner
from service.dataset_files import (
    DatasetFolderError,
    ScanResult,
    resolve_registered_path,
    scan_dataset_folder,
    single_top_folder,
)
from service.deps import SessionDep, SettingsDep
from service.errors import APIError, not_found
from service.job_states import FINAL_STATES
from service.models import Dataset, DatasetKind, DatasetStatus, Job
from service.schemas import (
    COMMON_ERRORS,
    DATASET_NAME_PATTERN,
    DatasetFromPath,
    DatasetOut,
    Page,
    error_responses,
)
from service.settings import Settings
from service.uploads import receive_multipart

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=COMMON_ERRORS)

_MAX_JSON_BYTES = 64 * 1024
_SCRATCH = ".scratch"

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


def _ensure_name_free(session: Session, owner: str, name: str) -> None:
    taken = session.execute(
        select(Dataset.id).where(Dataset.owner == owner, Dataset.name == name)
    ).first()
    if taken is not None:
        raise _name_taken(name)


def _name_taken(name: str) -> APIError:
    return APIError(
        409, "dataset_name_taken", f"you already have a dataset named {name!r}; pick another name"
    )


def _scan(root: Path) -> ScanResult:
    try:
        return scan_dataset_folder(root)
    except DatasetFolderError as exc:
        raise APIError(400, "invalid_dataset", str(exc)) from None


def _new_dataset(
    owner: str, name: str, kind: DatasetKind, scan: ScanResult, **extra: Any
) -> Dataset:
    return Dataset(
        owner=owner,
        name=name,
        kind=kind,
        format=scan.format,
        status=DatasetStatus.READY,
        image_count=scan.image_count,
        identity_count=scan.identity_count,
        camera_count=scan.camera_count,
        splits=scan.splits,
        unreadable_count=scan.unreadable_count,
        unreadable_sample=scan.unreadable_sample,
        **extra,
    )


def _save(session: Session, dataset: Dataset) -> DatasetOut:
    session.add(dataset)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise _name_taken(dataset.name) from None
    return DatasetOut.model_validate(dataset)


def _register_path(
    session: Session, settings: Settings, owner: str, payload: DatasetFromPath
) -> DatasetOut:
    _ensure_name_free(session, owner, payload.name)
    try:
        root = resolve_registered_path(payload.path, settings.dataset_roots)
    except DatasetFolderError as exc:
        raise APIError(400, "invalid_dataset_path", str(exc)) from None
    scan = _scan(root)
    return _save(session, _new_dataset(owner, payload.name, DatasetKind.PATH, scan, path=str(root)))


def _register_extracted(
    session: Session, settings: Settings, owner: str, name: str, work: Path
) -> DatasetOut:
    _ensure_name_free(session, owner, name)
    limits = ArchiveLimits(
        max_files=settings.limits.max_archive_files,
        max_uncompressed_bytes=settings.limits.max_uncompressed_bytes,
    )
    extracted = work / "data"
    try:
        summary = extract_archive(work / "archive", extracted, limits)
    except ArchiveError as exc:
        raise APIError(exc.status, exc.code, exc.message) from None
    (work / "archive").unlink()
    inner = single_top_folder(extracted).relative_to(extracted)
    scan = _scan(extracted / inner)
    dataset_id = uuid.uuid4()
    final = settings.upload_path / str(dataset_id)
    os.replace(extracted, final)  # same file system: the scratch folder is inside upload_dir
    try:
        return _save(
            session,
            _new_dataset(
                owner,
                name,
                DatasetKind.UPLOAD,
                scan,
                id=dataset_id,
                path=str(final / inner),
                size_bytes=summary.uncompressed_bytes,
            ),
        )
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


async def _register_upload(
    request: Request, session: Session, settings: Settings, owner: str
) -> DatasetOut:
    work = settings.upload_path / _SCRATCH / uuid.uuid4().hex
    work.mkdir(parents=True)
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
        return await run_in_threadpool(
            _register_extracted, session, settings, owner, form.name, work
        )
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
        return await run_in_threadpool(_register_path, session, settings, owner, payload)
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
def list_datasets(
    owner: CurrentOwner,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[DatasetOut]:
    where = Dataset.owner == owner
    total = session.execute(select(func.count()).select_from(Dataset).where(where)).scalar_one()
    rows = session.execute(
        select(Dataset)
        .where(where)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(limit)
        .offset(offset)
    ).scalars()
    return Page[DatasetOut](
        items=[DatasetOut.model_validate(d) for d in rows], total=total, limit=limit, offset=offset
    )


def _owned_dataset(session: Session, owner: str, dataset_id: uuid.UUID) -> Dataset:
    dataset = session.execute(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner)
    ).scalar_one_or_none()
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


@router.get("/{dataset_id}", summary="One dataset", responses=error_responses(e404="Unknown"))
def get_dataset(dataset_id: uuid.UUID, owner: CurrentOwner, session: SessionDep) -> DatasetOut:
    return DatasetOut.model_validate(_owned_dataset(session, owner, dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=204,
    summary="Delete a dataset (an upload's files too; a server folder is left alone)",
    responses=error_responses(e404="Unknown", e409="A job still uses it"),
)
def delete_dataset(
    dataset_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    dataset = session.execute(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.owner == owner).with_for_update()
    ).scalar_one_or_none()
    if dataset is None:
        raise not_found("dataset", dataset_id)
    active = session.execute(
        select(Job.id, Job.state).where(
            Job.dataset_id == dataset.id, Job.state.not_in(list(FINAL_STATES))
        )
    ).all()
    if active:
        job_id, state = active[0]
        raise APIError(
            409,
            "dataset_in_use",
            f"dataset {dataset_id} is used by {len(active)} unfinished job(s) (e.g. job "
            f"{job_id}, {state}); cancel them or wait for them to finish",
        )
    kind = dataset.kind
    session.delete(dataset)
    session.commit()
    if kind is DatasetKind.UPLOAD:
        folder = settings.upload_path / str(dataset_id)
        if folder.resolve().is_relative_to(settings.upload_path.resolve()):
            shutil.rmtree(folder, ignore_errors=True)
    return Response(status_code=204)
