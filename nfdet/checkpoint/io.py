"""Checkpoint files on disk, for both trainers and the weight converter: checked reading
(``torch.load`` with ``weights_only=True`` after a completeness check) and crash-safe writing
(a temporary file beside the destination, fsynced, then renamed onto it).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import torch

__all__ = [
    "CheckpointFormatError",
    "load_torch_checkpoint",
    "atomic_write",
    "save_checkpoint",
    "write_text_atomic",
]


class CheckpointFormatError(ValueError):
    """A source file or state dict that cannot be converted or read (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def load_torch_checkpoint(path: str) -> Any:
    """``torch.load`` a checkpoint on CPU (``weights_only=True``) after checking it is complete.

    A ``torch.save`` file is a zip archive whose entries carry CRC32 checksums: a truncated file
    (no central directory) and damaged bytes (a failing checksum) are reported by name instead of
    surfacing as torch's "Invalid argument" or, worse, loading silently altered tensors.

    Args:
        path (str): the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFormatError: empty, truncated, corrupted or unreadable (the message names the
            file and what is wrong).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFormatError(f"{path}: empty checkpoint file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        _check_zip_archive(path, size)
    return _torch_load(path)


def _check_zip_archive(path: str, size: int) -> None:
    """Raise ``CheckpointFormatError`` unless the zip archive at ``path`` is complete and every
    entry passes its CRC32 check."""
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path}: truncated or corrupted checkpoint ({size} bytes): the end of its zip "
            "archive (central directory) is missing or damaged"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: corrupted checkpoint ({e})") from e
    if bad is not None:
        raise CheckpointFormatError(
            f"{path}: corrupted checkpoint: entry {bad!r} fails its CRC32 check"
        )


def _torch_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, its failures named as
    ``CheckpointFormatError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointFormatError(
                f"{path}: the torch checkpoint holds non-tensor objects that weights_only loading "
                "refuses; save just the state dict (torch.save(model.state_dict(), ...))"
            ) from e
        raise CheckpointFormatError(f"{path}: cannot unpickle the torch file ({e})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"{path}: cannot read the torch file (truncated or corrupted?): {e}"
        ) from e


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is
    flushed, fsynced and renamed onto ``path``.

    Readers (and a process killed at any moment, even with SIGKILL) see either the old complete
    file or the new complete file, never a partial one. A failure leaves ``path`` untouched and
    removes the temporary file; a temporary file left by a killed writer of the same ``path`` is
    removed by the next successful write.

    Args:
        path (str): the destination.
        write (callable): writes the content into the binary file object it is given.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = ".tmp-" + os.path.basename(path) + "-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the mode open() would (0666 - umask).
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    _remove_stale_temporaries(directory, prefix)


def _current_umask() -> int:
    # Linux reports it without changing it; elsewhere it is read by setting it (briefly, so a
    # file another thread creates in that moment would get the full mode).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(directory: str, prefix: str) -> None:
    """Remove the temporary files a writer killed mid-write left in ``directory``."""
    for name in os.listdir(directory):
        if name.startswith(prefix):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def save_checkpoint(checkpoint: Mapping[str, Any], path: str) -> None:
    """``torch.save`` atomically (see ``atomic_write``): a temporary file beside ``path``,
    fsynced, then renamed. A failure or a kill leaves any existing ``path`` untouched."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def write_text_atomic(path: str, text: str) -> None:
    """Replace a small text file (e.g. a ``last_checkpoint`` pointer) atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
