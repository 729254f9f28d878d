"""Uploaded images: checked to be images of a bounded size, then decoded one at a time (PIL).

The API receives the files (:func:`service.api.uploads.receive_images`); this module judges what
they hold. Errors name the file by its field and position among the request's files.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from service.core.errors import InvalidInputError

#: Images one embed request may carry, and the size of each (bytes, pixels).
MAX_EMBED_IMAGES = 32
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class UploadedImage:
    """One file part of a multipart request: the client's file name and the bytes."""

    field: str
    index: int  # position among the request's files
    name: str
    data: bytes

    @property
    def where(self) -> str:
        return f"{self.field}[{self.index}]"


def _not_an_image(image: UploadedImage, why: BaseException | str) -> InvalidInputError:
    text = " ".join(str(why).split()) or type(why).__name__
    return InvalidInputError(
        f"{image.name!r} is not an image this service can read ({text}); send JPEG, PNG, BMP "
        "or WebP person crops",
        image.where,
        image.name,
    )


def _open(image: UploadedImage) -> Image.Image:
    try:
        opened = Image.open(io.BytesIO(image.data))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _not_an_image(image, exc) from None
    width, height = opened.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidInputError(
            f"{image.name!r} has {width}x{height} pixels, more than {MAX_IMAGE_PIXELS}; send "
            "person crops, not whole frames",
            image.where,
            image.name,
        )
    return opened


def decode_images(images: list[UploadedImage]) -> Iterator[Image.Image]:
    """Check every upload is an image (its header: :class:`InvalidInputError` naming the first
    that is not), then yield them decoded, one at a time (a file whose data turns out broken is
    refused the same way, naming it)."""
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
