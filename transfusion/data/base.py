"""The record every data source yields, before tokenizing, encoding and pairing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch import Tensor


@dataclass
class Record:
    """One item of a dataset: an RGB image, a text, or both (an image-caption pair); or an edit: the
    image, an instruction as ``text`` and the ``target`` the instruction makes of the image.

    ``meta`` carries what evaluation needs to check answers exactly (for the synthetic scenes: the
    scene description) and where the item came from (``{"source": "file.png"}``). An item of a
    pre-encoded dataset carries its image as ``latent`` (C, h, w), already through the VAE.
    """

    image: Image.Image | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    latent: Tensor | None = None
    target: Image.Image | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.latent is not None
