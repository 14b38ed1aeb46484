"""The teacher cache in the distillation systems (``distill.teacher_cache=true``): which
cache a run reads (:func:`teacher_cache_for`), and :class:`TeacherCacheMixin`, what
``DistillationModule`` and ``DistillationGridModule`` share: the teacher's outputs of a
training batch, from the cache or live, the hit rate counted over every process, and the
``teacher_cache`` block of ``metrics.json``, and the checks that a damaged cache stops the
run in one line rather than teach the student garbage. The storage is
:mod:`kdlight.teacher.cache`."""

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
from kdlight.teacher.cache import (
    CacheUnavailable,
    TeacherCache,
    agreement_tolerance,
    cache_key,
    disagreement,
    storage_dtype,
)

log = logging.getLogger("kdlight")


def teacher_identity(teacher: nn.Module, checkpoint: str | Path | None) -> str:
    """What names the teacher in a cache's key: its checkpoint file's content, or, for a
    teacher given as a module, its weights'."""
    from kdlight.runs.identity import file_identity

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
    dtype) and the classes.

    Raises:
        CacheUnavailable: its files cannot be opened or made there (a full disk, a
            read-only folder without the whole cache, a path that is not a folder).
    """
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
    features, or its files cannot be opened or made (one warning: the teacher runs live);
    :meth:`teacher_outputs` gives a training batch's teacher outputs, from the cache with
    the misses computed and stored (computed only, on a read-only cache), or live; each
    epoch the hits and lookups of every process are summed
    (``train/teacher_cache_hit_rate`` is the epoch's rate), and
    :meth:`teacher_cache_record` is the ``metrics.json`` block over the whole fit.

    A damaged cache stops the run with one line naming its files: the hits of each epoch's
    first batch are checked against the live teacher on the same images (one teacher
    forward of at most a batch per epoch), within the precision's tolerance
    (:func:`~kdlight.teacher.cache.agreement_tolerance`: 2^-3 of the row's largest logit
    for bfloat16, 2^-5 for float16 and TF32, 2^-14 for float32), which also stops a cache
    filled on a device whose answers differ by more; and a NaN or infinite cached logit
    (read as a miss, so the student never sees it) stops the run at that batch's check or
    at the epoch's end. Under DDP every process stops together, since each check is
    reduced over all of them.
    """

    cache: TeacherCache | None = None
    #: whether a fit asked for the cache (an evaluation alone records nothing about it)
    _cache_asked = False
    #: hits and lookups of every process so far in this fit (summed at each epoch's end)
    _cache_totals: tuple[int, int] = (0, 0)
    #: whether the next training batch's hits are to be checked against the live teacher
    _check_hits_now = False

    def open_teacher_cache(self, slots: Sequence) -> None:
        """Open the cache for a fit, and have the training batches carry each image's
        index and augmentation; a method that reads the teacher's features, or a cache
        whose files cannot be opened or made in any process, keeps the teacher live,
        said in one line."""
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
        cache, reason = None, "another DDP process cannot open it"
        try:
            cache = teacher_cache_for(
                self.teacher,
                self.hparams.get("teacher_checkpoint"),
                datamodule,
                str(self.trainer.precision),
                self.hparams.num_classes,
            )
        except CacheUnavailable as err:
            reason = str(err)
        if self.trainer.world_size > 1:  # all processes use it, or none does
            opened = torch.tensor(int(cache is not None), device=self.trainer.strategy.root_device)
            if not int(self.trainer.strategy.reduce(opened, reduce_op="min")):
                cache = None
        if cache is None:
            rank_zero_only(log.warning)(
                "distill.teacher_cache: not used: %s; the teacher runs live", reason
            )
            return
        self.cache = cache
        for note in cache.notes:
            rank_zero_only(log.warning)("%s", note)
        datamodule.with_augmentation = True
        self._cache_totals = (0, 0)
        rank_zero_only(log.info)("teacher cache: %s", self.cache.path)

    def teacher_outputs(self, images: Tensor, extra: list[Tensor]) -> Outputs:
        """The teacher's outputs of a training batch: with the cache, its logits looked up
        by ``extra``'s indices and augmentation (the batch's last two entries), the teacher
        run on the misses only and its answers stored (on a writable cache); without, the
        live teacher's logits and the tapped features."""
        if self.cache is None:
            with torch.no_grad(), self.teacher_taps.capture() as features:
                return Outputs(self.fast_teacher(images), features)
        index, params = extra[0], extra[-1]
        cached, hit = self.cache.lookup(index, params)
        if self._check_hits_now:
            self._check_hits_now = False
            self._check_hits(images, cached, hit)
        logits = cached.to(images.device, non_blocking=True)
        miss = ~hit
        if miss.any():
            on_device = miss.to(images.device)
            with torch.no_grad():
                live = self.fast_teacher(images[on_device])
            if self.cache.writable:
                stored = self.cache.store(index.cpu()[miss], params.cpu()[miss], live)
            else:
                stored = self.cache.round(live)
            logits[on_device] = stored.to(images.device)  # as a later hit will read it
        return Outputs(logits)

    def _check_hits(self, images: Tensor, cached: Tensor, hit: Tensor) -> None:
        """Compare a batch's hits with the live teacher on the same images (every process
        its own batch), and stop every process if any found them apart, or found a
        non-finite cached logit so far."""
        tolerance = agreement_tolerance(self.cache.dtype, images.device)
        apart, farthest = 0, 0.0
        if hit.any():
            with torch.no_grad():
                live = self.fast_teacher(images[hit.to(images.device)])
            apart, farthest = disagreement(cached[hit], self.cache.round(live), tolerance)
        found = torch.tensor([apart, farthest, self.cache.non_finite], device=self.device)
        apart, farthest, non_finite = self.trainer.strategy.reduce(found, reduce_op="max").tolist()
        self._stop_if_damaged(int(non_finite))
        if apart:
            raise KDLightError(
                f"teacher cache {self.cache.path}.logits: cached logits differ from the live "
                f"teacher's by up to {farthest:.3g} times the row's largest logit, beyond the "
                f"{str(self.cache.dtype).removeprefix('torch.')} tolerance {tolerance:.3g} "
                "(checked on this epoch's first batch): it is damaged, or was filled on a "
                f"device whose answers differ; {self._remedy()}"
            )

    def _stop_if_damaged(self, non_finite: int) -> None:
        if non_finite:
            raise KDLightError(
                f"teacher cache {self.cache.path}.logits holds NaN or infinite logits "
                f"({non_finite} of the entries read): it is damaged; {self._remedy()}"
            )

    def _remedy(self) -> str:
        path = self.cache.path
        return (
            f"delete {path.name}.logits and {path.name}.filled in {path.parent} and launch "
            "again (the runs, or kdlight-cache-teacher, fill it anew)"
        )

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._check_hits_now = self.cache is not None

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.cache is None:
            return
        mine = torch.tensor(
            [self.cache.hits, self.cache.lookups, self.cache.non_finite], device=self.device
        )
        summed = self.trainer.strategy.reduce(mine, reduce_op="sum")
        hits, lookups, non_finite = (int(n) for n in summed)
        self._stop_if_damaged(non_finite)
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
