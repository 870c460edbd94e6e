"""Where derived data (slide pyramids, encoder features) is cached.

``$NAPARI_HINGE_CACHE`` when set, else the platform user cache folder
(``~/.cache/napari-hinge`` on Linux). Entries are keyed by file content, so a
moved or renamed file still hits the cache and an edited one never does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """Return (and create) the cache folder for one kind of entry, e.g. 'pyramids'."""
    root = os.environ.get("NAPARI_HINGE_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) / "napari-hinge" if xdg else Path.home() / ".cache" / "napari-hinge"
    path = base / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_digest(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """A content key for a file: sha256 of its size, first and last MiB.

    Hashing whole slides (GBs) would defeat the point of a cache; size plus the
    head and tail (where TIFF/JPEG headers and index tables live) changes with any edit
    in practice.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:24]
