"""Experiment trackers beside the CSV log: MLflow (``logger=mlflow``, :class:`MLFlowLogger`)
and Weights & Biases (``logger=wandb``, :class:`WandbLogger`), as Lightning's loggers with
what kdlight's runs need, and :func:`log_run_settings`, which gives them the run's settings
and tags to compare, filter and group runs by.

Their packages are optional (``pip install 'kdlight[mlflow]'``, ``'kdlight[wandb]'``):
:func:`kdlight.config.settings.check_extras` names a missing one before any work.
"""

import contextlib
import fcntl
import functools
import inspect
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from unittest import mock

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from kdlight.errors import KDLightError, first_line
from kdlight.runs.identity import RunIdentity, group_key
from kdlight.teacher.find import shipped_pair

SQLITE = "sqlite:///"
#: How long the check of a local MLflow store waits for another process's lock on it
#: (seconds): a write by a run logging beside this one takes milliseconds.
LOCK_WAIT_S = 5.0
ELSEWHERE = "log elsewhere with logger.mlflow.tracking_uri=sqlite:///FILE"


class MLFlowLogger(_MLFlowLogger):
    """Lightning's ``MLFlowLogger``, which opens its tracking store when it first logs, one
    process at a time for a local SQLite file.

    Lightning's opens the store when the logger is made: in every DDP process and SLURM
    task, and in code that only builds a Trainer; a new SQLite store is created then, its
    tables migrated (seconds), and processes that create it at once fail (``duplicate
    column name``). Here the first use (the store, the experiment if new, the run) holds a
    lock file beside a ``sqlite:///`` store (``mlflow.db.lock``): runs launched together
    take turns. Only rank zero logs, so only rank zero opens the store; a local SQLite file
    that cannot be used is one error line when the logger is made
    (:func:`check_sqlite_store`)."""

    __signature__ = inspect.signature(_MLFlowLogger)  # the settings checks read it

    def __init__(self, *args, **kwargs) -> None:
        # Lightning's __init__ ends with `MlflowClient(tracking_uri)`: made on first use here
        with mock.patch("mlflow.tracking.MlflowClient", lambda *_, **__: None):
            super().__init__(*args, **kwargs)
        del self._mlflow_client  # that None, so that the cached property below makes it
        if rank_zero_only.rank == 0:  # the process that will open the store
            check_sqlite_store(self._tracking_uri)

    @functools.cached_property
    def _mlflow_client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self._tracking_uri)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._initialized:
            return self._mlflow_client
        from alembic.util import CommandError
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with _sqlite_lock(self._tracking_uri):
                return super().experiment
        except (MlflowException, SQLAlchemyError, CommandError, sqlite3.Error) as err:
            # MLflow has retried for seconds already: what is left is the store itself (or
            # its tables: alembic's CommandError, e.g. a store made by a newer MLflow)
            raise KDLightError(
                f"cannot open the MLflow store {self._tracking_uri}: {first_line(err)}"
            ) from err


def _sqlite_file(tracking_uri: str) -> str:
    """The file of a ``sqlite:///`` tracking URI; empty for other stores and ``:memory:``."""
    path = tracking_uri[len(SQLITE) :] if tracking_uri.startswith(SQLITE) else ""
    return "" if path == ":memory:" else path


def check_sqlite_store(tracking_uri: str, wait: float = LOCK_WAIT_S) -> None:
    """Raise KDLightError when the local SQLite file of ``tracking_uri`` cannot be MLflow's
    store: a folder or another non-regular file, a file that is not an SQLite database, or
    one that another process keeps locked for more than ``wait`` seconds. Nothing is
    checked for other stores, nor for a file that does not exist yet (MLflow creates it).

    MLflow would find out only when the run first logs, after retrying for half a minute
    (two minutes for a locked file), and end the run with a traceback. Here the file is
    opened as MLflow will open it, for writing, in a transaction that changes nothing, while
    holding the lock runs that start together take turns with (``mlflow.db.lock``)."""
    path = _sqlite_file(tracking_uri)
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise KDLightError(f"cannot open the MLflow store {path}: {err.strerror}") from err
    move = f"move it away, or {ELSEWHERE}"
    if stat.S_ISDIR(mode):
        raise KDLightError(f"the MLflow store {path} is a folder, not an SQLite file: {move}")
    if not stat.S_ISREG(mode):
        raise KDLightError(f"the MLflow store {path} is not a regular file: {move}")
    uri = f"{Path(path).resolve().as_uri()}?mode=rw"
    try:
        with (
            _sqlite_lock(tracking_uri),
            contextlib.closing(sqlite3.connect(uri, uri=True, timeout=wait)) as store,
        ):
            store.execute("BEGIN IMMEDIATE")  # the write lock each of MLflow's writes takes
            store.execute("SELECT count(*) FROM sqlite_master").fetchone()
            store.rollback()
    except OSError as err:  # the lock file beside it cannot be made: a read-only folder
        raise KDLightError(f"cannot open the MLflow store {path}: {err.strerror}") from err
    except sqlite3.OperationalError as err:
        if "locked" not in str(err) and "busy" not in str(err):
            raise KDLightError(f"cannot open the MLflow store {path}: {err}") from err
        raise KDLightError(
            f"the MLflow store {path} is locked by another process (waited {wait:g} s): "
            f"let it finish, or {ELSEWHERE}"
        ) from err
    except sqlite3.DatabaseError as err:
        raise KDLightError(
            f"the MLflow store {path} is not an SQLite database ({err}): {move}"
        ) from err


