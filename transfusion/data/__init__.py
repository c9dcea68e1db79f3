"""Datasets. Every source yields ``Record``s (an image, a text, or both, plus metadata);
``transfusion.data.pairing`` turns records into ``Sample``s following the paper's rules."""

from transfusion.data.base import Record

__all__ = ["Record"]
