"""``kdlight-train``: the Hydra entry point. It only composes and wires; the work is in
``kdlight.data``, ``kdlight.models`` and ``kdlight.lit``, and what a run *is* (its directory,
id and teacher) in ``kdlight.runs.identity``.

    kdlight-train experiment=teacher
    kdlight-train -m experiment=student_baseline seed=0,1,2
    kdlight-train experiment=quick data.source=synthetic trainer.max_epochs=1
    kdlight-train experiment=student_baseline train=false ckpt_path=path/to/best.ckpt

A run's directory is named by every setting that changes its results. It is finished when
its ``metrics.json`` holds this run's id: launching it again does nothing. A run that was
interrupted (a crash, a kill, a pre-empted job) continues from its ``checkpoints/last.ckpt``
when launched again with the same command; a checkpoint of another run is never resumed.
Debug runs (``fast_dev_run``, ``limit_*_batches``) have directories of their own, run again
every time and never count as finished.
"""

# First: launched as kdlight-train, SIGTERM and Ctrl-C are one line from here on, through
# the seconds that the imports below take (kdlight.cli.startup).
import kdlight.cli.startup  # noqa: F401  # isort: skip
import itertools
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kdlight import config_dir
from kdlight.analysis.records import read_run_file
from kdlight.config.preflight import own_method_overrides, preflight
from kdlight.config.settings import check, validate_settings
from kdlight.errors import KDLightError, find_user_error, first_line
from kdlight.lit import DistillationGridModule
from kdlight.lit.results import FULL_REPORT_CLASSES
from kdlight.models.registry import build_model
from kdlight.runs.completion import check_finished, check_training_batches, time_limit_seconds
from kdlight.runs.files import atomic_write
from kdlight.runs.guard import (
    RunInUse,
    SaveLastOnSigterm,
    Terminated,
    hold_run_lock,
    stop_on_sigterm,
)
from kdlight.runs.identity import (
    RunIdentity,
    check_checkpoint_owner,
    grid_cell_names,
    identify,
    is_grid,
)
from kdlight.teacher.find import Teacher, resolve_teacher
from kdlight.trainer.callbacks import RecordRunIdentity
from kdlight.trainer.checkpointing import AtomicCheckpointIO, read_checkpoint
from kdlight.trainer.loggers import log_run_settings

log = logging.getLogger("kdlight")
# Said once, not by every DDP process or SLURM task of a run.
info, warning = rank_zero_only(log.info), rank_zero_only(log.warning)


#: Lines Lightning prints on every run that say nothing about it: the litlogger
#: advertisement, and that the default ``limit_*_batches=1.0`` uses every batch. Lightning
#: says them through this logger (``rank_zero_info``); every other line of it is kept.
LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"
LIGHTNING_NOISE = re.compile(
    r"^💡 Tip: .*litlogger|^`Trainer\(limit_(train|val|test|predict)_batches=1\.0\)` was configured"
)
#: A warning of torch to Lightning's own code (its ``LeafSpec``), on every run's first
#: step: nothing a user can act on.
TORCH_TO_LIGHTNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _not_noise(record: logging.LogRecord) -> bool:
    """A logging filter that drops :data:`LIGHTNING_NOISE` lines."""
    return not LIGHTNING_NOISE.search(record.getMessage())


def quiet_lightning() -> None:
    """Silence what every run printed and no run needs (:data:`LIGHTNING_NOISE`,
    :data:`TORCH_TO_LIGHTNING`); Lightning's other lines and warnings stay (a logging
    interval longer than the epoch, a GPU left unused). Once per process."""
    logging.getLogger(LIGHTNING_INFO).addFilter(_not_noise)
    warnings.filterwarnings("ignore", message=TORCH_TO_LIGHTNING, category=FutureWarning)


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a callbacks or logger group."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def finished(files: list[Path], identity: RunIdentity) -> bool:
    """Whether every one of ``files`` is a readable ``metrics.json`` of this very run.

    A file that cannot be read (cut short, not JSON) is never taken as a finished result:
    the run goes on (it resumes from ``last.ckpt`` and tests again). One written by another
    run (other settings, in a directory the user named) is refused in one line."""
    if identity.debug:
        return False  # a quick check runs every time, and never counts as a result
    for file in files:
        if not file.exists():
            return False
        try:
            owner = json.loads(read_run_file(file)).get("run", {}).get("id")  # never a FIFO
        except (OSError, ValueError, AttributeError) as err:
            warning("%s cannot be read (%s): this run is not finished; going on", file, err)
            return False
        if owner != identity.id:
            raise KDLightError(
                f"{file} holds the result of another run ({owner or 'no run id'}), not this "
                f"one ({identity.id}): choose another paths.output_dir, or move it away"
            )
    return True


