"""Using trained models from the API: gallery states and files, uploaded images, cached models.

A **gallery** is a faiss index of a dataset's gallery images, embedded by one registered model
version (:class:`service.models.Gallery`). A Celery worker builds it (:mod:`worker.gallery_task`
supervises ``python -m worker.build_gallery``); the index is saved in :func:`gallery_dir` and read
back by the API, lazily, on the first search after a start. States::

    QUEUED -> BUILDING -> READY
       \\         \\-> FAILED (a reason: the model, the data, the builder's last error line)
        \\-> FAILED (the broker did not take it)
    BUILDING -> BUILDING    (a worker takes over a build whose worker stopped heartbeating)

Every change goes through :func:`change_gallery_state`, which keeps ``reason``, ``started_at``,
``finished_at`` and ``updated_at`` with the state.

The API keeps the last few embedders and gallery indexes in memory (:class:`LoadingLRU`, one
per process, thread-safe): a registered model version never changes, nor does a READY index, so
an entry is only dropped to make room, or when its gallery is deleted. torch, faiss and
reid_core are imported on first use, never when the API starts.
"""

from __future__ import annotations

import io
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request

from service.errors import APIError, not_found
from service.models import Gallery, GalleryState, utcnow
from service.schemas import ModelVersionOut
from service.settings import Settings
from service.uploads import PartHeaderReader

if TYPE_CHECKING:
    from reid_core.embedder import Embedder
    from reid_core.search import GalleryIndex
    from service.registry import ModelRegistry

__all__ = [
    "BUILD_LOG",
    "GALLERY_TRANSITIONS",
    "MAX_EMBED_IMAGES",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "InvalidGalleryTransitionError",
    "LoadingLRU",
    "UploadedImage",
    "cached_embedder",
    "cached_index",
    "change_gallery_state",
    "decode_images",
    "fail_if_stale",
    "forget_index",
    "gallery_dir",
    "lock_gallery",
    "model_ref",
    "receive_images",
    "resolve_version",
]

#: Images one embed request may carry, and the size of each (bytes, pixels).
MAX_EMBED_IMAGES = 32
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
#: Embedders and gallery indexes each API process keeps in memory.
EMBEDDER_CACHE_SIZE = 4
INDEX_CACHE_SIZE = 8

#: The builder's output (stdout and stderr) in the gallery's folder.
BUILD_LOG = "build.log"

# ----------------------------------------------------------------------------------------------
# where a gallery lives, what its features are
# ----------------------------------------------------------------------------------------------


def gallery_dir(settings: Settings, gallery_id: uuid.UUID) -> Path:
    """``<data_dir>/galleries/<id>/``: the index (``index.faiss``, ``gallery.json``) and the
    build log. The API and the workers share ``data_dir``, as they share ``jobs_dir``."""
    return settings.data_dir / "galleries" / str(gallery_id)


def resolve_version(
    registry: ModelRegistry, owner: str, name: str, version: str
) -> ModelVersionOut:
    """``owner``'s version ``version`` (a number or an alias) of model ``name``; 404 for a model,
    version or alias that does not exist (or is not the owner's)."""
    if not version.isdigit():
        aliases = registry.get_model(owner, name).aliases
        if version not in aliases:
            raise not_found("model version", f"{name}/{version}")
        version = aliases[version]
    return registry.get_version(owner, name, version)


def model_ref(model_name: str, model_version: str) -> str:
    """The name a gallery's features carry (:attr:`reid_core.search.GalleryIndex.model_ref`)."""
    return f"models:/{model_name}/{model_version}"


# ----------------------------------------------------------------------------------------------
# states
# ----------------------------------------------------------------------------------------------

G = GalleryState

#: Allowed changes: from-state (None: a gallery being created) -> the states it may go to.
GALLERY_TRANSITIONS: Mapping[GalleryState | None, frozenset[GalleryState]] = {
    None: frozenset({G.QUEUED}),
    G.QUEUED: frozenset({G.BUILDING, G.FAILED}),
    G.BUILDING: frozenset({G.BUILDING, G.READY, G.FAILED}),
    G.READY: frozenset(),
    G.FAILED: frozenset({G.QUEUED}),  # retried
}


class InvalidGalleryTransitionError(ValueError):
    """A state change :data:`GALLERY_TRANSITIONS` does not allow (someone else moved it first)."""

    def __init__(self, gallery_id: uuid.UUID | None, from_state: G | None, to_state: G) -> None:
        super().__init__(
            f"gallery {gallery_id} cannot go from {from_state or '(new)'} to {to_state}"
        )
        self.from_state = from_state
        self.to_state = to_state


