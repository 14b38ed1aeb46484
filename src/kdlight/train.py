"""``kdlight-train``: the Hydra entry point. It only composes and wires; the work is in
``kdlight.data``, ``kdlight.models`` and ``kdlight.lit``.

    kdlight-train experiment=teacher
    kdlight-train experiment=quick data.source=synthetic trainer.max_epochs=1

A run is finished when its ``metrics.json`` exists: launching it again does nothing. A run
that was interrupted (a crash, a kill, a pre-empted job) continues from its
``checkpoints/last.ckpt`` when launched again with the same command.
"""

import json
import logging
import os
import sys
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
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from kdlight import config_dir
from kdlight.errors import KDLightError, find_user_error
from kdlight.lit.grid import cell_name

log = logging.getLogger("kdlight")
# Said once, not by every DDP process or SLURM task of a run.
info, warning = rank_zero_only(log.info), rank_zero_only(log.warning)


def first_line(error: BaseException) -> str:
    """An exception's message, cut to one line (its type's name if it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a callbacks or logger group."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def metrics_files(cfg: DictConfig) -> list[Path]:
    """What a finished run has written: its ``metrics.json``, or one per cell of a fused grid."""
    output_dir = Path(cfg.paths.output_dir)
    if str(cfg.module.get("_target_", "")).endswith("DistillationGridModule"):
        temperatures, alphas = (
            list(v) if OmegaConf.is_list(v) else [v]
            for v in (cfg.module.temperature, cfg.module.alpha)
        )
        return [
            output_dir / cell_name(float(t), float(a)) / "metrics.json"
            for t in temperatures
            for a in alphas
        ]
    return [output_dir / "metrics.json"]


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Trainer with its callbacks and loggers; Lightning's complaints about the settings
    (no GPU for ``trainer=gpu``, say) become one-line errors."""
    try:
        return instantiate(
            cfg.trainer,
            callbacks=_instantiate_all(cfg.get("callbacks")),
            logger=_instantiate_all(cfg.get("logger")) or False,
        )
    except Exception as err:  # Hydra's instantiate wraps Lightning's exception
        cause = err.__cause__ if isinstance(err.__cause__, MisconfigurationException) else err
        if not isinstance(cause, MisconfigurationException):
            raise
        keys = [k for k in ("accelerator", "devices", "strategy") if k in cfg.trainer]
        settings = ", ".join(f"{k}={cfg.trainer[k]}" for k in keys)
        raise KDLightError(f"trainer settings ({settings}): {cause}") from err


def per_device_batch_size(batch_size: int, world_size: int) -> int:
    """``data.batch_size`` is the global batch (the reference recipe's 128 on 1 or N GPUs):
    each of the ``world_size`` processes loads an equal share of it."""
    if batch_size <= 0:
        raise KDLightError(f"data.batch_size must be > 0, got {batch_size}")
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


def resume_checkpoint(output_dir: Path) -> Path | None:
    """``checkpoints/last.ckpt`` of an earlier, interrupted attempt at this run, if any.

    It is read once here so that an unreadable one stops the run with one line before any
    work, and so that the log says where training continues."""
    path = output_dir / "checkpoints" / "last.ckpt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # as fit reads it
        epoch, step = state["epoch"], state["global_step"]
    except Exception as err:
        raise KDLightError(
            f"cannot resume from {path} ({first_line(err)}); move it away to start this run afresh"
        ) from None
    info(
        "resuming from %s: saved at epoch %d, step %d; training continues there", path, epoch, step
    )
    return path


def keep_earlier_logs(trainer: L.Trainer) -> None:
    """Lightning's CSVLogger deletes the ``metrics.csv`` it finds when it starts: keep the
    interrupted attempt's log folder as ``csv.attempt<N>/`` beside the new ``csv/``."""
    for logger in trainer.loggers:
        folder = Path(logger.log_dir) if isinstance(logger, CSVLogger) else None
        if folder is not None and folder.is_dir() and any(folder.iterdir()):
            attempt = 1
            while folder.with_name(f"{folder.name}.attempt{attempt}").exists():
                attempt += 1
            folder.rename(folder.with_name(f"{folder.name}.attempt{attempt}"))


def train(cfg: DictConfig) -> dict | None:
    """Train and/or test as ``cfg`` says; return what ``metrics.json`` holds."""
    output_dir = Path(cfg.paths.output_dir)
    results = metrics_files(cfg)
    if cfg.train and all(file.exists() for file in results):
        info("%s exists: this run has finished already, nothing to do", results[0])
        return json.loads(results[0].read_text()) if len(results) == 1 else None

    warn_about_schedule(cfg)
    L.seed_everything(cfg.seed, workers=True)
    trainer = build_trainer(cfg)
    datamodule = instantiate(
        cfg.data, batch_size=per_device_batch_size(cfg.data.batch_size, trainer.world_size)
    )
    model = instantiate(cfg.model)
    module = instantiate(
        cfg.module,
        model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    datamodule.prepare_data()  # reads and checks the data before any work starts
    datamodule.setup("fit")
    resume_from = resume_checkpoint(output_dir) if cfg.train else None

    if trainer.is_global_zero:  # other DDP processes share this directory
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        (output_dir / "error.txt").unlink(missing_ok=True)  # from a failed earlier attempt
        if resume_from:
            keep_earlier_logs(trainer)

    if cfg.train:
        # weights_only=False: this run's own checkpoints (the hyperparameters of a fused grid
        # hold Hydra's list type, which torch's weights-only loading refuses)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=False)
    if cfg.test:
        ckpt_path = None  # the weights in memory: the last ones after fit
        best = next(
            (cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)), None
        )
        if cfg.train and cfg.test_ckpt == "best" and best and not trainer.fast_dev_run:
            ckpt_path = best.best_model_path or None
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
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


def report_failure(cfg: DictConfig, error: Exception) -> None:
    """Say why the run failed in one line (the traceback only for unexpected errors or with
    ``HYDRA_FULL_ERROR=1``). A single run exits with status 2; a run of a multirun records the
    line in its ``error.txt`` for ``kdlight-report``, and the multirun goes on."""
    user_error = find_user_error(error)
    reason = (
        first_line(user_error) if user_error else f"{type(error).__name__}: {first_line(error)}"
    )
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0 and (multirun or user_error):
        print(f"error: {reason}", file=sys.stderr, flush=True)
        if multirun:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "error.txt").write_text(f"{reason}\n")
    if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    if not multirun:
        # The first process reports it. Another one that exited non-zero would make its
        # launcher (Lightning's, torchrun) kill the first at once, and with it a multirun.
        sys.exit(2 if rank_zero_only.rank == 0 else 0)
    raise RunFailed(
        f"error: {output_dir} failed: {reason} (each failed run of this multirun has an "
        "error.txt; kdlight-report lists them)"
    ) from None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        with ddp_job():
            train(cfg)
    except Exception as error:
        report_failure(cfg, error)


if __name__ == "__main__":
    main()
