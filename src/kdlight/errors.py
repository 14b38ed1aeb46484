"""The one exception type that kdlight shows to a user as a single line."""


class KDLightError(ValueError):
    """Bad input found before work starts: the message says what is wrong and how to fix it.

    ``kdlight-train`` prints it as one ``error: ...`` line and exits with status 2 (the full
    traceback appears only with ``HYDRA_FULL_ERROR=1``). It is a ``ValueError``, so code
    that calls kdlight as a library can catch it as one.
    """


def first_line(error: BaseException) -> str:
    """An error's message cut to one line (its type's name if it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def find_user_error(error: BaseException) -> KDLightError | None:
    """The :class:`KDLightError` behind ``error`` (Hydra's ``instantiate`` wraps it), if any."""
    while error is not None:
        if isinstance(error, KDLightError):
            return error
        error = error.__cause__ or error.__context__
    return None
