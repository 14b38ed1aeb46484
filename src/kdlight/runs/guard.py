"""What keeps a run whole when it is stopped or launched twice.

* SIGTERM (``kill``, a SLURM pre-emption, a container stop) ends a run with status 143
  (128 + 15, what a shell reports for it) and one ``error:`` line, never as a success (left
  to Lightning, it ends with status 0: its ``SIGTERMException`` is a ``SystemExit``);
  Ctrl-C (SIGINT) likewise, with status 130. During training :class:`SaveLastOnSigterm`
  stops at the end of the current batch with ``last.ckpt`` saved there; at other times
  :func:`stop_on_sigterm` stops the run at once (before it, while ``kdlight-train``
  starts, :mod:`kdlight.cli.startup`). Relaunching the same command resumes, exactly.
* :func:`hold_run_lock` keeps a second launch of the same run out of its directory while
  the first runs, with the kernel's lock (``flock``): it goes with the process that holds
  it, so a killed run never leaves a lock that blocks.
"""

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kdlight.cli.startup import STOP_SIGNALS, has_default_handling, is_startup_handler, stop_status
from kdlight.errors import KDLightError, first_line
from kdlight.runs.completion import NotFinished
from kdlight.trainer.callbacks import SaveLastCheckpoint, ends_epoch

log = logging.getLogger("kdlight")

# ------------------------------------------------------------------------------ SIGTERM
TERMINATED_STATUS = stop_status(signal.SIGTERM)
RELAUNCH = "launch the same command again to resume"
#: What :class:`SaveLastOnSigterm` notes when ``trainer.max_time`` runs out: below every
#: signal's number, so that under DDP a signal seen by any process wins over the clock.
TIME_IS_UP = 1