@contextlib.contextmanager
def _sqlite_lock(tracking_uri: str) -> Iterator[None]:
    """Hold ``<file>.lock`` beside the SQLite file of ``tracking_uri`` (nothing for other
    stores). A folder whose files cannot be locked (some cluster mounts) goes unlocked."""
    path = _sqlite_file(tracking_uri)
    if not path:
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as file:
        with contextlib.suppress(OSError):
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
        yield


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger``, one W&B run per kdlight run.

    Lightning's logs into ``wandb.run`` when a W&B run is already going in the process:
    the jobs of a multirun share a process, and every job would log into the first job's
    run. Here a W&B run that an earlier job left going is finished first.

    The W&B run starts when the run's settings are logged, before training: an online run
    that cannot reach its server (within W&B's ``init_timeout``, 90 s unless
    ``WANDB_INIT_TIMEOUT`` says otherwise) or has no login is one error line that says to
    log offline and upload later, not a traceback."""

    __signature__ = inspect.signature(_WandbLogger)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # W&B warns of it, even of None
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        import wandb

        if wandb.run is not None:
            wandb.finish()
        try:
            return super().experiment
        except wandb.errors.Error as err:  # no network, no login, a server that refuses
            reason = first_line(err).rstrip(".")
            if self._offline:
                raise KDLightError(f"W&B could not start its offline run: {reason}") from err
            raise KDLightError(
                f"W&B could not start an online run ({reason}): log offline with "
                "logger.wandb.offline=true (the default) and upload the run later with "
                "`wandb sync`"
            ) from err


#: What trackers are told of the unit of the accuracies they get: Lightning logs
#: ``val/acc``, ``test/acc`` and ``test/acc_<class>`` as fractions, where ``metrics.json``
#: and ``kdlight-report`` give percentages.
ACCURACY_UNIT = "fraction (0-1); metrics.json and kdlight-report: percent"
NONE = "none"


def _method(settings: dict) -> str:
    """The run's method as the report names it: the distiller's class in lower case
    (``kd``, ``dkd``), a method grid's methods joined by ``+``, ``none`` without a teacher."""
    system = str(settings.get("module._target_", "")).rsplit(".", 1)[-1]
    if system == "ClassifierModule" or "distill.teacher_model" not in settings:
        return NONE
    grid = sorted({key.split(".")[1] for key in settings if key.startswith("methods.")})
    if grid:
        return "+".join(grid)
    distiller = settings.get("distiller._target_", "kdlight.distillers.KD")
    return str(distiller).rsplit(".", 1)[-1].lower()


def log_run_settings(loggers: Iterable[Logger], identity: RunIdentity) -> None:
    """Give each tracker among ``loggers`` (MLflow and W&B, where runs are compared; the CSV
    log has its own ``hparams.yaml``) the run's id, seed and every setting that changes its
    results (:func:`kdlight.runs.identity.settings`: ``model.name``, ``optimizer.lr``,
    ``distill.temperature``, ...) as hyperparameters, the way ``metrics.json`` records
    them. Lightning adds the module's and the data's own hyperparameters at fit.

    And the tags to find and group runs by that README's "Tracking runs with MLflow" lists
    (``group``: :func:`kdlight.runs.identity.group_key`; ``accuracy_unit``:
    :data:`ACCURACY_UNIT`), as MLflow tags, and for W&B, whose tags are bare words, as
    ``tag.<name>`` settings."""
    settings = identity.settings
    method, model = _method(settings), str(settings.get("model.name", NONE))
    teacher = settings.get("distill.teacher_model")
    teacher = NONE if teacher is None or method == NONE else str(teacher)
    tags = {
        "method": method,
        "model": model,
        "teacher": teacher,
        "pair": (shipped_pair(teacher, model) if teacher != NONE else None) or NONE,
        "seed": str(identity.seed),
        "group": group_key(settings),
        "run_id": identity.id,
        "accuracy_unit": ACCURACY_UNIT,
    }
    params = {"run.id": identity.id, "run.seed": identity.seed, **identity.settings}
    for logger in loggers:
        if isinstance(logger, _MLFlowLogger):
            logger.log_hyperparams(params)  # makes the run: its id is known from here
            for name, value in tags.items():
                logger.experiment.set_tag(logger.run_id, name, value)
        elif isinstance(logger, _WandbLogger):
            logger.log_hyperparams({**params, **{f"tag.{k}": v for k, v in tags.items()}})