def build_trainer(cfg: DictConfig, callbacks: list | None = None) -> L.Trainer:
    """The Trainer with its callbacks (the config's and ``callbacks``), loggers and plugins;
    Lightning's complaints about the settings (no GPU for ``trainer=gpu``, say) become
    one-line errors. With ``trainer.enable_progress_bar=false`` the config's progress bar is
    left out (Lightning refuses a progress-bar callback beside that switch).
    ``trainer.max_time`` is not Lightning's: it is each launch's limit, which ``train``
    gives :class:`~kdlight.runs.guard.SaveLastOnSigterm`. Checkpoints are written by
    :class:`~kdlight.trainer.checkpointing.AtomicCheckpointIO` whatever ``trainer.plugins``
    holds, unless it holds a ``CheckpointIO`` of the user's own."""
    quiet_lightning()  # the Trainer says its litlogger tip as it is made
    try:
        callbacks = _instantiate_all(cfg.get("callbacks")) + list(callbacks or [])
        if cfg.trainer.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        loggers = _instantiate_all(cfg.get("logger")) or False
        plugins = list(instantiate(cfg.trainer.get("plugins") or []))
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        return instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins, max_time=None
        )
    except Exception as err:  # Hydra's instantiate wraps Lightning's exception
        cause = err.__cause__ if isinstance(err.__cause__, MisconfigurationException) else err
        if not isinstance(cause, MisconfigurationException):
            raise
        keys = [k for k in ("accelerator", "devices", "strategy") if k in cfg.trainer]
        settings = ", ".join(f"{k}={cfg.trainer[k]}" for k in keys)
        hint = ""
        if "gpu" in str(cfg.trainer.get("accelerator")) or "GPU" in str(cause):
            hint = " (no GPU here? trainer=cpu runs on the CPU)"
        raise KDLightError(f"trainer settings ({settings}): {first_line(cause)}{hint}") from err


def per_device_batch_size(batch_size: int, world_size: int) -> int:
    """``data.batch_size`` is the global batch (the reference recipe's 128 on 1 or N GPUs):
    each of the ``world_size`` processes loads an equal share of it."""
    check("data", batch_size=batch_size)
    if batch_size % world_size:
        raise KDLightError(
            f"data.batch_size={batch_size} is the global batch: it must split evenly over the "
            f"{world_size} processes (trainer.devices x trainer.num_nodes)"
        )
    return batch_size // world_size


def warn_about_schedule(cfg: DictConfig) -> None:
    """Learning-rate milestones at or after the last epoch never take effect: say so."""
    scheduler, max_epochs = cfg.get("scheduler"), cfg.trainer.get("max_epochs")
    milestones = list(scheduler.get("milestones") or []) if scheduler else []
    late = [m for m in milestones if max_epochs is not None and 0 <= max_epochs <= m]
    if late:
        warning(
            "scheduler.milestones %s are not before trainer.max_epochs=%d: the learning rate "
            "never drops there",
            late,
            max_epochs,
        )


def resume_checkpoint(output_dir: Path, identity: RunIdentity) -> Path | None:
    """``checkpoints/last.ckpt`` of an earlier, interrupted attempt at this very run, if any.

    It is read once here so that an unreadable one, or one written by another run, stops
    the run with one line before any work, and so that the log says where training
    continues. Debug runs always start afresh."""
    path = output_dir / "checkpoints" / "last.ckpt"
    if identity.debug or not path.exists():
        return None
    state = read_checkpoint(path, remedy="move it away to start afresh")
    check_checkpoint_owner(path, state, identity)
    info(
        "resuming from %s: saved at epoch %d, step %d; training continues there",
        path,
        state.get("epoch", -1),
        state.get("global_step", -1),
    )
    return path


def keep_earlier_logs(trainer: L.Trainer) -> None:
    """Lightning's CSVLogger deletes the ``metrics.csv`` it finds when it starts: keep the
    interrupted attempt's log folder as ``csv.attempt<N>/`` beside the new ``csv/``."""
    for logger in trainer.loggers:
        folder = Path(logger.log_dir) if isinstance(logger, CSVLogger) else None
        if folder is not None and folder.is_dir() and any(folder.iterdir()):
            kept = (folder.with_name(f"{folder.name}.attempt{n}") for n in itertools.count(1))
            folder.rename(next(path for path in kept if not path.exists()))


def checkpoint_to_evaluate(cfg: DictConfig) -> Path:
    """``ckpt_path`` of a ``train=false`` run: required, a file, and a checkpoint that reads
    weights only (read once here, so that a truncated or unsafe file is one line before the
    data are prepared)."""
    named = cfg.get("ckpt_path")
    if not named:
        raise KDLightError(
            "train=false evaluates a checkpoint: name it with ckpt_path=PATH (e.g. a run's "
            "checkpoints/best.ckpt or last.ckpt)"
        )
    if not Path(str(named)).is_file():
        raise KDLightError(f"ckpt_path={named}: no such file")
    read_checkpoint(Path(str(named)))
    return Path(str(named))


