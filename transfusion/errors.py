"""The one user-facing error type. A leaf: it imports nothing from the package."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment that they can fix: the command line prints it
    as one line, without a traceback. (``ValueError``, ``OSError`` and ``ModuleNotFoundError`` raised
    for bad input are printed the same way.)"""
