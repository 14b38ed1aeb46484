"""The one exception type that kdlight shows to a user as a single line."""

import errno

#: What a full, read-only or over-quota disk raises: the machine's state, not a bug, so it
#: is said in one line (which file, why) rather than as a traceback.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class KDLightError(ValueError):
    """Bad input found before work starts: the message says what is wrong and how to fix it.

    ``kdlight-train`` prints it as one ``error: ...`` line and exits with status 2 (the full
    traceback appears only with ``HYDRA_FULL_ERROR=1``). It is a ``ValueError``, so code
    that calls kdlight as a library can catch it as one.
    """


def first_line(error: BaseException) -> str:
    """An error's message cut to one line (its type's name if it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def one_line(error: BaseException) -> str:
    """An error's whole message on one line (its type's name if it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def find_user_error(error: BaseException) -> KDLightError | None:
    """The :class:`KDLightError` behind ``error`` (Hydra's ``instantiate`` wraps it), if any.

    A full, read-only or over-quota disk (:data:`DISK_ERRORS`) becomes one too, which names
    the file and the reason, and says that what was written before is kept (kdlight writes
    every file whole or not at all)."""
    while error is not None:
        if isinstance(error, KDLightError):
            return error
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            where = f" {error.filename}" if error.filename else ""
            return KDLightError(
                f"cannot write{where}: {error.strerror or first_line(error)}; the files written "
                "before are kept whole: free space and launch the same command again to continue"
            )
        error = error.__cause__ or error.__context__
    return None
