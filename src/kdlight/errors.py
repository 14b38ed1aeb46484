"""The one exception type that kdlight shows to a user as a single line."""


class KDLightError(Exception):
    """Bad input found before work starts: the message says what is wrong and how to fix it.

    ``kdlight-train`` prints it as one ``error: ...`` line and exits with status 2 (the full
    traceback appears only with ``HYDRA_FULL_ERROR=1``).
    """
