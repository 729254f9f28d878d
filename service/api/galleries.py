"""/v1/galleries: index a dataset's images with a registered model, then search it with images.

``POST /v1/galleries`` creates the gallery (:func:`service.core.galleries.create_gallery`) and the
workers build its index; ``GET`` shows the state and progress (and only reads), ``GET
/{id}/events`` its state changes with reasons; ``POST /{id}/search`` answers the
nearest gallery images of a query image, each with its ``position`` in the index, which
``GET /{id}/images/{position}`` answers as the image file (for thumbnails).
"""

from __future__ import annotations

import mimetypes
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from service.api.auth import CurrentOwner
from service.api.conditional import NOT_MODIFIED, ConditionalGetDep
from service.api.deps import PageDep, SessionDep, SettingsDep
from service.api.schemas import (
    COMMON_ERRORS,
    GalleryCreate,
    GalleryEventOut,
    GalleryOut,
    GallerySearchOut,
    Page,
    SearchHitOut,
    error_responses,
)
from service.api.uploads import IMAGE_UPLOAD_ERRORS, image_parts_body, receive_images
from service.core import galleries
from service.core.dataset_files import relative_path
from service.core.images import UploadedImage
from service.core.models import Gallery
from service.core.row_versions import OwnedRow
from service.core.settings import Settings

router = APIRouter(prefix="/v1/galleries", tags=["galleries"], responses=COMMON_ERRORS)

#: Most hits one search returns.
MAX_K = 1000

_QUERY_BODY = image_parts_body("image", "The query: a person crop (JPEG, PNG, BMP, WebP).")


def _out(gallery: Gallery) -> GalleryOut:
    return GalleryOut.model_validate(gallery)


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
    request = galleries.GalleryRequest(**body.model_dump())
    gallery = galleries.create_gallery(session, settings, owner, request)
    response.headers["Location"] = f"/v1/galleries/{gallery.id}"
    return _out(gallery)


@router.get("", summary="Your galleries, newest first")
def list_galleries(owner: CurrentOwner, session: SessionDep, paging: PageDep) -> Page[GalleryOut]:
    page = galleries.list_galleries(session, owner, paging.limit, paging.offset, paging.after)
    return Page[GalleryOut].of([_out(g) for g in page.rows], page, paging.limit, paging.offset)


# `:uuid`: only a UUID is a gallery id in a path (as for jobs: a malformed id is no route, 404).
@router.get(
    "/{gallery_id:uuid}",
    summary="One gallery: state, progress, counts (ETag; If-None-Match answers 304)",
    response_model=GalleryOut,
    responses={**NOT_MODIFIED, **error_responses(e404="Unknown gallery")},
)
async def get_gallery(
    gallery_id: uuid.UUID, owner: CurrentOwner, conditional: ConditionalGetDep
) -> Response:
    """As ``GET /v1/jobs/{id}``: with ``If-None-Match`` the version is looked at first (the
    row-version cache, else read alone)."""
    return await conditional.answer(OwnedRow(Gallery, gallery_id, owner), GalleryOut, _out)


@router.get(
    "/{gallery_id:uuid}/events",
    summary="The gallery's state changes, oldest first",
    responses=error_responses(e404="Unknown gallery"),
)
def list_gallery_events(
    gallery_id: uuid.UUID, owner: CurrentOwner, session: SessionDep
) -> list[GalleryEventOut]:
    """Each change with its reason: requested, building (and on which worker), READY, or
    FAILED with what went wrong (a build whose worker stopped heartbeating is failed by the
    reaper), retried."""
    events = galleries.gallery_events(session, owner, gallery_id)
    return [GalleryEventOut.model_validate(e) for e in events]


@router.delete(
    "/{gallery_id:uuid}",
    status_code=204,
    summary="Delete a gallery and its index (a build in progress is stopped)",
    responses=error_responses(e404="Unknown gallery"),
)
def delete_gallery(
    gallery_id: uuid.UUID, owner: CurrentOwner, session: SessionDep, settings: SettingsDep
) -> Response:
    galleries.delete_gallery(session, settings, owner, gallery_id)
    return Response(status_code=204)


@router.post(
    "/{gallery_id:uuid}/retry",
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
    return _out(galleries.retry_gallery(session, settings, owner, gallery_id))


def _search(
    settings: Settings, gallery: Gallery, query: UploadedImage, k: int, camera: int | None
) -> GallerySearchOut:
    hits = galleries.search(settings, gallery, query, k, camera)
    return GallerySearchOut(
        gallery_id=gallery.id,
        model_name=gallery.model_name,
        model_version=gallery.model_version,
        query=query.name,
        k=k,
        hits=[
            SearchHitOut(
                rank=rank,
                path=relative_path(hit.path, gallery.dataset_path),
                score=hit.score,
                camera_id=hit.camid if hit.camid >= 0 else None,
                person_id=hit.pid if hit.pid >= 0 else None,
                position=hit.position,
            )
            for rank, hit in enumerate(hits, start=1)
        ],
    )


@router.post(
    "/{gallery_id:uuid}/search",
    summary="The gallery images closest to a query image, best first",
    openapi_extra=_QUERY_BODY,
    responses=error_responses(
        **IMAGE_UPLOAD_ERRORS,
        e404="Unknown gallery",
        e409="The gallery is not READY",
        e413="The image is too large",
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
    gallery = await run_in_threadpool(galleries.owned_gallery, session, owner, gallery_id)
    galleries.require_ready(gallery)  # before reading the upload
    (query,) = await receive_images(request, "image", max_files=1)
    return await run_in_threadpool(_search, settings, gallery, query, k, camera)


@router.get(
    "/{gallery_id:uuid}/images/{position}",
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
    gallery = galleries.owned_gallery(session, owner, gallery_id)
    path, status = galleries.image_file(settings, gallery, position)
    return FileResponse(
        path,
        media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
        stat_result=status,
        headers={"X-Content-Type-Options": "nosniff"},
    )
