"""Receiving a multipart upload straight into a scratch file, with a hard limit on its size.

Starlette's form parser spools files to the system temporary folder and does not bound them; this
reader writes the one file part into the caller's scratch folder and stops reading as soon as the
body grows past ``max_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import APIError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["PartHeaderReader", "ReceivedUpload", "receive_multipart"]

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
        raise NotImplementedError


class _Receiver(PartHeaderReader):
    def __init__(self, dest: Path, charset: str) -> None:
        super().__init__()
        self.dest = dest
        self.charset = charset
        self.result = ReceivedUpload()
        self.ended = False
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

    def on_end(self) -> None:
        self.ended = True


async def receive_multipart(request: Request, dest: Path, max_bytes: int) -> ReceivedUpload:
    """Parse a ``multipart/form-data`` body: text fields in memory, the file part into ``dest``.

    Raises :class:`APIError` 413 when the body (by Content-Length or as it streams) exceeds
    ``max_bytes``, 400 for a malformed or truncated body. ``dest`` is left for the caller to
    delete.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad_form("multipart/form-data without a boundary")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    receiver = _Receiver(dest, charset if charset.lower() in ("utf-8", "utf8") else "utf-8")
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise _bad_form(f"malformed multipart body: {exc}") from None
    finally:
        receiver.close()
    if not receiver.ended:
        raise _bad_form("the multipart body ended early (truncated upload?)")
    return receiver.result