def build_module(cfg: DictConfig, teacher: Teacher | None, world_size: int):
    """The data, and the Lightning system with its model, optimizer and scheduler."""
    datamodule = instantiate(
        cfg.data, batch_size=per_device_batch_size(cfg.data.batch_size, world_size)
    )
    extra = {"teacher_checkpoint": str(teacher.checkpoint)} if teacher else {}
    extra["class_names"] = list(datamodule.classes)  # the per-class report's names
    module = instantiate(
        cfg.module,
        _convert_="partial",  # plain lists and dicts in the hyperparameters (weights-only loads)
        model=build_model(OmegaConf.to_container(cfg.model, resolve=True)),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        **extra,
    )
    return datamodule, module


def train(cfg: DictConfig) -> dict | None:
    """Train and/or test as ``cfg`` says (:func:`_train`); return what ``metrics.json`` holds.

    The run's directory is said when it starts and when it has finished, one line each, so
    that the output of a run, of a sweep's job or of a study's says where its results are;
    Lightning's lines that every run printed are silenced (:func:`quiet_lightning`)."""
    quiet_lightning()
    output_dir = Path(cfg.paths.output_dir).resolve()
    info("run directory: %s", output_dir)
    result = _train(cfg)
    info("run directory: %s (done)", output_dir)
    return result


def _train(cfg: DictConfig) -> dict | None:
    """Train and/or test as ``cfg`` says; return what ``metrics.json`` holds."""
    validate_settings(cfg)  # every setting, before the teacher, the data or the Trainer
    time_limit = time_limit_seconds(cfg.trainer.get("max_time"))
    output_dir = Path(cfg.paths.output_dir)
    evaluate_only = not cfg.train
    checkpoint = checkpoint_to_evaluate(cfg) if evaluate_only else None
    teacher = resolve_teacher(cfg)
    identity = identify(cfg, teacher.identity if teacher else None, checkpoint)
    results = [output_dir / "metrics.json"]
    if is_grid(cfg):  # a fused grid writes one per cell
        results = [output_dir / name / "metrics.json" for name in grid_cell_names(cfg)]
    if finished(results, identity):
        info("%s exists: this run has finished already, nothing to do", results[0])
        return json.loads(read_run_file(results[0])) if len(results) == 1 else None
    if teacher:
        info("%s", teacher.note)

    warn_about_schedule(cfg)
    L.seed_everything(cfg.seed, workers=True)
    stop = SaveLastOnSigterm(time_limit=time_limit)  # signals, and each launch's time limit
    trainer = build_trainer(cfg, callbacks=[RecordRunIdentity(identity), stop])
    datamodule, module = build_module(cfg, teacher, trainer.world_size)
    module.run_record = identity.record()
    log_run_settings(trainer.loggers, identity)  # for MLflow, W&B: compare runs by them
    datamodule.prepare_data()  # reads and checks the data before any work starts
    datamodule.setup("fit")
    if not evaluate_only:
        check_training_batches(datamodule, trainer.world_size)
    resume_from = None if evaluate_only else resume_checkpoint(output_dir, identity)

    if trainer.is_global_zero:  # other DDP processes share this directory
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        (output_dir / "error.txt").unlink(missing_ok=True)  # from a failed earlier attempt
        if resume_from:
            keep_earlier_logs(trainer)

    if not evaluate_only:
        # weights only: a last.ckpt planted in the run folder runs no code (kdlight.trainer.checkpointing)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        stopped_early = check_finished(trainer)
        if stopped_early:  # a stop the user asked for: a result, which says so
            info("stopped early after epoch %d (%s)", stopped_early["epoch"], stopped_early)
            module.run_record = {**module.run_record, "stopped_early": stopped_early}
    if cfg.test or evaluate_only:
        ckpt_path = checkpoint  # None: the weights in memory, the last ones after fit
        best = next(
            (cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)), None
        )
        if isinstance(module, DistillationGridModule):
            # each cell is tested at its own best epoch by the grid itself; the grid's
            # best.ckpt is one epoch for all cells, chosen on their mean accuracy
            module.test_weights = "last" if trainer.fast_dev_run else cfg.test_ckpt
        elif cfg.train and cfg.test_ckpt == "best" and best and not trainer.fast_dev_run:
            ckpt_path = best.best_model_path or None
        try:
            # Lightning's table of the test metrics repeats the report's per-class lines, a
            # hundred rows for CIFAR-100: shown only where the report shows every class
            verbose = len(datamodule.classes) <= FULL_REPORT_CLASSES
            trainer.test(
                module,
                datamodule=datamodule,
                ckpt_path=ckpt_path,
                weights_only=True,
                verbose=verbose,
            )
        except RuntimeError as err:
            if checkpoint is None or "state_dict" not in str(err):
                raise
            raise KDLightError(
                f"ckpt_path={checkpoint} does not fit this model ({cfg.model.name}): "
                f"{first_line(err)}"
            ) from None
        return getattr(module, "test_summary", None)
    return None