def change_gallery_state(
    session: Session, gallery: Gallery, to_state: GalleryState, reason: str
) -> None:
    """Move ``gallery`` to ``to_state`` for ``reason``; the caller commits.

    Also sets ``started_at`` (each BUILDING), ``finished_at`` (READY, FAILED) and ``updated_at``.
    """
    from_state: GalleryState | None = (
        GalleryState(gallery.state) if gallery.state is not None else None
    )
    to_state = GalleryState(to_state)
    if to_state not in GALLERY_TRANSITIONS[from_state]:
        raise InvalidGalleryTransitionError(gallery.id, from_state, to_state)
    if not reason.strip():
        raise ValueError("a state change needs a reason")
    now = utcnow()
    gallery.state = to_state
    gallery.reason = reason
    gallery.updated_at = now
    if to_state is G.BUILDING:
        gallery.started_at = now
        gallery.finished_at = None
    elif to_state.is_final:
        gallery.finished_at = now
    if from_state is None:
        session.add(gallery)
    session.flush()


def lock_gallery(
    session: Session, gallery_id: uuid.UUID, owner: str | None = None
) -> Gallery | None:
    """Load a gallery for a change, its row locked (``FOR UPDATE``) where the database can;
    ``owner`` restricts the lookup to that owner's galleries (the API)."""
    query = select(Gallery).where(Gallery.id == gallery_id).with_for_update()
    if owner is not None:
        query = query.where(Gallery.owner == owner)
    return session.execute(query.execution_options(populate_existing=True)).scalar_one_or_none()


def fail_if_stale(session: Session, gallery: Gallery, timeout_s: float, now: datetime) -> bool:
    """FAILED (True) when ``gallery`` is BUILDING and nobody heartbeated it for ``timeout_s``:
    its worker and builder died with it. The caller commits."""
    if gallery.state is not G.BUILDING:
        return False
    last = gallery.heartbeat_at or gallery.updated_at
    if last is None or now - last < timedelta(seconds=timeout_s):
        return False
    change_gallery_state(
        session,
        gallery,
        G.FAILED,
        f"the build stopped: worker {gallery.worker_id or '?'} sent no heartbeat since "
        f"{last:%Y-%m-%d %H:%M:%S} UTC (more than {timeout_s:.0f} s); retry it (POST "
        f"/v1/galleries/{gallery.id}/retry)",
    )
    return True


# ----------------------------------------------------------------------------------------------
# uploaded images
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadedImage:
    """One file part of a multipart request: the client's file name and the bytes."""

    field: str
    index: int  # position among the request's files
    name: str
    data: bytes


def _invalid(field: str, message: str, value: Any = None) -> APIError:
    detail: dict[str, Any] = {"field": field, "message": message}
    if value is not None:
        detail["value"] = value
    return APIError(422, "validation_error", message, details=[detail])


