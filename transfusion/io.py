"""Files written so that a crash never leaves half of one behind. A leaf: it imports nothing from the
package.

Every writer goes to a temporary name beside the target and renames it into place (``os.replace`` is
atomic on one filesystem): a reader sees the old file or the new one, never a mix. Directories are
built under a temporary sibling and renamed the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, flushed to disk, then renamed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Let ``write(tmp_path)`` produce the file (a library that wants a path: safetensors, torch.save,
    tokenizers), then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file written atomically (with ``metadata`` in its header); shared storage (tied
    weights) is cloned apart first."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    atomic_write_with(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is a ``ValueError`` that names it."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to fill; on success it replaces ``path`` whole
    (an older ``path`` is removed first), on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def copy_dir_atomic(src: str | Path, dst: str | Path) -> None:
    """Copy a directory into place via a temporary sibling and a rename."""
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def output_directory(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a directory to write into, checked before any work starts: an existing file there,
    or a place this process cannot write (tried with an empty temporary directory, removed at once),
    is an error naming ``flag``. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-check-"))
    except OSError as e:
        raise ValueError(
            f"{flag} {path} cannot be written ({e.strerror or e}); choose another place"
        ) from None
    return path