# ------------------------------------------------------------------------------ launching
#: What Lightning's local DDP launcher puts in os.environ for its processes to meet.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _this_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command that runs this Hydra job again as another DDP process: this job's own
    overrides, in this job's directory, with no second ``.hydra/`` or log file there."""
    job = HydraConfig.get()
    config_dirs = [
        f"--config-dir={source.path}"
        for source in job.runtime.config_sources
        if source.provider == "command-line" and source.schema == "file"
    ]
    command = [
        sys.executable, "-m", "kdlight.train", f"--config-name={job.job.config_name}",
        *config_dirs, *job.overrides.task,
        f'hydra.run.dir="{job.runtime.output_dir}"', f"hydra.job.chdir={job.job.chdir}",
        "hydra.output_subdir=null", "hydra/job_logging=none",  # rank 0 writes .hydra/ and the log
    ]  # fmt: skip
    return command, job.runtime.cwd


@contextmanager
def ddp_job() -> Iterator[None]:
    """Let Lightning's local DDP start this job's other processes, and leave nothing behind.

    Lightning starts them by running the script again with the whole command line, which in a
    multirun starts the whole sweep again in each of them (in directories of its own); they run
    :func:`_this_job_command` instead. At the end the process group and the rendezvous that
    Lightning left in ``os.environ`` go, so that the next job of a multirun starts its own
    processes instead of waiting for the last job's.
    """
    environment = {key: os.environ.get(key) for key in _DDP_ENV}
    lightning_command = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = _this_job_command
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = lightning_command
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RunFailed(CompactHydraException):
    """A run of a multirun stopped with a clear error. The other runs go on; at the end Hydra
    prints this one line (for the first failure) and exits with status 1."""


def report_failure(cfg: DictConfig, error: BaseException) -> None:
    """Say why the run failed in one line (the traceback only for unexpected errors or with
    ``HYDRA_FULL_ERROR=1``) and record it in the run's ``error.txt`` for ``kdlight-report``.
    A single run exits with status 2; in a multirun the other runs go on.

    A run that SIGTERM stopped (:class:`~kdlight.runs.guard.Terminated`) exits with status 143,
    and in a multirun records the line and launches no further run: the machine is going
    away. A launch refused because its run is in use (:class:`~kdlight.runs.guard.RunInUse`)
    writes nothing into that run's directory."""
    terminated = isinstance(error, Terminated)
    known = error if terminated else find_user_error(error)  # one line says it all
    reason = first_line(known) if known else f"{type(error).__name__}: {first_line(error)}"
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        if multirun or known:
            print(f"error: {reason}", file=sys.stderr, flush=True)
        if not isinstance(known, RunInUse) and output_dir.is_dir():
            # kdlight-report lists the run as failed with this line, not as still running
            write_error(output_dir, reason)
    if terminated:  # the other processes exit with 0, as below
        sys.exit(error.code if rank_zero_only.rank == 0 else 0)
    if known is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    if not multirun:
        # The first process reports it. Another one that exited non-zero would make its
        # launcher (Lightning's, torchrun) kill the first at once, and with it a multirun.
        sys.exit(getattr(known, "exit_status", 2) if rank_zero_only.rank == 0 else 0)
    raise RunFailed(
        f"error: {output_dir} failed: {reason} (each failed run of this multirun has an "
        "error.txt; kdlight-report lists them)"
    ) from None


def write_error(output_dir: Path, reason: str) -> None:
    """The failed run's ``error.txt``; a folder that cannot take it (read-only, full) costs
    only the file, not the one line already printed."""
    try:
        atomic_write(output_dir / "error.txt", f"{reason}\n")
    except OSError as err:
        warning("cannot write %s: %s", output_dir / "error.txt", first_line(err))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    try:
        # The lock first: a second launch of a run in use stops before touching its files.
        with hold_run_lock(cfg.paths.output_dir), ddp_job(), stop_on_sigterm():
            train(cfg)
    except (Exception, Terminated) as error:
        report_failure(cfg, error)


def main() -> None:
    """``kdlight-train``: the command line is checked (settings, typos, extras) before Hydra
    composes it, so a bad one is one ``error:`` line and exit status 2. A user's own method
    (``'distiller={_target_: my.METHOD}'``) replaces the default one whole."""
    sys.argv[1:] = own_method_overrides(sys.argv[1:])  # Hydra's main reads sys.argv
    preflight(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
