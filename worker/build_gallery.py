"""``python -m worker.build_gallery <gallery id>``: the builder of one gallery (torch runs here).

:func:`build_gallery` does the work and records it in the database, so that the supervising
Celery task (:mod:`worker.gallery_task`, no torch) only starts it, heartbeats and watches:

1. downloads the model version's ``model_final.pt`` from the registry (as its owner) and loads
   it as an :class:`~reid_core.inference.embedder.Embedder` (no pickle), on the GPU when torch sees one;
2. reads the dataset with reid_core's registry: the gallery split of a Market-layout dataset
   (``bounding_box_test``), every image of an image folder; unreadable images are left out and
   counted (``skipped_count``), as the dataset scan counted them;
3. embeds them with :meth:`GalleryIndex.build <reid_core.inference.search.GalleryIndex.build>`, writing
   ``progress``, ``images_done`` and a heartbeat to the gallery's row at most every
   ``progress_interval_s``; a row that disappeared (the gallery was deleted) stops the build and
   its folder is removed;
4. saves the index in ``<data_dir>/galleries/<id>/`` and marks the gallery READY, or FAILED with
   the reason (a missing model, an unreadable dataset, ...).

Exit codes: 0 READY (or deleted meanwhile), 1 FAILED with a reason recorded; anything else is a
crash the supervisor records with the log's last error line.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from reid_core.engine.exit_codes import exit_process
from service.core.db import make_engine, make_session_factory, session_scope
from service.core.errors import ServiceError
from service.core.folders import gallery_dir
from service.core.gallery_states import change_gallery_state, lock_gallery
from service.core.model_cache import load_embedder
from service.core.models import Gallery, GalleryState, utcnow
from service.core.registry import ModelRegistry, model_uri
from service.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from reid_core.data import ImageRecord
    from reid_core.inference.search import GalleryIndex

log = logging.getLogger("worker.build_gallery")

#: Exit codes of ``python -m worker.build_gallery``.
EXIT_OK = 0
EXIT_FAILED = 1


class GalleryGoneError(Exception):
    """The gallery's row was deleted while it was being built."""


@dataclass(frozen=True)
class _Spec:
    """What the builder needs of the gallery's row (read once, when it starts)."""

    gallery_id: uuid.UUID
    owner: str
    model_name: str
    model_version: str
    dataset_format: str
    dataset_path: Path


def gallery_records(
    dataset_format: str, root: Path
) -> tuple[list[ImageRecord], list[tuple[Path, str]]]:
    """``(records, skipped)``: the images a gallery of this dataset indexes, readable ones only,
    and the unreadable ones with the reason.

    The gallery split of a dataset that has one (Market layout: ``bounding_box_test``, junk
    images dropped, distractors kept), else every image (an image folder). Raises
    :class:`~reid_core.data.DatasetError` when the folder cannot be read or holds no readable
    image.
    """
    from reid_core.data import DatasetError, build_dataset, scan_images

    splits = build_dataset(dataset_format, root)
    records = splits.gallery or splits.train
    good, bad = scan_images(records, max_bad_fraction=1.0, logger=log, split="gallery")
    if not good:
        raise DatasetError(f"dataset folder {root} holds no readable image to index")
    return good, bad


class _Progress:
    """``progress(done, total)`` for :meth:`GalleryIndex.build`: the row's progress and heartbeat,
    written at most every ``interval_s`` (and at the end)."""

    def __init__(
        self, factory: sessionmaker[Session], gallery_id: uuid.UUID, interval_s: float
    ) -> None:
        self.factory = factory
        self.gallery_id = gallery_id
        self.interval_s = interval_s
        self._last = time.monotonic()

    def write(self, **values: object) -> None:
        with session_scope(self.factory) as session:
            result = session.execute(
                update(Gallery)
                .where(Gallery.id == self.gallery_id, Gallery.state == GalleryState.BUILDING)
                .values(heartbeat_at=utcnow(), **values)
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0) != 1:
                raise GalleryGoneError(f"gallery {self.gallery_id} was deleted or stopped")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.interval_s:
            return
        self._last = now
        # Progress stops short of 1 until the index is saved.
        self.write(images_done=done, progress=min(0.99, done / max(1, total)))


