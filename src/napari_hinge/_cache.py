"""Where derived data (slide pyramids, encoder features) is cached.

``$NAPARI_HINGE_CACHE`` when set, else the platform user cache folder
(``~/.cache/napari-hinge`` on Linux). Entries are keyed by file content (a hash of every
byte), so a moved or renamed file still hits the cache and an edited one never does.
"""

from __future__ import annotations

import contextlib
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


def file_digest(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """A content key for a file: blake2b of all its bytes.

    Any edit changes it, also one in the middle that keeps the size (a sample of the head and
    tail does not see those, and a stale pyramid would then show the old pixels). The digest
    is remembered under ``cache_dir('digests')`` per (path, size, mtime, inode), so a file is
    read through once until it changes (about 1 s per GB); moved or copied files hash again
    and find the same entries.
    """
    path = Path(path)
    st = path.stat()
    stamp = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}"
    memo = cache_dir("digests") / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    try:
        known = memo.read_text().strip()
    except OSError:
        known = ""
    if len(known) == 24:
        return known
    h = hashlib.blake2b(str(st.st_size).encode(), digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()[:24]
    with contextlib.suppress(OSError):  # a read-only cache only costs the next hash
        from napari_hinge._files import atomic_write

        atomic_write(memo, lambda tmp: Path(tmp).write_text(digest))
    return digest
