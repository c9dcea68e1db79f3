"""Uploaded images read safely: the pixel count checked from the header before anything is decoded
(a 12000 x 12000 PNG of a few kilobytes would otherwise become 430 MB of pixels, more once converted),
anything Pillow cannot read refused, and other sizes resized to the model's with a note. Uploads are
read from memory and never written to disk."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 16_000_000
"""Pixels an uploaded image may have (a 4,000 x 4,000 photo)."""


class BadImage(ValueError):
    """An upload that is not an image the server reads; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def read_upload(
    data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image"
) -> tuple[Image.Image, str | None]:
    """(an RGB ``size`` x ``size`` image, a note when it was resized or None)."""
    if not data:
        raise BadImage(f"{name} is empty")
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the pixel count is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise BadImage(f"{name} is too large ({' '.join(str(e).split())[:120]})", status=413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadImage(f"{name} is not an image this server reads (PNG, JPEG, WebP, ...)") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage(f"{name} is {w}x{h} ({w * h:,} pixels); the limit is {max_pixels:,}", status=413)
    if w < 1 or h < 1:
        raise BadImage(f"{name} has no pixels ({w}x{h})")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{name} could not be decoded ({' '.join(str(e).split())[:120]})") from None
    im = im.convert("RGB")
    if im.size == (size, size):
        return im, None
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    note = f"{name} was {w}x{h}; resized and centre-cropped to {size}x{size}"
    return im.crop((left, top, left + size, top + size)), note
