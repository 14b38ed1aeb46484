"""SIGTERM and Ctrl-C from the first moment of ``kdlight-train``, before its slow imports.

``kdlight.train`` imports this module first. Launched as ``kdlight-train`` (the console
script or ``python -m kdlight.train``), the process then answers SIGTERM (a job cancelled
as it starts) and SIGINT (Ctrl-C) with one ``error:`` line and exit status 128 + the
signal's number, through the seconds that importing torch, Lightning and Hydra takes (about
3 s on an idle 2-core CPU, 12 s on a busy one). Nothing of the run has been written then,
so there is nothing to keep.
Once the run's own handling is in place (:func:`kdlight.runs.guard.stop_on_sigterm`) it takes
over, and between the runs of a multirun this one is back.

Imported anywhere else (a test, a notebook, ``from kdlight.train import train``) it changes
nothing. It imports only the standard library, so that it is in place within a fraction of
a second.
"""

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

#: The signals that stop a run, and how its one line names them.
STOP_SIGNALS = {
    signal.SIGTERM: "terminated by SIGTERM",
    signal.SIGINT: "interrupted by SIGINT (Ctrl-C)",
}


def stop_status(signum: int) -> int:
    """The exit status of a run that signal ``signum`` stopped: 128 + its number, as a
    shell reports a process that the signal ended (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + signum


def has_default_handling(signum: int) -> bool:
    """Whether ``signum`` still has Python's default handling (SIGTERM: death; SIGINT:
    ``KeyboardInterrupt``). A launcher that handles a signal itself keeps it: submitit, for
    one, ignores SIGTERM and requeues on a signal of its own, and a job started in the
    background of a script ignores SIGINT."""
    return signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)


def _stop_while_starting(signum: int, frame: FrameType | None) -> None:
    # also between the runs of a multirun, where the line is as true
    print(
        f"error: {STOP_SIGNALS[signum]} before the run started: launch the same command again",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(stop_status(signum))


def is_startup_handler(handler: object) -> bool:
    """Whether ``handler`` is the one this module installs (the run's handling replaces it)."""
    return handler is _stop_while_starting


def handle_signals_while_starting() -> None:
    """Answer SIGTERM and SIGINT with one line and status 128 + the signal's number, where
    they still have their default handling."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set there
    for signum in STOP_SIGNALS:
        if has_default_handling(signum):
            signal.signal(signum, _stop_while_starting)


def launched_as_kdlight_train() -> bool:
    """Whether this process runs ``kdlight-train``: its console script, or ``python -m
    kdlight.train`` (also how a DDP run starts its other processes)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    script = sys.argv[0] if sys.argv else ""
    return getattr(spec, "name", None) == "kdlight.train" or Path(script).name == "kdlight-train"


if launched_as_kdlight_train():
    handle_signals_while_starting()
