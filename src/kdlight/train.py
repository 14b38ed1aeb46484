"""``kdlight-train``: the Hydra entry point. It only composes and wires; the work is in
``kdlight.data``, ``kdlight.models`` and ``kdlight.lit``.

    kdlight-train experiment=teacher
    kdlight-train experiment=quick data.source=synthetic trainer.max_epochs=1
"""

import json
import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdlight import config_dir
from kdlight.errors import find_user_error

log = logging.getLogger("kdlight")


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every ``_target_`` entry of a callbacks or logger group."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def train(cfg: DictConfig) -> dict | None:
    """Train and/or test as ``cfg`` says; return what ``metrics.json`` holds."""
    output_dir = Path(cfg.paths.output_dir)
    metrics_file = output_dir / "metrics.json"
    if cfg.train and metrics_file.exists():
        log.info("%s exists: this run has finished already, nothing to do", metrics_file)
        return json.loads(metrics_file.read_text())

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    module = instantiate(
        cfg.module,
        model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
    )
    datamodule.prepare_data()  # reads and checks the data before any work starts
    datamodule.setup("fit")

    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    if cfg.train:
        trainer.fit(module, datamodule=datamodule)
    if cfg.test:
        ckpt_path = None  # the weights in memory: the last ones after fit
        if (
            cfg.train
            and cfg.test_ckpt == "best"
            and trainer.checkpoint_callback
            and not trainer.fast_dev_run
        ):
            ckpt_path = trainer.checkpoint_callback.best_model_path or None
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return module.test_summary
    return None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Exception as error:
        err = find_user_error(error)
        if err is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.RUN:
            sys.exit(2)
        # In a multirun one bad job must not stop the others: its directory records why.
        Path(cfg.paths.output_dir, "error.txt").write_text(f"{err}\n")


if __name__ == "__main__":
    main()
