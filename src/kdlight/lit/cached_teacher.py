"""The teacher cache in the distillation systems (``distill.teacher_cache=true``): which
cache a run reads (:func:`teacher_cache_for`), and :class:`TeacherCacheMixin`, what
``DistillationModule`` and ``DistillationGridModule`` share: the teacher's outputs of a
training batch, from the cache or live, the hit rate counted over every process, and the
``teacher_cache`` block of ``metrics.json``. The storage is :mod:`kdlight.teacher_cache`."""

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from kdlight.data import default_data_dir
from kdlight.distillers import Outputs, method_name
from kdlight.errors import KDLightError
from kdlight.teacher_cache import TeacherCache, cache_key, storage_dtype

log = logging.getLogger("kdlight")


def teacher_identity(teacher: nn.Module, checkpoint: str | Path | None) -> str:
    """What names the teacher in a cache's key: its checkpoint file's content, or, for a
    teacher given as a module, its weights'."""
    from kdlight.runs import file_identity

    if checkpoint:
        return file_identity(checkpoint)
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return f"weights:{digest.hexdigest()[:16]}"


def teacher_cache_for(
    teacher: nn.Module,
    checkpoint: str | Path | None,
    datamodule,
    precision: str,
    num_classes: int,
) -> TeacherCache:
    """The cache of ``teacher``'s logits on ``datamodule``'s training split (set up) at a
    Trainer's ``precision``, in the data folder's ``teacher_cache/``. Its key holds all
    that changes the answer: the teacher (:func:`teacher_identity`), the whole training
    split's content, the augmentation, the normalisation, the precision (and so the stored
    dtype) and the classes."""
    source = getattr(datamodule, "train_source", None)
    if source is None or not hasattr(datamodule, "with_augmentation"):
        raise KDLightError(
            "distill.teacher_cache=true needs each training image's index and augmentation: "
            "use a kdlight data module"
        )
    dtype = storage_dtype(precision)
    key = cache_key(
        teacher=teacher_identity(teacher, checkpoint),
        images=source[0],
        augmentation="pad4-crop-flip" if datamodule.hparams.get("augment", True) else "none",
        normalization=[list(datamodule.mean), list(datamodule.std)],
        precision=str(precision),
        stored=str(dtype),
        classes=num_classes,
    )
    folder = Path(getattr(datamodule, "data_dir", None) or default_data_dir()) / "teacher_cache"
    positions = datamodule.train_positions
    return TeacherCache(folder, key, source[1], num_classes, positions, dtype)


class TeacherCacheMixin:
    """A distillation system's use of the teacher cache (its ``teacher_cache`` argument).

    :meth:`open_teacher_cache` (in ``setup``) opens it unless a method reads the teacher's
    features; :meth:`teacher_outputs` gives a training batch's teacher outputs, from the
    cache with the misses computed and stored, or live; each epoch the hits and lookups of
    every process are summed (``train/teacher_cache_hit_rate`` is the epoch's rate), and
    :meth:`teacher_cache_record` is the ``metrics.json`` block over the whole fit.
    """

    cache: TeacherCache | None = None
    #: whether a fit asked for the cache (an evaluation alone records nothing about it)
    _cache_asked = False
    #: hits and lookups of every process so far in this fit (summed at each epoch's end)
    _cache_totals: tuple[int, int] = (0, 0)

    def open_teacher_cache(self, slots: Sequence) -> None:
        """Open the cache for a fit, and have the training batches carry each image's
        index and augmentation; a method that reads the teacher's features keeps the
        teacher live, said in one line."""
        self._cache_asked = True
        features = [slot for slot in slots if slot.teacher_names]
        if features:
            rank_zero_only(log.info)(
                "distill.teacher_cache: not used: distiller=%s reads the teacher's features, "
                "which are too large to cache; the teacher runs live",
                method_name(features[0].method),
            )
            return
        datamodule = self.trainer.datamodule
        self.cache = teacher_cache_for(
            self.teacher,
            self.hparams.get("teacher_checkpoint"),
            datamodule,
            str(self.trainer.precision),
            self.hparams.num_classes,
        )
        datamodule.with_augmentation = True
        self._cache_totals = (0, 0)
        rank_zero_only(log.info)("teacher cache: %s", self.cache.path)

    def teacher_outputs(self, images: Tensor, extra: list[Tensor]) -> Outputs:
        """The teacher's outputs of a training batch: with the cache, its logits looked up
        by ``extra``'s indices and augmentation (the batch's last two entries), the teacher
        run on the misses only and its answers stored; without, the live teacher's logits
        and the tapped features."""
        if self.cache is None:
            with torch.no_grad(), self.teacher_taps.capture() as features:
                return Outputs(self.fast_teacher(images), features)
        index, params = extra[0], extra[-1]
        cached, hit = self.cache.lookup(index, params)
        logits = cached.to(images.device, non_blocking=True)
        miss = ~hit
        if miss.any():
            on_device = miss.to(images.device)
            with torch.no_grad():
                live = self.fast_teacher(images[on_device])
            stored = self.cache.store(index.cpu()[miss], params.cpu()[miss], live)
            logits[on_device] = stored.to(images.device)  # as a later hit will read it
        return Outputs(logits)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.cache is None:
            return
        mine = torch.tensor([self.cache.hits, self.cache.lookups], device=self.device)
        hits, lookups = (int(n) for n in self.trainer.strategy.reduce(mine, reduce_op="sum"))
        before_hits, before_lookups = self._cache_totals
        if lookups > before_lookups:
            rate = (hits - before_hits) / (lookups - before_lookups)
            self.log("train/teacher_cache_hit_rate", rate, rank_zero_only=True)
        self._cache_totals = (hits, lookups)

    def teacher_cache_record(self) -> dict:
        """``{"teacher_cache": {used, hit_rate, path}}`` when a fit asked for the cache: the
        hit rate over every process's lookups in this fit (None before the first epoch
        ended); ``{}`` otherwise."""
        if not self._cache_asked:
            return {}
        used = self.cache is not None
        hits, lookups = self._cache_totals
        return {
            "teacher_cache": {
                "used": used,
                "hit_rate": hits / lookups if used and lookups else None,
                "path": str(self.cache.path) if used else None,
            }
        }
