"""Datasets: a server folder under a configured root, or an uploaded archive, scanned once.

The folder is scanned when it is registered (:mod:`service.core.dataset_files`): a Market-1501
layout when it has ``bounding_box_train/``, else an unlabeled image folder; counts and unreadable
files are stored on the dataset. An archive is checked before it is extracted
(:mod:`service.core.archives`) and its files are deleted with the dataset; a server folder is
left alone.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.archives import ArchiveError, ArchiveLimits, extract_archive
from service.core.dataset_files import (
    DatasetFolderError,
    ScanResult,
    resolve_registered_path,
    scan_dataset_folder,
    single_top_folder,
)
from service.core.errors import (
    ConflictError,
    RejectedInputError,
    TooLargeError,
    not_found,
)
from service.core.job_states import FINAL_STATES
from service.core.models import Dataset, DatasetKind, DatasetStatus, Gallery, Job
from service.core.owned import Cursor, OwnedPage, owned, owned_page
from service.core.settings import Settings

_SCRATCH = ".scratch"


def check_ready(dataset: Dataset) -> None:
    """Refused unless ``dataset`` is READY: a job or a build reads its files."""
    if dataset.status is not DatasetStatus.READY:
        raise ConflictError("dataset_not_ready", f"dataset {dataset.id} is {dataset.status}")


def train_images(dataset: Dataset) -> int:
    """Training images of a dataset: its train split when it has one, else all its images."""
    train = (dataset.splits or {}).get("train", {}).get("images")
    return int(train) if train else int(dataset.image_count or 0)


def gallery_images(dataset: Dataset) -> int:
    """Images a gallery of it indexes, from the scan: the gallery split of a labelled dataset
    (bounding_box_test), else every image."""
    splits = dataset.splits or {}
    gallery = int((splits.get("gallery") or {}).get("images", 0))
    return gallery if gallery else int((splits.get("train") or {}).get("images", 0))


def _name_taken(name: str) -> ConflictError:
    return ConflictError(
        "dataset_name_taken", f"you already have a dataset named {name!r}; pick another name"
    )


def _ensure_name_free(session: Session, owner: str, name: str) -> None:
    taken = session.execute(
        select(Dataset.id).where(Dataset.owner == owner, Dataset.name == name)
    ).first()
    if taken is not None:
        raise _name_taken(name)


def _scan(root: Path, shown: str | None = None) -> ScanResult:
    try:
        return scan_dataset_folder(root, shown)
    except DatasetFolderError as exc:
        raise RejectedInputError("invalid_dataset", str(exc)) from None


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


def _save(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise _name_taken(dataset.name) from None
    return dataset


def register_path(
    session: Session, settings: Settings, owner: str, name: str, path: str
) -> Dataset:
    """The server folder ``path`` (under one of ``settings.dataset_roots``) as ``owner``'s
    dataset ``name``."""
    _ensure_name_free(session, owner, name)
    try:
        root = resolve_registered_path(path, settings.dataset_roots)
    except DatasetFolderError as exc:
        raise RejectedInputError("invalid_dataset_path", str(exc)) from None
    scan = _scan(root)
    return _save(session, _new_dataset(owner, name, DatasetKind.PATH, scan, path=str(root)))


#: How errors name an upload's extracted folder: the client knows its archive, not our folders.
_ARCHIVE = "<archive>"


def _in_archive(inner: Path) -> str:
    """The folder ``inner`` (relative to the extracted archive) as errors name it."""
    return _ARCHIVE if inner == Path() else f"{_ARCHIVE}/{inner.as_posix()}"


def upload_scratch(settings: Settings) -> Path:
    """A new folder for one upload's archive (``<work>/archive``) and its extraction, inside
    ``upload_dir`` (the extracted folder is moved, not copied); the caller removes it."""
    work = settings.upload_path / _SCRATCH / uuid.uuid4().hex
    work.mkdir(parents=True)
    return work


def register_upload(
    session: Session, settings: Settings, owner: str, name: str, work: Path
) -> Dataset:
    """The archive ``<work>/archive`` (see :func:`upload_scratch`), checked and extracted, as
    ``owner``'s dataset ``name``."""
    _ensure_name_free(session, owner, name)
    limits = ArchiveLimits(
        max_files=settings.limits.max_archive_files,
        max_uncompressed_bytes=settings.limits.max_uncompressed_bytes,
    )
    extracted = work / "data"
    try:
        summary = extract_archive(work / "archive", extracted, limits)
    except ArchiveError as exc:
        refusal = TooLargeError if exc.status == 413 else RejectedInputError
        raise refusal(exc.code, exc.message) from None
    (work / "archive").unlink()
    inner = single_top_folder(extracted).relative_to(extracted)
    scan = _scan(extracted / inner, shown=_in_archive(inner))
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


def list_datasets(
    session: Session, owner: str, limit: int, offset: int = 0, after: Cursor | None = None
) -> OwnedPage[Dataset]:
    """``owner``'s datasets, newest first, with their count."""
    return owned_page(session, Dataset, owner, limit=limit, offset=offset, after=after)


def owned_dataset(session: Session, owner: str, dataset_id: uuid.UUID) -> Dataset:
    return owned(session, Dataset, owner, dataset_id, "dataset")


def delete_dataset(session: Session, settings: Settings, owner: str, dataset_id: uuid.UUID) -> None:
    """Delete the dataset (an upload's files too); refused while an unfinished job uses it."""
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
        raise ConflictError(
            "dataset_in_use",
            f"dataset {dataset_id} is used by {len(active)} unfinished job(s) (e.g. job "
            f"{job_id}, {state}); cancel them or wait for them to finish",
        )
    kind = dataset.kind
    # The foreign keys would set dataset_id to NULL on their own, without a version bump: an
    # ETag a dashboard holds would then still match a changed job or gallery. Detach them here.
    for model in (Job, Gallery):
        session.execute(
            update(model)
            .where(model.dataset_id == dataset.id)
            .values(dataset_id=None)
            .execution_options(synchronize_session=False)
        )
    session.delete(dataset)
    session.commit()
    if kind is DatasetKind.UPLOAD:
        folder = settings.upload_path / str(dataset_id)
        if folder.resolve().is_relative_to(settings.upload_path.resolve()):
            shutil.rmtree(folder, ignore_errors=True)
