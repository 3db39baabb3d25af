"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

from typing import Iterator


class KmnistError(Exception):
    """A problem the user can fix (bad option, bad file, missing data); never a bug."""

    exit_code = 2


class KmnistWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it on one line."""


class DataError(KmnistError):
    """A data file is missing, corrupted or malformed."""


class TrainingDiverged(KmnistError):
    """The loss became NaN or infinite."""

    exit_code = 3


class ImageError(KmnistError):
    """An input image that cannot be used; `kind` names why (empty, too_large, too_many_pixels, not_an_image, ...)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def interrupted(error: BaseException) -> bool:
    """Whether `error` is a stop (Ctrl-C, or `kill`, which raises KeyboardInterrupt) or was caused by one: a
    library cut off mid-import by it raises an ImportError of its own (matplotlib's backend does)."""
    return any(isinstance(link, KeyboardInterrupt) for link in exception_chain(error))


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it was raised from or while handling, and so on (each once)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
