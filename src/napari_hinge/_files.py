"""Writing files and folders so that a crash, a kill or a full disk never leaves a partial
one where a good one was (torch-free, so readers and caches can use it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path

from napari_hinge.errors import disk_full_error, is_disk_full

__all__ = ["atomic_write", "atomic_write_dir", "replace_dir"]


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash, a cancel or a full disk
    never leaves a truncated file where a good one was, nor a stray temporary file.

    Raises
    ------
    OSError
        ``errno.ENOSPC`` naming ``path`` ("no space left on device") when the disk is full,
        whatever the library doing the writing reported.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):  # h5py/safetensors say it in words: one clear error instead
            raise disk_full_error(path) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_dir(directory: str | os.PathLike, write) -> Path:
    """The folder twin of :func:`atomic_write`: ``write(tmp_dir)`` fills a temporary folder
    beside ``directory``, which :func:`replace_dir` then swaps in; a full disk raises
    ``errno.ENOSPC`` naming ``directory``, and no temporary folder is left."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp",
                                dir=directory.parent))
    try:
        write(tmp)
        replace_dir(tmp, directory)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(directory) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the finished folder ``src`` onto ``dst``.

    Where the system can swap two paths atomically (Linux), a complete folder, old or new, is
    at ``dst`` at every moment, so a kill never leaves the path without a loadable model.
    Elsewhere the old folder is moved aside first (a kill in that instant leaves it beside
    ``dst`` as ``.<name>.old-<pid>``).
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return dst
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
        return dst
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