class _ImageReceiver(PartHeaderReader):
    """python-multipart callbacks keeping the file parts named ``field`` in memory."""

    def __init__(self, field: str, charset: str, max_files: int, max_file_bytes: int) -> None:
        super().__init__()
        self.field = field
        self.charset = charset
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.images: list[UploadedImage] = []
        self.ended = False
        self._name = ""
        self._filename: str | None = None
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = None
        self._filename = None
        self._data = bytearray()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise APIError(
                400, "bad_multipart", 'a multipart part has no Content-Disposition "name"'
            )
        self._name = options[b"name"].decode(self.charset, errors="replace")
        if self._name != self.field:
            raise _invalid(
                f"body.{self._name}",
                f"unexpected form field {self._name!r}: send the images as file parts named "
                f"`{self.field}`",
            )
        if b"filename" not in options:
            raise _invalid(
                f"body.{self.field}",
                f"`{self.field}` must be a file part (an image), not a text field",
            )
        if len(self.images) >= self.max_files:
            raise APIError(
                413,
                "too_many_images",
                f"at most {self.max_files} images per request; send them in smaller batches",
            )
        self._filename = options[b"filename"].decode(self.charset, errors="replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if len(self._data) > self.max_file_bytes:
            raise APIError(
                413,
                "image_too_large",
                f"image {self._filename!r} is larger than {self.max_file_bytes} bytes; send "
                "person crops, not whole frames",
            )

    def on_part_end(self) -> None:
        assert self._filename is not None
        self.images.append(
            UploadedImage(self.field, len(self.images), self._filename, bytes(self._data))
        )

    def on_end(self) -> None:
        self.ended = True


async def receive_images(
    request: Request,
    field: str,
    *,
    max_files: int = MAX_EMBED_IMAGES,
    max_file_bytes: int = MAX_IMAGE_BYTES,
) -> list[UploadedImage]:
    """The file parts named ``field`` of a ``multipart/form-data`` request, in order.

    Refuses (APIError) a body that is not multipart (415), more than ``max_files`` files or a
    file above ``max_file_bytes`` (413, as soon as the stream shows it), another field or no
    file at all (422), a malformed or truncated body (400).
    """
    content_type = request.headers.get("content-type", "")
    media, params = parse_options_header(content_type)
    if media != b"multipart/form-data":
        raise APIError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {content_type.split(';')[0] or '(none)'!r}: send "
            f"multipart/form-data with the image(s) as file parts named `{field}`",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise APIError(400, "bad_multipart", "multipart/form-data without a boundary")
    max_body = max_files * (max_file_bytes + 1024) + 64 * 1024
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise APIError(
            413,
            "body_too_large",
            f"the request is larger than {max_body} bytes: at most {max_files} images of "
            f"{max_file_bytes} bytes each",
        )
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    receiver = _ImageReceiver(
        field,
        charset if charset.lower() in ("utf-8", "utf8") else "utf-8",
        max_files,
        max_file_bytes,
    )
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise APIError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    if not receiver.ended:
        raise APIError(400, "bad_multipart", "the multipart body ended early (truncated upload?)")
    if not receiver.images:
        raise APIError(
            422,
            "validation_error",
            f"no image: send at least one file part named `{field}`",
            details=[{"field": f"body.{field}", "message": "Field required"}],
        )
    return receiver.images


def _not_an_image(image: UploadedImage, why: BaseException | str) -> APIError:
    text = " ".join(str(why).split()) or type(why).__name__
    return _invalid(
        f"body.{image.field}[{image.index}]",
        f"{image.name!r} is not an image this service can read ({text}); send JPEG, PNG, BMP "
        "or WebP person crops",
        image.name,
    )


def _open(image: UploadedImage) -> Image.Image:
    try:
        opened = Image.open(io.BytesIO(image.data))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _not_an_image(image, exc) from None
    width, height = opened.size
    if width * height > MAX_IMAGE_PIXELS:
        raise _invalid(
            f"body.{image.field}[{image.index}]",
            f"{image.name!r} has {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}; send "
            "person crops, not whole frames",
            image.name,
        )
    return opened


def decode_images(images: list[UploadedImage]) -> Iterator[Image.Image]:
    """Check every upload is an image (its header: 422 naming the first that is not), then yield
    them decoded, one at a time (a file whose data turns out broken is a 422 naming it)."""
    for image in images:
        _open(image).close()

    def decode() -> Iterator[Image.Image]:
        for image in images:
            with _open(image) as opened:
                try:
                    opened.load()
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    raise _not_an_image(image, exc) from None
                yield opened.convert("RGB")

    return decode()


# ----------------------------------------------------------------------------------------------
# cached models and indexes
# ----------------------------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


class LoadingLRU(Generic[K, V]):
    """A small least-recently-used cache that loads missing values, thread-safe.

    Two threads asking for the same missing key load it once (the second waits for the first);
    threads asking for different keys load in parallel. A load that raises caches nothing.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, threading.Lock] = {}
        self._lock = threading.Lock()

    def _get(self, key: K) -> tuple[bool, V | None]:
        if key in self._items:
            self._items.move_to_end(key)
            return True, self._items[key]
        return False, None

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        """The value of ``key``, calling ``load()`` (outside the cache's lock) when missing."""
        with self._lock:
            found, value = self._get(key)
            if found:
                return value  # type: ignore[return-value]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                found, value = self._get(key)
                if found:  # loaded by another thread while this one waited
                    return value  # type: ignore[return-value]
            try:
                loaded = load()
                with self._lock:
                    self._items[key] = loaded
                    while len(self._items) > self.capacity:
                        self._items.popitem(last=False)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            return loaded

    def discard(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


_EMBEDDERS: LoadingLRU[tuple[str, str, str], Embedder] = LoadingLRU(EMBEDDER_CACHE_SIZE)
_INDEXES: LoadingLRU[str, GalleryIndex] = LoadingLRU(INDEX_CACHE_SIZE)


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cached_embedder(registry: ModelRegistry, owner: str, name: str, version: str) -> Embedder:
    """The embedder of model ``name`` version ``version`` (a number the caller resolved and
    checked ``owner`` may use), from ``model_final.pt`` (tensors and config, no pickle).

    Keyed by the MLflow tracking URI, the name and the number: a registered version never
    changes. On a GPU when torch sees one.
    """
    import shutil

    key = (registry.settings.mlflow_tracking_uri, name, version)

    def load() -> Embedder:
        from reid_core.embedder import Embedder

        path, folder = registry.download_weights(owner, name, version)
        try:
            return Embedder.from_file(path).to(_device())
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return _EMBEDDERS.get_or_load(key, load)


def cached_index(folder: Path) -> GalleryIndex:
    """The gallery index saved in ``folder`` (read on first use, then kept)."""

    def load() -> GalleryIndex:
        from reid_core.search import GalleryIndex

        return GalleryIndex.load(folder)

    return _INDEXES.get_or_load(str(folder), load)


def forget_index(folder: Path) -> None:
    """Drop a deleted gallery's index from this process's cache."""
    _INDEXES.discard(str(folder))
