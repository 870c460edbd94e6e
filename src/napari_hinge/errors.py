"""The project's own errors: what a user's file can make the package raise.

:class:`InputError` is the one contract for bad input: every reader raises it (or a subclass,
e.g. :class:`napari_hinge.io.validate.SpatialDataError`) naming the file, the field and the
problem, before the data is used. It is a ``ValueError`` so that callers written against the
older ``ValueError`` keep working. The command line turns it (and ``OSError``) into one line.
"""

from __future__ import annotations

import errno
import os

__all__ = ["InputError", "disk_full_error", "is_disk_full", "positive_number"]


class InputError(ValueError):
    """Input that cannot be used as it is; the message names the file and the problem.

    Parameters
    ----------
    message
        The whole message (it starts with the file, as every message of the package does).
    path, field
        The file and the field or column at fault, for callers that want them apart.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.field = field

    @classmethod
    def at(cls, path: str | os.PathLike, problem: str, *, field: str | None = None):
        """``'<path>: <field>: <problem>'`` (the field part only when given)."""
        where = f"{os.fspath(path)}: {field}" if field else os.fspath(path)
        return cls(f"{where}: {problem}", path=path, field=field)


def positive_number(value, path: str | os.PathLike, field: str) -> float:
    """``value`` as a finite positive float, else an :class:`InputError` naming the field
    (bools and numeric strings are refused: a file that says ``"0.5"`` is not well formed)."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError.at(path, f"must be a number, got {value!r}", field=field)
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise InputError.at(path, f"must be a finite positive number, got {value!r}",
                            field=field)
    return v


_ENOSPC_TEXT = ("no space left on device", "os error 28", "errno = 28", "[errno 28]")


def is_disk_full(exc: BaseException) -> bool:
    """True for a full disk, also when a library (h5py, safetensors, zarr) reports it
    as text instead of an ``OSError`` with ``errno.ENOSPC``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(t in str(exc).lower() for t in _ENOSPC_TEXT)


def disk_full_error(path: str | os.PathLike) -> OSError:
    """The error every writer raises on a full disk (names the path)."""
    return OSError(errno.ENOSPC, "no space left on device; nothing was written to",
                   os.fspath(path))
