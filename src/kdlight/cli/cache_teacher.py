"""``kdlight-cache-teacher``: fill the teacher cache (:mod:`kdlight.teacher.cache`) for all
162 augmentation variants of every training image at once, for a teacher that many studies
will distil from.

    kdlight-cache-teacher experiment=distill                      # the finished teacher
    kdlight-cache-teacher experiment=distill trainer=gpu distill.teacher_checkpoint=t.ckpt

It takes the command line of the distillation runs that will read the cache, and fills the
cache those runs look up: the same teacher, data, augmentation and precision make the same
key (seeds, T, alpha and the method do not change it, so leave sweeps out). Entries already
filled are kept, so a stopped fill goes on where it stopped, and runs may read and fill the
cache while it works. It says what it filled, in how long, and the cache's size on disk;
a cache that cannot be made or filled (a full disk: its space is reserved when it is made,
a read-only folder, a damaged cache that cannot be made again) is one error line, exit 2.

Filling pays only for a teacher used for more than about 162 passes over the training data
in all (see the README's "Teacher cache"): it is 162 passes of the teacher, once.
"""

import logging
import os
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlight import config_dir
from kdlight.config.settings import validate_settings, value_of
from kdlight.errors import KDLightError, first_line
from kdlight.models.fast import FastForward
from kdlight.runs.identity import is_distillation
from kdlight.teacher import freeze, load_teacher
from kdlight.teacher.cache import VARIANTS, fill_all
from kdlight.teacher.find import resolve_teacher
from kdlight.teacher.frozen import teacher_cache_for
from kdlight.train import build_trainer

log = logging.getLogger("kdlight")

USAGE = "usage: kdlight-cache-teacher [OVERRIDES ...] (those of the distillation runs)"


def compose_command_line(argv: list[str]) -> DictConfig:
    """The ``train`` config of ``kdlight-train ARGV``; a sweep or a config that does not
    compose is one error line."""
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        parser = OverridesParser.create()
        try:
            overrides = parser.parse_overrides(argv)
        except HydraException as err:
            raise KDLightError(f"cannot read the command line: {first_line(err)}") from None
        swept = [o.input_line for o in overrides if o.is_sweep_override()]
        if swept:
            raise KDLightError(
                f"{swept[0]}: kdlight-cache-teacher fills one teacher's cache, give one value "
                "(seeds, T, alpha and the method do not change the cache: leave them out)"
            )
        try:  # the runs' own folders are not made: nothing is written there
            return compose("train", overrides=[*argv, "paths.output_dir=${paths.root}"])
        except (HydraException, OmegaConfBaseException) as err:
            raise KDLightError(f"cannot compose the config: {first_line(err)}") from None


def cache_teacher(cfg: DictConfig) -> dict:
    """Fill the cache of ``cfg``'s distillation runs; return what :func:`fill_all` reports
    with ``path``, ``bytes`` (the files' size on disk) and ``dtype``."""
    validate_settings(cfg)
    if not is_distillation(cfg):
        raise KDLightError(
            "kdlight-cache-teacher fills a distillation run's cache: give that run's command "
            "line (experiment=distill ...)"
        )
    teacher = resolve_teacher(cfg)
    log.info("%s", teacher.note)
    # built as kdlight-train builds its Trainer, so that Lightning's complaints about the
    # settings (trainer=gpu without a GPU) are the same one line, before any work
    quiet = ("enable_checkpointing", "enable_progress_bar", "enable_model_summary")
    one_device = {"_target_": "lightning.pytorch.Trainer", "devices": 1}
    one_device |= {"accelerator": cfg.trainer.accelerator, "precision": cfg.trainer.precision}
    trainer = build_trainer(OmegaConf.create({"trainer": one_device | dict.fromkeys(quiet, False)}))
    # the whole training split, every row of the cache, whatever a seed holds out
    data = instantiate(cfg.data, val_size=0, train_subset=None)
    data.prepare_data()
    data.setup("fit")
    device = trainer.strategy.root_device
    module = cfg.module
    model = load_teacher(
        teacher.checkpoint, value_of(cfg, "module.teacher_model"), module.num_classes
    )
    model = trainer.precision_plugin.convert_module(freeze(model)).to(device)
    cache = teacher_cache_for(
        model, teacher.checkpoint, data, str(trainer.precision), module.num_classes
    )  # a full disk, a read-only folder...: one line (CacheUnavailable)
    for note in cache.notes:
        log.warning("%s", note)
    if not cache.writable and not cache.filled.all():
        raise KDLightError(
            f"teacher cache {cache.path} cannot be filled: it is open read-only "
            "(see the line above); runs can read its hits as it is"
        )
    forward = FastForward(model, module.get("compile", False), module.get("channels_last", False))
    images = torch.empty_like(data.train_set.images)
    images[data.train_positions] = data.train_set.images  # row i: the split's image i
    images = images.to(device)

    def teacher_answer(batch: torch.Tensor) -> torch.Tensor:
        normalized = data.normalize(batch)  # outside autocast, as in training
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            return forward(normalized)

    said = 0  # tenths of the work said so far

    def progress(done: int, total: int) -> None:
        nonlocal said
        if 10 * done // total > said:
            said = 10 * done // total
            log.info("filled %d%% (%d of %d entries)", 10 * said, done, total)

    log.info(
        "teacher cache %s: %d images x %d variants, %s logits, on %s",
        cache.path, len(images), VARIANTS, cache.dtype, device,
    )  # fmt: skip
    report = fill_all(cache, images, teacher_answer, cfg.data.eval_batch_size, progress)
    if cache.writable:
        cache.logits.flush()
        cache.filled.flush()
    on_disk = sum(
        os.stat(cache.path.with_suffix(suffix)).st_blocks * 512 for suffix in (".logits", ".filled")
    )
    return report | {"path": str(cache.path), "bytes": on_disk, "dtype": str(cache.dtype)}


def main(argv: list[str] | None = None) -> int:
    """``kdlight-cache-teacher [OVERRIDES ...]``: one line on success or on an error."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE + "\n\n" + __doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        report = cache_teacher(compose_command_line(argv))
    except KDLightError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    rate = report["images_per_second"]
    print(
        f"teacher cache {report['path']}: {report['entries']:,} entries, {report['computed']:,} "
        f"computed now in {report['seconds']:.1f} s"
        + (f" ({rate:,.0f} images/s)" if rate else "")
        + f"; {report['bytes'] / 1e6:,.1f} MB on disk ({report['dtype']} logits); "
        f"{time.perf_counter() - start:.1f} s in all",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
