"""Galleries: index a dataset's images with a registered model version, then search them.

:func:`create_gallery` checks the dataset and the model version (an alias is resolved to its
number), commits the gallery QUEUED and sends its id to the workers, which build the index
(:mod:`worker.gallery_task`); :func:`search` embeds a query image with the gallery's model and
answers its nearest gallery images, each with its ``position`` in the index, which
:func:`image_file` turns back into the image's file (for thumbnails). Another owner's gallery is
not found, as everywhere. States: :mod:`service.core.gallery_states`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from service.core.broker import send_gallery
from service.core.dataset_files import relative_path
from service.core.datasets import check_ready, gallery_images, owned_dataset
from service.core.errors import ConflictError, NotFoundError
from service.core.folders import gallery_dir
from service.core.gallery_states import GALLERIES, change_gallery_state, lock_gallery
from service.core.images import UploadedImage, decode_images
from service.core.jobs import check_limit, check_queue
from service.core.model_cache import cached_embedder, cached_index, forget_index
from service.core.models import Dataset, Gallery, GalleryEvent, GalleryState
from service.core.owned import Cursor, OwnedPage, owned, owned_page
from service.core.registry import ModelRegistry
from service.core.settings import Settings

if TYPE_CHECKING:
    from reid_core.inference.search import GalleryIndex, SearchHit

log = logging.getLogger("service.galleries")


@dataclass(frozen=True)
class GalleryRequest:
    dataset_id: uuid.UUID
    model_name: str
    model_version: str  # a number or an alias
    name: str | None = None
    gpus: int | None = None
    queue: str | None = None


def _send_to_workers(settings: Settings, session: Session, gallery: Gallery) -> None:
    """Publish the committed gallery to the broker; FAILED (with the broker's error) when it does
    not take it, so that nobody waits on a build that will never start."""
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
        log.warning("gallery %s: %s", gallery.id, reason)


def create_gallery(
    session: Session, settings: Settings, owner: str, request: GalleryRequest
) -> Gallery:
    """A new QUEUED gallery, committed and sent to the workers (queue ``cpu`` with ``gpus=0``,
    ``gpu1`` otherwise). A Market-layout dataset contributes its gallery split
    (``bounding_box_test``), an image folder every image."""
    dataset = owned_dataset(session, owner, request.dataset_id)
    check_ready(dataset)
    images = gallery_images(dataset)
    if images == 0:
        raise ConflictError("dataset_empty", f"dataset {dataset.id} has no readable image to index")
    bounds = settings.job_bounds
    gpus = min(1, bounds.gpus_or_default(request.gpus))
    check_limit("gpus", gpus, bounds.max_gpus)
    queue = check_queue(settings, request.queue)
    version = ModelRegistry(settings).get_version(owner, request.model_name, request.model_version)
    gallery = Gallery(
        id=uuid.uuid4(),
        owner=owner,
        name=request.name,
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
    alias = "" if request.model_version == version.version else f" ({request.model_version})"
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
    return gallery


def owned_gallery(session: Session, owner: str, gallery_id: uuid.UUID) -> Gallery:
    return owned(session, Gallery, owner, gallery_id, "gallery")


def list_galleries(
    session: Session, owner: str, limit: int, offset: int = 0, after: Cursor | None = None
) -> OwnedPage[Gallery]:
    """``owner``'s galleries, newest first, with their count. Only reads: a build whose worker
    died is turned FAILED by the reaper (``python -m worker dispatcher``)."""
    return owned_page(session, Gallery, owner, limit=limit, offset=offset, after=after)


def gallery_events(session: Session, owner: str, gallery_id: uuid.UUID) -> list[GalleryEvent]:
    """The gallery's state changes, oldest first."""
    return list(owned_gallery(session, owner, gallery_id).events)


def delete_gallery(session: Session, settings: Settings, owner: str, gallery_id: uuid.UUID) -> None:
    """Delete the gallery and its index; a running build notices the row is gone, stops and
    removes what it wrote."""
    gallery = GALLERIES.lock_owned(session, gallery_id, owner)
    session.delete(gallery)
    session.commit()
    folder = gallery_dir(settings, gallery_id)
    forget_index(folder)
    shutil.rmtree(folder, ignore_errors=True)


def retry_gallery(
    session: Session, settings: Settings, owner: str, gallery_id: uuid.UUID
) -> Gallery:
    """A FAILED gallery back to QUEUED with the same id, dataset, model version and queue, sent
    to the workers again. A builder that may still run for it (a worker that stopped
    heartbeating) is told to stop: the gallery is no longer its to build."""
    gallery = GALLERIES.lock_owned(session, gallery_id, owner)
    if gallery.state is not GalleryState.FAILED:
        raise ConflictError(
            "gallery_not_failed",
            f"gallery {gallery_id} is {gallery.state}: only a FAILED gallery can be retried",
        )
    dataset = None if gallery.dataset_id is None else session.get(Dataset, gallery.dataset_id)
    if dataset is None:
        raise ConflictError(
            "dataset_gone",
            f"the dataset of gallery {gallery_id} was deleted; create a gallery of another one",
        )
    check_ready(dataset)
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
    gallery.image_count = gallery_images(dataset)
    session.commit()  # a FAILED gallery was never READY: no index of it is cached
    if settings.worker.enqueue_on_submit:
        _send_to_workers(settings, session, gallery)
    return gallery


def require_ready(gallery: Gallery) -> None:
    """Refused unless ``gallery`` is READY: before that it has no index to read."""
    if gallery.state is not GalleryState.READY:
        raise ConflictError(
            "gallery_not_ready",
            f"gallery {gallery.id} is {gallery.state} ({gallery.reason}); use it once it is READY",
        )


def ready_index(settings: Settings, gallery: Gallery) -> GalleryIndex:
    """The READY gallery's index (read from disk on first use, then cached); refused when the
    gallery is not READY or its index files are gone."""
    require_ready(gallery)
    folder = gallery_dir(settings, gallery.id)
    try:
        return cached_index(folder)
    except FileNotFoundError:
        raise ConflictError(
            "gallery_index_missing",
            f"gallery {gallery.id} is READY but its index files are gone from the server; "
            "delete the gallery and create it again",
        ) from None


def search(
    settings: Settings, gallery: Gallery, query: UploadedImage, k: int, camera: int | None
) -> list[SearchHit]:
    """The ``k`` gallery images closest to ``query`` (cosine similarity), embedded by the
    gallery's model; ``camera`` picks the query's camera statistics for a camera_norm model."""
    index = ready_index(settings, gallery)
    embedder = cached_embedder(
        ModelRegistry(settings), gallery.owner, gallery.model_name, gallery.model_version
    )
    cameras = None if camera is None else [camera]
    features = embedder.embed_images(decode_images([query]), cameras=cameras)
    return index.search(features, k=k)[0]


def image_file(settings: Settings, gallery: Gallery, position: int) -> tuple[Path, os.stat_result]:
    """The file the gallery indexed at ``position`` (0 to the number of indexed images - 1), as
    the dataset's folder holds it now, and its ``stat``."""
    index = ready_index(settings, gallery)
    if position >= len(index):
        raise NotFoundError(
            "gallery_image_not_found",
            f"gallery {gallery.id} has no image at position {position}: it indexes "
            f"{len(index)} image(s), at positions 0 to {len(index) - 1}",
        )
    path = Path(index.records[position].path)
    try:
        status: os.stat_result | None = os.stat(path)
    except OSError:
        status = None
    if status is None or not stat.S_ISREG(status.st_mode):
        shown = relative_path(str(path), gallery.dataset_path)
        raise NotFoundError(
            "gallery_image_missing",
            f"gallery image {shown} (position {position}) is no longer on disk; the dataset's "
            "folder changed after the gallery was built",
        )
    return path, status
