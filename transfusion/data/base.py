"""The record every data source yields, before tokenizing, encoding and pairing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Record:
    """One item of a dataset: an RGB image, a text, or both (an image-caption pair).

    ``meta`` carries what evaluation needs to check answers exactly (for the synthetic scenes: the
    scene description) and where the item came from (``{"source": "file.png"}``).
    """

    image: Image.Image | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