def _start(factory: sessionmaker[Session], gallery_id: uuid.UUID) -> _Spec | str:
    """The gallery's spec once it is BUILDING (a QUEUED one is moved there: nobody supervises an
    in-process build), or a word on why there is nothing to build."""
    with session_scope(factory) as session:
        gallery = lock_gallery(session, gallery_id)
        if gallery is None:
            return "no such gallery"
        if gallery.state is GalleryState.QUEUED:
            change_gallery_state(session, gallery, GalleryState.BUILDING, "building in-process")
            gallery.heartbeat_at = utcnow()
        if gallery.state is not GalleryState.BUILDING:
            return f"already {gallery.state}"
        return _Spec(
            gallery_id=gallery.id,
            owner=gallery.owner,
            model_name=gallery.model_name,
            model_version=gallery.model_version,
            dataset_format=gallery.dataset_format,
            dataset_path=Path(gallery.dataset_path),
        )


def _finish(
    factory: sessionmaker[Session],
    gallery_id: uuid.UUID,
    state: GalleryState,
    reason: str,
    **values: object,
) -> None:
    with session_scope(factory) as session:
        gallery = lock_gallery(session, gallery_id)
        if gallery is None:
            raise GalleryGoneError(f"gallery {gallery_id} was deleted")
        if gallery.state is not GalleryState.BUILDING:
            log.warning("gallery %s is %s now; leaving it (%s)", gallery_id, gallery.state, reason)
            return
        for name, value in values.items():
            setattr(gallery, name, value)
        change_gallery_state(session, gallery, state, reason)


def _why(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, ServiceError) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def build_gallery(
    settings: Settings,
    factory: sessionmaker[Session],
    gallery_id: uuid.UUID,
    *,
    batch_size: int = 64,
    progress_interval_s: float = 1.0,
) -> GalleryState | None:
    """Build gallery ``gallery_id`` (see the module) and record the outcome; returns its final
    state, or None when there was nothing to build (unknown, deleted meanwhile, already final)."""
    spec = _start(factory, gallery_id)
    if isinstance(spec, str):
        log.info("gallery %s: %s; nothing to build", gallery_id, spec)
        return None
    folder = gallery_dir(settings, gallery_id)
    progress = _Progress(factory, gallery_id, progress_interval_s)
    try:
        index, skipped = _build(settings, spec, folder, progress, batch_size)
        reason = f"{len(index)} images indexed ({index.feature_dim}-d features)"
        if skipped:
            reason += f"; {len(skipped)} unreadable image(s) left out"
        _finish(
            factory,
            gallery_id,
            GalleryState.READY,
            reason,
            progress=1.0,
            images_done=len(index),
            image_count=len(index),
            skipped_count=len(skipped),
            feature_dim=index.feature_dim,
        )
    except GalleryGoneError:
        log.info("gallery %s was deleted during its build: stopped, files removed", gallery_id)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    except Exception as exc:
        log.exception("gallery %s: the build failed", gallery_id)
        try:
            _finish(factory, gallery_id, GalleryState.FAILED, f"the build failed: {_why(exc)}")
        except GalleryGoneError:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return GalleryState.FAILED
    log.info("gallery %s READY: %s", gallery_id, reason)
    return GalleryState.READY


def _build(
    settings: Settings, spec: _Spec, folder: Path, progress: _Progress, batch_size: int
) -> tuple[GalleryIndex, list[tuple[Path, str]]]:
    from reid_core.inference.search import GalleryIndex

    registry = ModelRegistry(settings)
    embedder = load_embedder(registry, spec.owner, spec.model_name, spec.model_version)
    device = embedder.device
    records, skipped = gallery_records(spec.dataset_format, spec.dataset_path)
    progress.write(image_count=len(records), skipped_count=len(skipped), images_done=0)
    log.info(
        "gallery %s: embedding %d images of %s with %s/%s on %s",
        spec.gallery_id,
        len(records),
        spec.dataset_path,
        spec.model_name,
        spec.model_version,
        device,
    )
    index = GalleryIndex.build(
        embedder,
        records,
        model_ref=model_uri(spec.model_name, spec.model_version),
        batch_size=batch_size,
        num_workers=0 if device.type == "cpu" else min(4, os.cpu_count() or 1),
        progress=progress,
    )
    progress.write(images_done=len(records), progress=0.99)  # the row is still there
    index.save(folder)
    return index, skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.build_gallery",
        description="Build one gallery's index (settings: REID_* variables, as the worker's).",
    )
    parser.add_argument("gallery_id", type=uuid.UUID)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    engine = make_engine(settings.database_url)
    try:
        state = build_gallery(
            settings, make_session_factory(engine), args.gallery_id, batch_size=args.batch_size
        )
    finally:
        engine.dispose()
    return EXIT_FAILED if state is GalleryState.FAILED else EXIT_OK


if __name__ == "__main__":
    exit_process(main())
