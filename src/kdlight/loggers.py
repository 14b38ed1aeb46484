"""Experiment trackers beside the CSV log: MLflow (``logger=mlflow``) and Weights & Biases
(``logger=wandb``), as Lightning's loggers with what kdlight's runs need.

- :class:`MLFlowLogger` opens its tracking store when it first logs, on the process that
  logs, one process at a time for a local SQLite file (runs launched together).
- :class:`WandbLogger` gives each run of a multirun a W&B run of its own.
- :func:`log_run_settings` gives the trackers the run's settings (model, method, T, alpha,
  seed...), so that runs can be compared and filtered by them.

Their packages are optional (``pip install 'kdlight[mlflow]'``, ``'kdlight[wandb]'``):
:func:`kdlight.settings.check_extras` names a missing one before any work.
"""

import contextlib
import fcntl
import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path
from unittest import mock

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from kdlight.runs import RunIdentity

SQLITE = "sqlite:///"


class MLFlowLogger(_MLFlowLogger):
    """Lightning's ``MLFlowLogger``, which opens its tracking store when it first logs, one
    process at a time for a local SQLite file.

    Lightning's opens the store when the logger is made: in every DDP process and SLURM
    task, and in code that only builds a Trainer; a new SQLite store is created then, its
    tables migrated (seconds), and processes that create it at once fail (``duplicate
    column name``). Here the first use (the store, the experiment if new, the run) holds a
    lock file beside a ``sqlite:///`` store (``mlflow.db.lock``): runs launched together
    take turns. Only rank zero logs, so only rank zero opens the store."""

    __signature__ = inspect.signature(_MLFlowLogger)  # the settings checks read it

    def __init__(self, *args, **kwargs) -> None:
        self._client = None
        # Lightning's __init__ ends with `MlflowClient(tracking_uri)`: made on first use here
        with mock.patch("mlflow.tracking.MlflowClient", lambda *_, **__: None):
            super().__init__(*args, **kwargs)

    @property
    def _mlflow_client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self._tracking_uri)
        return self._client

    @_mlflow_client.setter
    def _mlflow_client(self, client) -> None:
        self._client = client

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._initialized:
            return self._mlflow_client
        with _sqlite_lock(self._tracking_uri):
            return super().experiment


@contextlib.contextmanager
def _sqlite_lock(tracking_uri: str) -> Iterator[None]:
    """Hold ``<file>.lock`` beside the SQLite file of ``tracking_uri`` (nothing for other
    stores). A folder whose files cannot be locked (some cluster mounts) goes unlocked."""
    path = tracking_uri[len(SQLITE) :] if tracking_uri.startswith(SQLITE) else ""
    if not path or path == ":memory:":
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
    run. Here a W&B run that an earlier job left going is finished first."""

    __signature__ = inspect.signature(_WandbLogger)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # W&B warns of it, even of None
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        return super().experiment


#: The loggers that are given the run's settings: trackers, where runs are compared by them
#: (the CSV log has its own ``hparams.yaml``; the run's settings are in its ``config.yaml``).
TRACKERS = (_MLFlowLogger, _WandbLogger)


def log_run_settings(loggers: Iterable[Logger], identity: RunIdentity) -> None:
    """Give each tracker among ``loggers`` the run's id, seed and every setting that
    changes its results (:func:`kdlight.runs.settings`: ``model.name``, ``optimizer.lr``,
    ``distill.temperature``, ...) as hyperparameters, the way ``metrics.json`` records
    them. Lightning adds the module's and the data's own hyperparameters at fit."""
    params = {"run.id": identity.id, "run.seed": identity.seed, **identity.settings}
    for logger in loggers:
        if isinstance(logger, TRACKERS):
            logger.log_hyperparams(params)