class Terminated(SystemExit):
    """SIGTERM (or Ctrl-C) stopped this run. Its message (``str()``) is the ``error:`` line:
    where the run stopped and what to do; its ``code`` is the exit status,
    :data:`TERMINATED_STATUS` (130 for Ctrl-C)."""

    def __init__(self, message: str, code: int = TERMINATED_STATUS) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SaveLastOnSigterm(Callback):
    """While training, a SIGTERM or a Ctrl-C (SIGINT) stops the run at the end of the current
    batch (during an epoch's last batch: at the epoch's end, after its validation, as
    :func:`~kdlight.trainer.callbacks.ends_epoch` says why) by raising :class:`Terminated`,
    with ``last.ckpt`` (the path of the Trainer's
    :class:`~kdlight.trainer.callbacks.SaveLastCheckpoint`) saved at that step. A run resumed
    from it ends exactly as the run never stopped: the training loader goes on at the next
    batch of the same order (:class:`kdlight.data.resumable.ResumableLoader`).

    Lightning's own handling is replaced for the time of training because under DDP it
    can hang or crash: its signal handler broadcasts to the other processes from wherever
    the signal interrupts (here it met a checkpoint's broadcast: a gloo "collective
    mismatch"), and each process stops where its own handler saw the signal, so that no
    save together is possible after. Here the handler only notes the signal, and at each
    batch's and epoch's end, a point every process reaches in the same order, they learn
    together whether any one of them was signalled (one small all-reduce per step; Lightning
    already waits for one broadcast per step under DDP), then save and stop together. In a
    single process nothing is exchanged. Left to Lightning, Ctrl-C ends a run with its
    "Detected KeyboardInterrupt", status 1 and no checkpoint of the step reached. Lightning's
    SLURM requeue (on SIGUSR1) is not touched; Lightning puts back the handlers from before
    the fit at its end (testing keeps Lightning's own stop).

    ``time_limit`` (``trainer.max_time`` in seconds, which kdlight takes from Lightning)
    stops each launch the same way once that long has passed since its training started:
    ``last.ckpt`` saved at the step reached and :class:`~kdlight.runs.completion.NotFinished`
    (exit status 3), so that the same command, launched again, continues exactly. Lightning's
    own limit counts the whole fit over all launches, so a run it stopped could never finish
    with the same command, and it stops at an epoch's end that resumes as a whole epoch.
    """

    def __init__(self, time_limit: float | None = None) -> None:
        self._signalled = 0  # the first stop signal's number; 0: none
        self.time_limit = time_limit  # trainer.max_time in seconds: this launch's limit
        self._deadline = math.inf

    def _note(self, signum: int, frame) -> None:
        self._signalled = self._signalled or signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installed its handler as this fit began, and puts back the one from
        # before the fit at its end; a signal it has seen already stops at the first step.
        self._signalled = signal.SIGTERM if trainer.received_sigterm else 0
        if self.time_limit is not None:
            self._deadline = time.monotonic() + self.time_limit
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note)
            if _run_may_take(signal.SIGINT):  # not where the launcher ignores it
                signal.signal(signal.SIGINT, self._note)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not ends_epoch(trainer):  # the epoch's end stops it, after validation
            self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last_epoch = trainer.current_epoch + 1 >= (trainer.max_epochs or 0) > 0
        self._stop_if_signalled(trainer, time_counts=not last_epoch)  # done: no time to save

    def _stop_if_signalled(self, trainer: L.Trainer, time_counts: bool = True) -> None:
        signalled = self._signalled
        if not signalled and time_counts and time.monotonic() >= self._deadline:
            signalled = TIME_IS_UP
        if trainer.world_size > 1:  # all stop at one step; a signal wins over the clock
            flag = torch.tensor(signalled, device=trainer.strategy.root_device)
            signalled = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if not signalled:
            return
        saves = [cb for cb in trainer.callbacks if isinstance(cb, SaveLastCheckpoint)]
        last = saves[0] if saves and not trainer.fast_dev_run else None
        step, epoch = trainer.global_step, trainer.current_epoch
        if signalled == TIME_IS_UP:  # not finished; a failed save raises, the one before is kept
            where = (
                f"not finished: trainer.max_time ({self.time_limit:g} s for each launch) ran "
                f"out at step {step} (epoch {epoch} of {trainer.max_epochs})"
            )
            if last is None:
                raise NotFinished(f"{where}; this run keeps no last.ckpt")
            last.save(trainer)
            raise NotFinished(
                f"{where}; last.ckpt is current: launch the same command again to continue"
            )
        status, stopped = stop_status(signalled), STOP_SIGNALS[signalled]
        where = f"{stopped} at step {step} (epoch {epoch})"
        if last is None:
            raise Terminated(
                f"{where}; this run keeps no last.ckpt: launch it again to redo it", status
            )
        try:
            last.save(trainer)
        except Exception as err:  # a full disk, non-finite weights: the one before is kept
            why = f"last.ckpt could not be saved there ({first_line(err)})"
            raise Terminated(
                f"{where}; {why}: {RELAUNCH} from the one saved before", status
            ) from None
        raise Terminated(f"{where}; last.ckpt is current: {RELAUNCH}", status)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn a SIGTERM or a Ctrl-C (SIGINT) during the block into :class:`Terminated`.

    While Lightning runs, its handler (or, in training, :class:`SaveLastOnSigterm`'s) has
    SIGTERM and stops at the end of a batch; Lightning's ``SIGTERMException`` (in a sanity
    check or in testing) becomes :class:`Terminated` here. Before and after, the handler
    installed here raises :class:`Terminated` at once; Lightning calls it too while its own
    is in place, and then it leaves the stop to Lightning. SIGINT, which Lightning leaves
    alone, stops at once outside training too. Each is installed only where the run may take
    the signal (:func:`_run_may_take`): a launcher that handles it itself keeps it.
    """
    received: set[int] = set()

    def on_signal(signum: int, frame) -> None:
        first = signum not in received
        received.add(signum)
        if first and signal.getsignal(signum) is on_signal:  # not Lightning's turn
            raise Terminated(
                f"{STOP_SIGNALS[signum]} outside training: {RELAUNCH}", stop_status(signum)
            )

    on_signal.stops_the_run = True  # what _run_may_take knows it by
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if _run_may_take(signum):
                installed[signum] = signal.getsignal(signum)
                signal.signal(signum, on_signal)
    try:
        yield
    except SIGTERMException:
        raise Terminated(f"terminated by SIGTERM: {RELAUNCH}") from None
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)


def _run_may_take(signum: int) -> bool:
    """Whether the run may handle ``signum`` itself: it has its default handling or kdlight's
    (:mod:`kdlight.cli.startup`'s, :func:`stop_on_sigterm`'s), not one that a launcher set
    (submitit ignores SIGTERM; a job started in the background of a script ignores SIGINT)."""
    handler = signal.getsignal(signum)
    kdlights = is_startup_handler(handler) or getattr(handler, "stops_the_run", False)
    return has_default_handling(signum) or kdlights


# --------------------------------------------------------------------------------- lock
LOCK_NAME = ".lock"
#: flock's answers on filesystems that do not lock files (some cluster mounts).
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
#: The lock files this process holds. A forked child (a DataLoader worker) closes its copies:
#: a flock lasts while any copy is open, and the lock must go with the run's own process.
_held: set[int] = set()


class RunInUse(KDLightError):
    """Another ``kdlight-train`` holds this run's directory."""


