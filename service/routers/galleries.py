"""/v1/galleries: index a dataset's images with a registered model, then search it with images.

``POST /v1/galleries`` checks the dataset and the model version (an alias is resolved to its
number), commits the gallery QUEUED and sends its id to the workers (:mod:`worker.gallery_task`),
which build the index; ``GET`` shows the state and progress; ``POST /{id}/search`` embeds a query
image with the gallery's model and answers its nearest gallery images, each with its
``position`` in the index, which ``GET /{id}/images/{position}`` answers as the image file (for
thumbnails). Another owner's gallery is a 404, as everywhere.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import CurrentOwner
from service.deps import SessionDep, SettingsDep
from service.errors import APIError, not_found
from service.galleries import (
    UploadedImage,
    cached_embedder,
    cached_index,
    change_gallery_state,
    decode_images,
    fail_if_stale,
    forget_index,
    gallery_dir,
    lock_gallery,
    receive_images,
    resolve_version,
)
from service.models import Dataset, DatasetStatus, Gallery, GalleryState, utcnow
from service.registry import ModelRegistry
from service.schemas import (
    COMMON_ERRORS,
    GalleryCreate,
    GalleryOut,
    GallerySearchOut,
    Page,
    SearchHitOut,
    error_responses,
)
from service.settings import Settings

if TYPE_CHECKING:
    from reid_core.search import GalleryIndex

router = APIRouter(prefix="/v1/galleries", tags=["galleries"], responses=COMMON_ERRORS)

_LOG = logging.getLogger("service.galleries")

#: Most hits one search returns.
MAX_K = 1000

_QUERY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "The query: a person crop (JPEG, PNG, BMP, WebP).",
                        }
                    },
                }
            }
        },
    }
}


def _invalid(field: str, message: str, value: object) -> APIError:
    return APIError(
        422,
        "validation_error",
        message,
        details=[{"field": field, "message": message, "value": value}],
    )


def _gallery_split_images(dataset: Dataset) -> int:
    """Images the gallery will index, from the dataset's scan: the gallery split of a labelled
    dataset (bounding_box_test), else every image."""
    splits = dataset.splits or {}
    gallery = int((splits.get("gallery") or {}).get("images", 0))
    return gallery if gallery else int((splits.get("train") or {}).get("images", 0))


def _check_ready(dataset: Dataset) -> None:
    """409 unless ``dataset`` is READY: a build reads its files."""
    if dataset.status is not DatasetStatus.READY:
        raise APIError(409, "dataset_not_ready", f"dataset {dataset.id} is {dataset.status}")


def _out(gallery: Gallery) -> GalleryOut:
    return GalleryOut.model_validate(gallery)


def _send_to_workers(settings: Settings, session: Session, gallery: Gallery) -> None:
    """Publish the committed gallery to the broker; FAILED (with the broker's error) when it does
    not take it, so that nobody waits on a build that will never start."""
    try:
        from worker.gallery_task import send_gallery
    except ImportError as exc:  # the `worker` extra is not installed here
        reason = f"cannot reach the workers: the worker package does not load here ({exc})"
    else:
        error = send_gallery(settings, gallery)
        if error is None:
            return
        reason = (
            f"the workers' broker did not take the build ({error}); retry it (POST "
            f"/v1/galleries/{gallery.id}/retry) once the broker is back"
        )
    locked = lock_gallery(session, gallery.id)
    if locked is not None and locked.state is GalleryState.QUEUED:
        change_gallery_state(session, locked, GalleryState.FAILED, reason)
        session.commit()
        _LOG.warning("gallery %s: %s", gallery.id, reason)


@router.post(
    "",
    status_code=202,
    summary="Build a gallery: a searchable index of a dataset's images, with a model version",
    responses=error_responses(
        e404="Unknown dataset, model or version",
        e409="The dataset is not ready or has no image to index",
        e503="MLflow (the model registry) is down",
    ),
)
def create_gallery(
    body: GalleryCreate,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
) -> GalleryOut:
    """A Market-layout dataset contributes its gallery split (``bounding_box_test``), an image
    folder every image. The build runs on a worker (queue ``cpu`` with ``gpus=0``, ``gpu1``
    otherwise); follow it with ``GET /v1/galleries/{id}`` until READY."""
    dataset = session.execute(
        select(Dataset).where(Dataset.id == body.dataset_id, Dataset.owner == owner)
    ).scalar_one_or_none()
    if dataset is None:
        raise not_found("dataset", body.dataset_id)
    _check_ready(dataset)
    images = _gallery_split_images(dataset)
    if images == 0:
        raise APIError(409, "dataset_empty", f"dataset {dataset.id} has no readable image to index")
    gpus = min(1, settings.job_bounds.gpus_or_default(body.gpus))
    if gpus > settings.job_bounds.max_gpus:
        raise _invalid(
            "body.gpus",
            f"gpus={gpus} is above this service's limit of {settings.job_bounds.max_gpus}",
            gpus,
        )
    queue = body.queue or settings.queues[0]
    if queue not in settings.queues:
        raise _invalid(
            "body.queue",
            f"unknown queue {queue!r}; this service has: {', '.join(settings.queues)}",
            queue,
        )
    version = resolve_version(ModelRegistry(settings), owner, body.model_name, body.model_version)
    gallery = Gallery(
        id=uuid.uuid4(),
        owner=owner,
        name=body.name,
        dataset_id=dataset.id,
        dataset_path=dataset.path,
        dataset_format=dataset.format,
        model_name=version.name,
        model_version=version.version,
        gpus=gpus,
        queue=queue,
        progress=0.0,
        image_count=images,
        images_done=0,
        skipped_count=0,
    )
    alias = "" if body.model_version == version.version else f" ({body.model_version})"
    change_gallery_state(
        session,
        gallery,
        GalleryState.QUEUED,
        f"requested by {owner}: {images} images of dataset {dataset.name} with "
        f"{version.name} version {version.version}{alias}",
    )
    session.commit()
    if settings.worker.enqueue_on_submit:
        _send_to_workers(settings, session, gallery)
    response.headers["Location"] = f"/v1/galleries/{gallery.id}"
    return _out(gallery)


def _owned(session: Session, owner: str, gallery_id: uuid.UUID) -> Gallery:
    gallery = session.execute(
        select(Gallery).where(Gallery.id == gallery_id, Gallery.owner == owner)
    ).scalar_one_or_none()
    if gallery is None:
        raise not_found("gallery", gallery_id)
    return gallery


def _fail_stale(session: Session, settings: Settings, galleries: list[Gallery]) -> None:
    """Builds whose worker stopped heartbeating are FAILED when someone looks (no reaper runs
    for galleries)."""
    timeout = settings.worker.heartbeat_timeout_s
    now = utcnow()
    changed = False
    for gallery in galleries:
        if gallery.state is not GalleryState.BUILDING:
            continue
        locked = lock_gallery(session, gallery.id)
        changed |= locked is not None and fail_if_stale(session, locked, timeout, now)
    if changed:
        session.commit()


@router.get("", summary="Your galleries, newest first")
def list_galleries(
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[GalleryOut]:
    where = Gallery.owner == owner
    total = session.execute(select(func.count()).select_from(Gallery).where(where)).scalar_one()
    rows = list(
        session.execute(
            select(Gallery)
            .where(where)
            .order_by(Gallery.created_at.desc(), Gallery.id)
            .limit(limit)
            .offset(offset)
        ).scalars()
    )
    _fail_stale(session, settings, rows)
    return Page[GalleryOut](items=[_out(g) for g in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/{gallery_id}",
    summary="One gallery: state, progress, counts",
    responses=error_responses(e404="Unknown gallery"),
)
def get_gallery(
    gallery_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> GalleryOut:
    gallery = _owned(session, owner, gallery_id)
    _fail_stale(session, settings, [gallery])
    return _out(gallery)


@router.delete(
    "/{gallery_id}",
    status_code=204,
    summary="Delete a gallery and its index (a build in progress is stopped)",
    responses=error_responses(e404="Unknown gallery"),
)
def delete_gallery(
    gallery_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    gallery = lock_gallery(session, gallery_id, owner=owner)
    if gallery is None:
        raise not_found("gallery", gallery_id)
    session.delete(gallery)
    session.commit()
    # A running build notices the row is gone, stops and removes what it wrote.
    folder = gallery_dir(settings, gallery_id)
    forget_index(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return Response(status_code=204)


@router.post(
    "/{gallery_id}/retry",
    status_code=202,
    summary="Build a FAILED gallery again, from scratch",
    responses=error_responses(
        e404="Unknown gallery",
        e409="The gallery is not FAILED, or its dataset is gone or not ready",
    ),
)
def retry_gallery(
    gallery_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> GalleryOut:
    """The gallery goes back to QUEUED with the same id, dataset, model version and queue, and
    is sent to the workers again (e.g. after its worker died, or the broker was down). A builder
    that may still run for it (a worker that stopped heartbeating) is told to stop: the gallery
    is no longer its to build."""
    gallery = lock_gallery(session, gallery_id, owner=owner)
    if gallery is None:
        raise not_found("gallery", gallery_id)
    if gallery.state is not GalleryState.FAILED:
        raise APIError(
            409,
            "gallery_not_failed",
            f"gallery {gallery_id} is {gallery.state}: only a FAILED gallery can be retried",
        )
    dataset = None if gallery.dataset_id is None else session.get(Dataset, gallery.dataset_id)
    if dataset is None:
        raise APIError(
            409,
            "dataset_gone",
            f"the dataset of gallery {gallery_id} was deleted; create a gallery of another one",
        )
    _check_ready(dataset)
    change_gallery_state(
        session, gallery, GalleryState.QUEUED, f"retried by {owner} (was: {gallery.reason})"
    )
    gallery.worker_id = None  # an old supervisor stops its builder when it sees this
    gallery.heartbeat_at = None
    gallery.started_at = None
    gallery.finished_at = None
    gallery.progress = 0.0
    gallery.images_done = 0
    gallery.skipped_count = 0
    gallery.image_count = _gallery_split_images(dataset)
    session.commit()  # a FAILED gallery was never READY: no index of it is cached
    if settings.worker.enqueue_on_submit:
        _send_to_workers(settings, session, gallery)
    return _out(gallery)


def _relative(path: str, root: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def _require_ready(gallery: Gallery) -> None:
    """409 unless ``gallery`` is READY: before that it has no index to read."""
    if gallery.state is not GalleryState.READY:
        raise APIError(
            409,
            "gallery_not_ready",
            f"gallery {gallery.id} is {gallery.state} ({gallery.reason}); use it once it is READY",
        )


def _ready_index(settings: Settings, gallery: Gallery) -> GalleryIndex:
    """The READY gallery's index (read from disk on first use, then cached); 409 when the
    gallery is not READY or its index files are gone."""
    _require_ready(gallery)
    folder = gallery_dir(settings, gallery.id)
    try:
        return cached_index(folder)
    except FileNotFoundError:
        raise APIError(
            409,
            "gallery_index_missing",
            f"gallery {gallery.id} is READY but its index is missing from {folder}; delete the "
            "gallery and create it again",
        ) from None


def _search(
    settings: Settings, gallery: Gallery, query: UploadedImage, k: int, camera: int | None
) -> GallerySearchOut:
    index = _ready_index(settings, gallery)
    embedder = cached_embedder(
        ModelRegistry(settings), gallery.owner, gallery.model_name, gallery.model_version
    )
    cameras = None if camera is None else [camera]
    features = embedder.embed_images(decode_images([query]), cameras=cameras)
    hits = index.search(features, k=k)[0]
    return GallerySearchOut(
        gallery_id=gallery.id,
        model_name=gallery.model_name,
        model_version=gallery.model_version,
        query=query.name,
        k=k,
        hits=[
            SearchHitOut(
                rank=rank,
                path=_relative(hit.path, gallery.dataset_path),
                score=hit.score,
                camera_id=hit.camid if hit.camid >= 0 else None,
                person_id=hit.pid if hit.pid >= 0 else None,
                position=hit.position,
            )
            for rank, hit in enumerate(hits, start=1)
        ],
    )


@router.post(
    "/{gallery_id}/search",
    summary="The gallery images closest to a query image, best first",
    openapi_extra=_QUERY_BODY,
    responses=error_responses(
        e400="Malformed multipart body",
        e404="Unknown gallery",
        e409="The gallery is not READY",
        e413="The image is too large",
        e415="Not multipart/form-data",
        e503="MLflow (the model registry) is down",
    ),
)
async def search_gallery(
    request: Request,
    gallery_id: uuid.UUID,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    k: Annotated[int, Query(ge=1, le=MAX_K, description="How many hits")] = 10,
    camera: Annotated[
        int | None,
        Query(
            ge=0,
            description="The query's camera id, as the dataset numbers its cameras. A model "
            "trained with model.camera_norm normalises the query with that camera's statistics "
            "(the pooled ones when omitted or a camera it was not trained on); other models "
            "ignore it.",
        ),
    ] = None,
) -> GallerySearchOut:
    """The query (multipart file part ``image``) is embedded by the gallery's model; scores are
    cosine similarities, hits carry the image's path relative to the dataset's folder, its
    camera and, for a labelled dataset, its identity."""
    gallery = await run_in_threadpool(_owned, session, owner, gallery_id)
    _require_ready(gallery)  # before reading the upload
    (query,) = await receive_images(request, "image", max_files=1)
    return await run_in_threadpool(_search, settings, gallery, query, k, camera)


@router.get(
    "/{gallery_id}/images/{position}",
    summary="One indexed image of the gallery (a search hit's position), as its file",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The image file, with a content type from its suffix.",
            "content": {"image/*": {}, "application/octet-stream": {}},
        },
        **error_responses(
            e404="Unknown gallery, no image at that position, or the file is gone from disk",
            e409="The gallery is not READY (or its index is missing)",
        ),
    },
)
def gallery_image(
    gallery_id: uuid.UUID,
    position: Annotated[
        int, PathParam(ge=0, description="A search hit's `position`: its row in the index.")
    ],
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
) -> FileResponse:
    """The file the gallery indexed at ``position`` (0 to the number of indexed images - 1), read
    from the dataset's folder as it is now: for thumbnails of search hits."""
    gallery = _owned(session, owner, gallery_id)
    index = _ready_index(settings, gallery)
    if position >= len(index):
        raise APIError(
            404,
            "gallery_image_not_found",
            f"gallery {gallery_id} has no image at position {position}: it indexes "
            f"{len(index)} image(s), at positions 0 to {len(index) - 1}",
        )
    path = Path(index.records[position].path)
    try:
        status: os.stat_result | None = os.stat(path)
    except OSError:
        status = None
    if status is None or not stat.S_ISREG(status.st_mode):
        shown = _relative(str(path), gallery.dataset_path)
        raise APIError(
            404,
            "gallery_image_missing",
            f"gallery image {shown} (position {position}) is no longer on disk: {path} is gone; "
            "the dataset's folder changed after the gallery was built",
        )
    return FileResponse(
        path,
        media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
        stat_result=status,
        headers={"X-Content-Type-Options": "nosniff"},
    )
