"""Errors a user can fix. The CLI prints them as one line (no traceback unless --debug)."""

import errno


class FinetuneError(Exception):
    """Base of every error that is the user's input, not a bug: printed as one line."""


class RecipeError(FinetuneError, ValueError):
    """A recipe or override is invalid: the message names the file, line and field."""


class DataError(FinetuneError, ValueError):
    """A dataset is invalid: the message names the file, line or record, and field."""


class OutputError(FinetuneError):
    """The output location cannot be used (exists and is finished, not writable, ...)."""


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 example`, `2 examples`, `1 process`, `3 processes` (pass `many` where adding an s is wrong)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def closest(word: str, candidates) -> str:
    """`; did you mean 'x'?` for the closest candidate, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


# What an OSError means, in words (file-system trouble: finetune.guards, finetune.locks)
CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent is not a directory",
    errno.EEXIST: "a file is in the way",
}


def os_error_message(e: OSError, path=None) -> str:
    """`cause (path)`, e.g. `read-only file system (/mnt/out)`."""
    cause = CAUSES.get(e.errno, e.strerror or str(e))
    where = e.filename or path
    return f"{cause} ({where})" if where else cause
