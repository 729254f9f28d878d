"""Receiving multipart uploads with hard limits: a dataset archive, or a few images.

Starlette's form parser spools files to the system temporary folder and does not bound them.
:func:`receive_multipart` writes the one file part (an archive) into the caller's scratch folder;
:func:`receive_images` keeps a few small file parts in memory; both stop reading as soon as the
body grows past its limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.api.errors import APIError
from service.core.images import MAX_EMBED_IMAGES, MAX_IMAGE_BYTES, UploadedImage

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_MAX_FIELDS = 16
_MAX_FIELD_BYTES = 4096


@dataclass
class ReceivedUpload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    file_field: str | None = None
    size: int = 0  # bytes of the file part


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        "upload_too_large",
        f"the upload is larger than the limit of {limit} bytes (REID_LIMITS__MAX_UPLOAD_BYTES); "
        "split the dataset or register it as a server folder",
    )


def _bad_form(message: str) -> APIError:
    return APIError(400, "bad_multipart", message)


class PartHeaderReader:
    """python-multipart callbacks that collect each part's ``Content-Disposition`` header into
    ``_disposition``; subclasses add the part's data handling (``on_part_begin``,
    ``on_headers_finished``, ``on_part_data``, ``on_part_end``, ``on_end``)."""

    def __init__(self) -> None:
        self.charset = "utf-8"
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition: bytes | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        raise NotImplementedError

    def on_headers_finished(self) -> None:
        raise NotImplementedError

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        raise NotImplementedError

    def on_part_end(self) -> None:
        raise NotImplementedError

    def on_end(self) -> None:
        self.ended = True


class _Receiver(PartHeaderReader):
    def __init__(self, dest: Path) -> None:
        super().__init__()
        self.dest = dest
        self.result = ReceivedUpload()
        self._out: BinaryIO | None = None
        self._name = ""
        self._data = bytearray()
        self._is_file = False

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def on_part_begin(self) -> None:
        self._disposition = None
        self._name = ""
        self._data = bytearray()
        self._is_file = False

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _bad_form('a multipart part has no Content-Disposition "name"')
        self._name = options[b"name"].decode(self.charset, errors="replace")
        if b"filename" in options:
            if self.result.filename is not None:
                raise _bad_form("send exactly one file (the archive) per upload")
            self._is_file = True
            self.result.filename = options[b"filename"].decode(self.charset, errors="replace")
            self.result.file_field = self._name
            self._out = self.dest.open("xb")
        elif len(self.result.fields) >= _MAX_FIELDS:
            raise _bad_form(f"too many form fields (at most {_MAX_FIELDS})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            assert self._out is not None
            self._out.write(data[start:end])
            self.result.size += end - start
            return
        self._data += data[start:end]
        if len(self._data) > _MAX_FIELD_BYTES:
            raise _bad_form(f"form field {self._name!r} is longer than {_MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._is_file:
            self.close()
        else:
            self.result.fields[self._name] = self._data.decode(self.charset, errors="replace")


def _invalid(field: str, message: str) -> RequestValidationError:
    """The body's ``field`` refused, as request validation refuses a JSON body's (one handler,
    one shape: :func:`service.api.errors.validation_details`)."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


class _ImageReceiver(PartHeaderReader):
    """python-multipart callbacks keeping the file parts named ``field`` in memory."""

    def __init__(self, field: str, max_files: int, max_file_bytes: int) -> None:
        super().__init__()
        self.field = field
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.images: list[UploadedImage] = []
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
                self._name,
                f"unexpected form field {self._name!r}: send the images as file parts named "
                f"`{self.field}`",
            )
        if b"filename" not in options:
            raise _invalid(
                self.field, f"`{self.field}` must be a file part (an image), not a text field"
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


async def _parse(
    request: Request, receiver: PartHeaderReader, max_bytes: int, too_large: Callable[[], APIError]
) -> None:
    """Feed the ``multipart/form-data`` body to ``receiver``: ``too_large()`` when the body (by
    Content-Length or as it streams) exceeds ``max_bytes``, 400 for a malformed or truncated one."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad_form("multipart/form-data without a boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large()
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    receiver.charset = charset if charset.lower() in ("utf-8", "utf8") else "utf-8"
    parser = MultipartParser(boundary, receiver.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise too_large()
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise _bad_form(f"malformed multipart body: {exc}") from None
    if not receiver.ended:
        raise _bad_form("the multipart body ended early (truncated upload?)")


async def receive_multipart(request: Request, dest: Path, max_bytes: int) -> ReceivedUpload:
    """Parse a ``multipart/form-data`` body: text fields in memory, the file part into ``dest``.

    Raises :class:`APIError` 413 when the body (by Content-Length or as it streams) exceeds
    ``max_bytes``, 400 for a malformed or truncated body. ``dest`` is left for the caller to
    delete.
    """
    receiver = _Receiver(dest)
    try:
        await _parse(request, receiver, max_bytes, lambda: _too_large(max_bytes))
    finally:
        receiver.close()
    return receiver.result


#: What :func:`receive_images` refuses besides too much (413, whose words depend on the route), as
#: ``error_responses`` arguments.
IMAGE_UPLOAD_ERRORS = {"e400": "Malformed multipart body", "e415": "Not multipart/form-data"}


def image_parts_body(field: str, description: str, *, max_files: int = 1) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that reads its images with :func:`receive_images`
    (``field``, ``max_files``): a multipart body of that file part alone, one file or a list."""
    part: dict[str, Any] = {"type": "string", "format": "binary"}
    if max_files > 1:
        # no part at all is refused (receive_images)
        part = {"type": "array", "items": part, "minItems": 1, "maxItems": max_files}
    schema = {
        "type": "object",
        "required": [field],
        "properties": {field: {**part, "description": description}},
        "additionalProperties": False,  # another field is refused (receive_images)
    }
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


async def receive_images(
    request: Request,
    field: str,
    *,
    max_files: int = MAX_EMBED_IMAGES,
    max_file_bytes: int = MAX_IMAGE_BYTES,
) -> list[UploadedImage]:
    """The file parts named ``field`` of a ``multipart/form-data`` request, in order.

    Refuses (APIError) a body that is not multipart (415), more than ``max_files`` files or a
    file above ``max_file_bytes`` (413, as soon as the stream shows it), a malformed or
    truncated body (400); another field or no file at all fail request validation (422).
    """
    content_type = request.headers.get("content-type", "")
    media, _ = parse_options_header(content_type)
    if media != b"multipart/form-data":
        raise APIError(
            415,
            "unsupported_media_type",
            f"unsupported Content-Type {content_type.split(';')[0] or '(none)'!r}: send "
            f"multipart/form-data with the image(s) as file parts named `{field}`",
        )
    max_body = max_files * (max_file_bytes + 1024) + 64 * 1024
    receiver = _ImageReceiver(field, max_files, max_file_bytes)
    await _parse(
        request,
        receiver,
        max_body,
        lambda: APIError(
            413,
            "body_too_large",
            f"the request is larger than {max_body} bytes: at most {max_files} images of "
            f"{max_file_bytes} bytes each",
        ),
    )
    if not receiver.images:
        raise _invalid(field, f"no image: send at least one file part named `{field}`")
    return receiver.images
