"""Output files that never clobber and never appear half-written.

Commands refuse to replace an existing output unless told to (``--force``), and reports, exports and
summaries are written to a temporary file beside their target and renamed into place, so a crash,
a full disk or an unencodable name leaves the old file (or none), never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (by any library); on success it is renamed to
    ``path`` (after an fsync with ``fsync=True``, for files that must survive a crash), on failure
    removed. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically; text that cannot be encoded leaves ``path`` as it was."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def refuse_existing(paths: Iterable[str | os.PathLike], force: bool, option: str = "--out") -> None:
    """Raise FileExistsError for the first of ``paths`` that exists, unless ``force`` (a command's ``--force``)."""
    if force:
        return
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists and is never replaced silently; choose another {option} or pass "
                                  "--force to replace it.")
