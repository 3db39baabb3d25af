"""Atomic file writes (write beside the target, then rename, so no reader ever sees half a file), which
failed writes are the machine's fault (a full disk, a read-only folder) rather than the code's, and safe
file names."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from kmnist.errors import exception_chain


def folder_safe(text: str) -> str:
    """`text` with every character a file or folder name should not hold (slashes, spaces, quotes, ...) as `_`."""
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_writer(path: str | Path, mode: str = "wb", exclusive: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path`, on any error it is removed.

    exclusive: `path` must not exist yet; if it does (another process got there first), FileExistsError and
    `path` is left as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        if exclusive:
            _link_new(temporary, path)
        else:
            os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        cause = os_error_in(error)
        if cause is None or cause.filename is not None:
            raise
        # A failed write names no file (and torch.save turns it into a RuntimeError): name the one being written.
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _link_new(temporary: str, path: Path) -> None:
    """Give the finished temporary file the name `path` only if that name is free, atomically."""
    try:
        os.link(temporary, path)  # fails with FileExistsError where the name is taken
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(temporary, path)


# Errors of the machine rather than of the request: a full disk or quota, a file-size limit, a read-only or
# failing file system, no permission.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES,
                            errno.EPERM})


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError with an errno that `error` is or was raised from (torch wraps failed writes in RuntimeError)."""
    return next((link for link in exception_chain(error) if isinstance(link, OSError) and link.errno is not None),
                None)


def machine_error(error: BaseException) -> OSError | None:
    """The OSError behind `error` if the machine, not the code, is at fault (full disk, read-only, ...)."""
    cause = os_error_in(error)
    return cause if cause is not None and cause.errno in MACHINE_ERRNOS else None