def _drop_inherited_locks() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def is_launching_process() -> bool:
    """Whether this process launched the run: global rank 0, not one of the processes that
    Lightning's DDP (``LOCAL_RANK`` > 0), torchrun, SLURM or another node starts in the same
    run directory."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(record['pid'])} on host {record['host']}"
    except (OSError, ValueError, TypeError, KeyError):  # not written yet
        return "pid and host not recorded yet"


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<run_dir>/.lock`` while the block runs, or raise
    :class:`RunInUse` (one line: who holds it) without touching any file of the run.

    Only the launching process (:func:`is_launching_process`) takes it. The lock file keeps
    its inode for good (a file renamed into place would be another lock, so it is written in
    place, not through :mod:`kdlight.runs.files`); its content, the holder's pid and host, is only a
    hint for the message. Where the filesystem does not lock files, the run goes on with a
    warning. Since it is written in place, it must be the run's own file (:func:`open_run_lock`).
    """
    if not is_launching_process():
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    fd, locked = open_run_lock(path), False
    try:
        if locked := _lock(fd, path):
            _held.add(fd)
            os.ftruncate(fd, 0)
            record = {"pid": os.getpid(), "host": socket.gethostname()}
            os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        if locked:
            _held.discard(fd)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the holder's details go with the lock
        os.close(fd)  # releases the lock


def open_run_lock(path: Path) -> int:
    """Open (or create) the lock file ``path`` for reading and writing, without following a
    symbolic link (on a shared outputs root, it may point anywhere), and only if it is a
    regular file with no other name (a hard link): one the run may truncate and write.
    Anything else is one :class:`KDLightError` line, with nothing written."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW's answer for a symbolic link
            target = os.readlink(path) if path.is_symlink() else "?"
            raise KDLightError(
                f"the run lock {path} is a symbolic link (to {target}), which kdlight does not "
                "follow: it writes only into the run's own lock file; remove the link"
            ) from None
        raise KDLightError(f"cannot open the run lock {path}: {err.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink > 1:
        problem = f"has {info.st_nlink - 1} other name(s) (a hard link to a file elsewhere)"
    if problem:
        os.close(fd)
        raise KDLightError(
            f"the run lock {path} {problem}: kdlight writes only into the run's own lock "
            "file; remove it"
        )
    return fd


def _lock(fd: int, path: Path) -> bool:
    """Take the lock on ``path`` (open as ``fd``) or raise :class:`RunInUse`; False where the
    filesystem does not lock files."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunInUse(
            f"{path.parent} is in use by another kdlight-train ({_holder(fd)}); "
            "wait for it or stop it"
        ) from None
    except OSError as err:
        if err.errno not in _NO_LOCKING:
            raise
        log.warning(
            "cannot lock %s (%s): this filesystem does not lock files, so a second launch of "
            "this run at the same time would not be stopped",
            path,
            err.strerror,
        )
        return False
    return True
